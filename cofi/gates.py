"""Hard-concrete (L0) gates for CoFi's five mask families (section 3).

One learnable log α per mask unit. In training each unit draws

    u ~ U(ε, 1−ε),  s = sigmoid((log u − log(1−u) + log α) / β),  z = clamp(s·(r−l) + l, 0, 1)

so z is exactly 0 or 1 with positive probability, and

    P(z > 0) = sigmoid(log α − β·log(−l/r)).

Deterministic masks (evaluation, compaction): each group (the hidden dims;
the heads of one layer; the FFN units of one layer; each layer gate alone) keeps
its round(Σ P(z>0)) units of largest log α — for the hidden dims and FFN units
that count rounded up to a multiple of ``keep_multiple``, at most N — and the
others are set to 0. Survivors keep the soft value sigmoid(log α / β) — the
median of the unstretched sample, always in (0, 1) and ≈1 for confident units —
which compaction folds into the weights. A layer gate, a group of one, is
thereby dropped exactly when P(z>0) < 0.5 (a tie rounds to even: dropped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import Tensor, nn

from cofi.sparsity import FAMILIES, ModelShape, group_counts, sparsity_of_counts

BETA = 2.0 / 3.0  # temperature of the concrete distribution (Louizos et al., 2018)
LIMIT_L, LIMIT_R = -0.1, 1.1  # stretch interval: z hits exactly 0 and 1 with positive probability
EPS = 1e-6  # keeps log u and log(1−u) finite
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(1e-2), math.log(1e2)  # clamp after every step

# Reference-code initialisation: coarse gates start firmly open (μ = 10, clamped
# to ln 100 after the first step), FFN units at drop rate 0.5 (μ = 0); the authors
# call the split "mostly a typo", so it is a parameter here.
DEFAULT_INIT_LOG_ALPHA = {"hidden": 10.0, "head": 10.0, "mha": 10.0, "intermediate": 0.0, "ffn": 10.0}


@dataclass
class GateConfig:
    """Which mask families are learned, and how their log α start."""

    families: tuple[str, ...] = FAMILIES  # leave "hidden" out, or "mha" and "ffn", for the paper's ablations
    init_log_alpha: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_INIT_LOG_ALPHA))
    init_std: float = 0.01
    # Kept hidden dims and FFN units per layer are rounded up to a multiple of this
    # (at most the full width) in the deterministic masks: a compact model of width
    # 383 runs its matrix products on slow kernel paths, one of width 384 on the
    # fast ones. 1: the paper's rule.
    keep_multiple: int = 1

    def __post_init__(self) -> None:
        if self.keep_multiple < 1:
            raise ValueError(f"keep_multiple={self.keep_multiple!r}; allowed: an integer >= 1")
        unknown = sorted(set(self.families) - set(FAMILIES))
        if unknown:
            raise ValueError(f"unknown mask families {unknown}; allowed: {list(FAMILIES)}")
        self.families = tuple(f for f in FAMILIES if f in self.families)
        missing = [f for f in self.families if f not in self.init_log_alpha]
        if missing:
            raise ValueError(f"init_log_alpha has no value for {missing}")


def keep_probability(log_alpha: Tensor) -> Tensor:
    """P(z > 0) for each unit."""
    return torch.sigmoid(log_alpha - BETA * math.log(-LIMIT_L / LIMIT_R))


def uniform_noise(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The u ~ U(ε, 1−ε) of one draw per unit of ``like`` (from ``generator``, else the global RNG)."""
    return torch.empty_like(like).uniform_(EPS, 1.0 - EPS, generator=generator)


def sample_hard_concrete(log_alpha: Tensor, u: Tensor | None = None) -> Tensor:
    """One training-time draw of z per unit (differentiable in log α), from the noise ``u``
    (``uniform_noise``; None: drawn now from the global RNG)."""
    u = uniform_noise(log_alpha.detach()) if u is None else u
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0.0, 1.0)


def kept_count(log_alpha: Tensor, keep_multiple: int = 1) -> Tensor:
    """Units each group keeps under the deterministic masks: (G, N) log α → (G,) counts.

    round(Σ P(z > 0)) (the paper's rule), then rounded *up* to a multiple of
    ``keep_multiple`` and capped at the group size N. Up, so a group whose
    rounded expected count is positive never rounds to 0 (an FFN whose gate is
    on never becomes a constant-bias sublayer); the Lagrangian sees these exact
    counts, so rounding up does not overshoot the size target.
    """
    expected = torch.round(keep_probability(log_alpha.detach()).sum(-1)).long()  # (G,)
    aligned = (expected + keep_multiple - 1) // keep_multiple * keep_multiple
    return aligned.clamp(max=log_alpha.shape[-1])


def deterministic_mask(log_alpha: Tensor, keep_multiple: int = 1) -> Tensor:
    """Evaluation mask; each row of log_alpha (last dim) is one group.

    A group keeps ``kept_count`` units, those of largest log α, with their soft
    values sigmoid(log α / β); the others are 0.
    """
    groups = log_alpha.detach().reshape(-1, log_alpha.shape[-1]) if log_alpha.dim() > 1 else log_alpha.detach().reshape(1, -1)
    size = groups.shape[-1]
    z = torch.sigmoid(groups / BETA)
    num_zeros = size - kept_count(groups, keep_multiple)  # (G,)
    order = groups.argsort(dim=-1)  # ascending log α
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(size, device=order.device).expand_as(order))
    z = torch.where(rank < num_zeros.unsqueeze(-1), torch.zeros_like(z), z)
    return z.reshape(log_alpha.shape)


class HardConcreteGates(nn.Module):
    """log α for every enabled mask family of a model of the given shape."""

    def __init__(self, shape: ModelShape, config: GateConfig | None = None):
        super().__init__()
        self.shape = shape
        self.config = config or GateConfig()
        self.log_alpha = nn.ParameterDict(
            {
                family: nn.Parameter(
                    torch.randn(shape.mask_shape(family)) * self.config.init_std
                    + self.config.init_log_alpha[family]
                )
                for family in self.config.families
            }
        )

    @property
    def families(self) -> tuple[str, ...]:
        return self.config.families

    def _per_layer(self, family: str, log_alpha: Tensor) -> Tensor:
        # layer gates are groups of one: shape (L, 1) for the group rule
        return log_alpha.unsqueeze(-1) if family in ("mha", "ffn") else log_alpha

    def noise(self, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The uniform noise of one draw of every family's masks (``uniform_noise``)."""
        return {f: uniform_noise(a.detach(), generator) for f, a in self.log_alpha.items()}

    def sample(self, noise: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Training masks: one hard-concrete draw per unit, from ``noise`` (``noise()``;
        None: drawn now). The same noise gives the same masks, each with its own graph."""
        return {f: sample_hard_concrete(a, None if noise is None else noise[f]) for f, a in self.log_alpha.items()}

    def keep_probabilities(self) -> dict[str, Tensor]:
        return {f: keep_probability(a) for f, a in self.log_alpha.items()}

    def _keep_multiple(self, family: str) -> int:
        return self.config.keep_multiple if family in ("hidden", "intermediate") else 1

    @torch.no_grad()
    def deterministic(self) -> dict[str, Tensor]:
        """Evaluation and compaction masks (section 3)."""
        return {
            f: deterministic_mask(self._per_layer(f, a), self._keep_multiple(f)).reshape(a.shape)
            for f, a in self.log_alpha.items()
        }

    def expected_counts(self) -> dict[str, Tensor]:
        """Expected units kept per group (``sparsity.group_counts``), differentiable in log α."""
        return group_counts(self.keep_probabilities())

    @torch.no_grad()
    def deterministic_counts(self) -> dict[str, Tensor]:
        """Units ``deterministic()``'s masks keep per group, float64 on the gates' device:
        hidden (), the others (L,). From the kept counts alone (no argsort, no host read):
        the masks zero exactly ``N − kept_count`` units per group and keep the others non-zero."""
        return {f: kept_count(self._per_layer(f, a), self._keep_multiple(f)).double() for f, a in self.log_alpha.items()}

    def expected_sparsity(self) -> Tensor:
        """ŝ = 1 − E/M with E from the keep probabilities (differentiable)."""
        return sparsity_of_counts(self.shape, self.expected_counts())

    @torch.no_grad()
    def deterministic_sparsity(self) -> Tensor:
        """Sparsity of ``deterministic()``'s masks (equal to ``mask_sparsity(shape, deterministic())``),
        a float64 tensor on the gates' device."""
        return sparsity_of_counts(self.shape, self.deterministic_counts())

    @torch.no_grad()
    def clamp_(self) -> None:
        for a in self.log_alpha.values():
            a.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    def parameters_for_optimizer(self) -> Iterable[nn.Parameter]:
        return self.log_alpha.values()
