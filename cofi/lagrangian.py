"""Sparsity control by a Lagrangian with learned multipliers (section 5).

    L_c = λ1·(s − t) + λ2·(s − t)²

with s the sparsity of the deterministic masks, carrying the gradient of the
smooth expected sparsity ŝ (``controlled_sparsity``). For a speedup target, s is
the fraction of the unpruned latency the deterministic structure saves, 1 − T/T_full
(cofi.latency), with the gradient of the same fraction for the expected kept units,
and t = 1 − 1/speedup: the same machinery, another measure of size. The log α minimise L_c
(gradient descent) while λ1, λ2 maximise it (gradient ascent, an optimizer with
``maximize=True``). If s stays below the target t, λ1 grows negative, which
makes ∂L_c/∂s = λ1 + 2λ2(s − t) negative: descent then raises ŝ, and with it s.
λ2 only ever grows, tightening the quadratic penalty.

Two departures from the paper's schedule, both measured (see
docs/experiments/sparsity-control.md): λ2 starts at ``lambda_2_init`` (100 by default, the paper 0)
and the target ramps from the masks' *initial* sparsity, not from 0. From λ2 = 0,
λ1 alone must pull the sparsity up the ramp: it integrates the lag, winds up
(to λ1 ≈ −7 in a 90% run) and the sparsity then overshoots the ramp by
|λ1| / 2λ2, 0.2 to 0.4, and takes most of the run to come back. A large λ2 makes
the pull proportional to the gap from the first step, so the sparsity follows the
ramp, and λ1 only has to cancel the data loss's steady push. A ramp from 0 while
the masks start at ~10% sparsity (the FFN units' log α start at 0) would first
push the sparsity *down*, winding λ1 up the other way.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def controlled_sparsity(expected: Tensor, deterministic: Tensor) -> Tensor:
    """The sparsity the Lagrangian constrains: the value of ``deterministic`` (the
    sparsity of the deterministic masks: exact counts, ``keep_multiple`` rounding and
    the layer-drop rule), the gradient of ``expected`` (the smooth ŝ of the keep
    probabilities): ŝ_E + (s_det − ŝ_E).detach(). Both are 0-d tensors; the result has
    ``expected``'s dtype.

    Why a straight-through value. ŝ_E alone is not the sparsity the model ships
    with: a closed layer gate (log α clamped at ln 0.01) still counts P(z>0) ≈ 0.047,
    and the per-group rounding (up to ``keep_multiple``) exists only in the masks,
    so λ would settle ŝ_E on the target and the shipped model a point or more away.
    Here λ1 and λ2 ascend on s_det − t, the shipped model's own error, while log α
    descends along ∂ŝ_E/∂log α scaled by λ1 + 2λ2(s_det − t): the paper's smooth
    gradient, continuous in log α. Alternatives considered:

    - the size formula over straight-through *counts* (round(ΣP), the layer rule):
      the same forward value, but its gradient is evaluated at the rounded counts,
      so it jumps whenever one of them crosses a rounding boundary (16 more hidden
      dims rescale every head's and unit's gradient at once);
    - a smooth surrogate of the rounding (a soft round, a sigmoid for the layer
      rule): only approximately the shipped value, with a temperature to tune.
    """
    return expected + (deterministic.to(expected.dtype) - expected).detach()


class Lagrangian(nn.Module):
    def __init__(self, lambda_2_init: float = 0.0) -> None:
        super().__init__()
        self.lambda_1 = nn.Parameter(torch.zeros(()))
        self.lambda_2 = nn.Parameter(torch.full((), float(lambda_2_init)))

    def forward(self, sparsity: Tensor, target: float) -> Tensor:
        gap = sparsity - target
        return self.lambda_1 * gap + self.lambda_2 * gap * gap

    def make_optimizer(self, lr: float, fused: bool = False) -> torch.optim.Optimizer:
        """AdamW ascending on λ (the reference code used a negative learning rate)."""
        return torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=0.0, maximize=True, fused=fused)


# The target's share of the way from its start to the final target, at warm-up progress p in [0, 1]
RAMPS = {
    "linear": lambda p: p,  # the paper's
    # Zhu & Gupta (2017): three times as fast at first, where there is much to remove that
    # costs little, slowing to a stop at the target, so the sparsity is not still lagging
    # (and λ1 not wound up) when the ramp ends
    "cubic": lambda p: 1.0 - (1.0 - p) ** 3,
}


def target_sparsity(
    step: int, final_target: float, prune_start: int, warmup_steps: int, initial: float = 0.0, ramp: str = "linear"
) -> float:
    """t(step): ``initial`` (the sparsity the masks start with) until pruning starts,
    then rising to final_target over warmup_steps along ``ramp`` (a key of RAMPS),
    then final_target."""
    if step < prune_start:
        return initial
    if warmup_steps <= 0:
        return final_target
    return initial + (final_target - initial) * RAMPS[ramp](min(1.0, (step - prune_start) / warmup_steps))
