"""CoFi pruning inside a training run: what `cofi.trainer.Trainer` adds to a distillation
run when it is given a :class:`PruneConfig`.

Distillation only for ``distill_epochs``; then masks are sampled from the hard-concrete
gates and the Lagrangian pulls the controlled number of the deterministic masks (the
model that ships; with the gradient of the smooth expected value,
``lagrangian.controlled_sparsity``) to a target that rises over ``sparsity_warmup_epochs``
(``ramp``: linear or cubic, see ``lagrangian.target_sparsity``); the search continues
after the target is reached. The controlled number is the sparsity, or with
``target_speedup`` the fraction of the unpruned latency saved, 1 − T/T_full, as a
latency model (cofi.latency) predicts it. The best checkpoint is chosen among
evaluations within tolerance of the final target.

Kept apart from the loop so that training a teacher (no pruning) runs none of this
code, and a change here reruns no teacher stage.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

import torch
from torch import Tensor

from cofi.errors import check_range
from cofi.gates import GateConfig, HardConcreteGates
from cofi.lagrangian import RAMPS, Lagrangian, controlled_sparsity, target_sparsity
from cofi.sparsity import ModelShape, mask_sparsity, max_sparsity, sparsity_of_counts

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from cofi.latency import LatencyModel

log = logging.getLogger(__name__)


@dataclass
class PruneConfig:
    """What pruning aims at: ``target_sparsity``, or ``target_speedup`` over the unpruned
    model as ``latency`` (a latency model of the deployment) predicts it. Either way the
    Lagrangian controls one number of the deterministic structure: its sparsity, or the
    fraction of the unpruned latency it saves, 1 − 1/speedup."""

    target_sparsity: float | None = None
    distill_epochs: float = 1.0  # distillation only, before any mask is sampled
    sparsity_warmup_epochs: float = 2.0  # target rises from the masks' initial value over this span
    ramp: str = "linear"  # how it rises: "linear" (the paper) or "cubic" (lagrangian.target_sparsity)
    reg_learning_rate: float = 0.01  # for log α (descent) and λ1, λ2 (ascent)
    lambda_2_init: float = 0.0  # λ2's start (the paper: 0); lagrangian.py says why the pipeline starts it at 100
    sparsity_tolerance: float = 0.01  # ε: checkpoints this close to the target are candidates
    gates: GateConfig = field(default_factory=GateConfig)
    target_speedup: float | None = None  # instead of target_sparsity
    latency: LatencyModel | None = None  # predicts the speedup of a structure; needed by target_speedup
    speedup_tolerance: float = 0.03  # relative: checkpoints whose predicted speedup is this close are candidates

    def __post_init__(self) -> None:
        if (self.target_sparsity is None) == (self.target_speedup is None):
            raise ValueError("give one of target_sparsity and target_speedup")
        if self.target_sparsity is not None:
            check_range("target_sparsity", self.target_sparsity, 0.0, 1.0, high_open=True)
        else:
            check_range("target_speedup", self.target_speedup, 1.0, math.inf, low_open=True)
            if self.latency is None:
                raise ValueError("target_speedup needs a latency model (latency)")
        check_range("distill_epochs", self.distill_epochs, 0.0, math.inf)
        check_range("sparsity_warmup_epochs", self.sparsity_warmup_epochs, 0.0, math.inf)
        if self.ramp not in RAMPS:
            raise ValueError(f"ramp={self.ramp!r}; allowed: {', '.join(RAMPS)}")
        check_range("reg_learning_rate", self.reg_learning_rate, 0.0, math.inf, low_open=True)
        check_range("lambda_2_init", self.lambda_2_init, 0.0, math.inf)
        check_range("sparsity_tolerance", self.sparsity_tolerance, 0.0, 1.0, low_open=True)
        check_range("speedup_tolerance", self.speedup_tolerance, 0.0, 1.0, low_open=True)

    @property
    def controlled_target(self) -> float:
        """The final target of the controlled number: a sparsity, or the latency saved."""
        return self.target_sparsity if self.target_speedup is None else 1.0 - 1.0 / self.target_speedup

    def start(self, model_config: PretrainedConfig, epochs: float, steps_per_epoch: int, total_steps: int,
              device: torch.device) -> Pruning:
        """The pruning state of a run of ``epochs`` (``total_steps`` steps) on a model of ``model_config``."""
        return Pruning(self, model_config, epochs, steps_per_epoch, total_steps, device)


def gate_noise_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of pruning step ``step``'s mask noise: seeded from (seed, step) alone,
    so every process draws the same masks at a step (one sample per global batch), and a
    resumed run draws what the uninterrupted one drew, with no state to checkpoint.
    Apart from the global RNG, which dropout draws from per process."""
    generator = torch.Generator(device="cpu" if device.type == "meta" else device)
    return generator.manual_seed(seed * 1_000_033 + step)


class Pruning:
    """The gates, λ and their optimisers of one pruning run, and the target's ramp over its
    steps. Built (seeded by the caller) where the trainer builds its optimiser."""

    def __init__(self, config: PruneConfig, model_config: PretrainedConfig, epochs: float, steps_per_epoch: int,
                 total_steps: int, device: torch.device) -> None:
        self.config, self.device = config, device
        self.start = round(config.distill_epochs * steps_per_epoch)
        self.warmup = round(config.sparsity_warmup_epochs * steps_per_epoch)
        if self.start + self.warmup >= total_steps:
            raise ValueError(
                f"distill_epochs ({config.distill_epochs}) + sparsity_warmup_epochs "
                f"({config.sparsity_warmup_epochs}) must be less than epochs ({epochs}): "
                f"pruning would never reach its target ({self.start} + {self.warmup} >= {total_steps} steps)"
            )
        self.shape = ModelShape.from_config(model_config)
        families = config.gates.families
        if config.target_speedup is None:
            reachable = max_sparsity(self.shape, families)
            if config.target_sparsity > reachable:
                raise ValueError(
                    f"target_sparsity={config.target_sparsity:g} cannot be reached by pruning only "
                    f"{', '.join(families)}: at most {reachable:.4f} (add families)"
                )
        else:
            config.latency.check_reachable(config.target_speedup, self.shape, families, config.gates.keep_multiple)
        gates = HardConcreteGates(self.shape, config.gates)
        # where the target ramp starts: read here, on the host, before the gates
        # move to the device (seeded, so the same on every process and on resume)
        self.initial_controlled = float(self._shipped(gates))
        self.gates = gates.to(device)
        self.lagrangian = Lagrangian(config.lambda_2_init).to(device)
        # fused, as the trainer's: the unfused AdamW reads its step count on the host (.item())
        fused = device.type != "meta"
        self.optimizers = [
            torch.optim.AdamW(self.gates.parameters(), lr=config.reg_learning_rate, weight_decay=0.0, fused=fused),
            self.lagrangian.make_optimizer(config.reg_learning_rate, fused=fused),
        ]

    def active(self, step: int) -> bool:
        """Whether step ``step`` samples masks (after the distillation-only start)."""
        return step >= self.start

    def noise(self, seed: int, step: int) -> dict[str, Tensor]:
        """Step ``step``'s mask noise, one draw for the whole global batch."""
        return self.gates.noise(gate_noise_generator(seed, step, self.device))

    def _shipped(self, gates: HardConcreteGates) -> Tensor:
        """What the Lagrangian controls, of the deterministic structure (``keep_multiple``
        and the layer-drop rule included), float64: its sparsity, or for a speedup target
        the fraction of the unpruned latency it saves, 1 − T/T_full."""
        if self.config.target_speedup is None:
            return gates.deterministic_sparsity()
        return 1 - self.config.latency.relative_of_counts(self.shape, gates.deterministic_counts())

    def _controlled(self) -> tuple[Tensor, dict[str, Tensor]]:
        """One step's controlled value (``_shipped``'s value with the gradient of the same
        measure of the expected counts, ``controlled_sparsity``) and what the step logs
        of it. Each count is computed once: on a GPU every op is a kernel launch, and a
        pruning step is bound by launches on a model as small as MiniLM."""
        expected, shipped = self.gates.expected_counts(), self.gates.deterministic_counts()
        sparsity = sparsity_of_counts(self.shape, expected), sparsity_of_counts(self.shape, shipped)
        logged = {"expected_sparsity": sparsity[0].detach(), "mask_sparsity": sparsity[1]}
        if self.config.target_speedup is None:
            return controlled_sparsity(*sparsity), logged
        # both structures in one call, in the expected counts' dtype (the shipped counts
        # are integers below 2^24: exact in float32)
        both = {f: torch.stack([e, shipped[f].to(e.dtype)]) for f, e in expected.items()}
        relative = self.config.latency.relative_of_counts(self.shape, both)  # (2,): expected, shipped
        speedup = 1 / relative.detach()
        return controlled_sparsity(1 - relative[0], 1 - relative[1]), logged | {
            "expected_speedup": speedup[0], "predicted_speedup": speedup[1]}

    def losses(self, step: int) -> dict[str, Tensor]:
        """The Lagrangian of step ``step`` (a global term, "lagrangian") and what the step
        logs of the controlled number, its target and λ; all on the device, no host read."""
        controlled, logged = self._controlled()
        target = target_sparsity(step, self.config.controlled_target, self.start, self.warmup,
                                 self.initial_controlled, self.config.ramp)
        parts = {"lagrangian": self.lagrangian(controlled, target)} | logged
        if self.config.target_speedup is None:  # a fill, not a host copy
            parts["target_sparsity"] = torch.full((), target, device=self.device)
        else:  # the latency saved, shown as the speedup it means; the sparsity alongside
            parts["target_speedup"] = torch.full((), 1 / (1 - target), device=self.device)
        parts["lambda_1"] = self.lagrangian.lambda_1.detach()
        parts["lambda_2"] = self.lagrangian.lambda_2.detach()
        return parts

    def evaluation(self) -> tuple[dict[str, Tensor], dict[str, float]]:
        """The deterministic masks to evaluate with, and their sparsity (and predicted speedup)."""
        masks = self.gates.deterministic()
        metrics = {"sparsity": mask_sparsity(self.shape, masks), "expected_sparsity": float(self.gates.expected_sparsity())}
        if self.config.target_speedup is not None:
            metrics["predicted_speedup"] = 1 / (1 - float(self._shipped(self.gates)))
        return masks, metrics

    def is_candidate(self, metrics: Mapping[str, float]) -> bool:
        """Whether an evaluation is within tolerance of the final target."""
        c = self.config
        if c.target_speedup is not None:
            return "predicted_speedup" in metrics and abs(metrics["predicted_speedup"] / c.target_speedup - 1) <= c.speedup_tolerance
        return "sparsity" in metrics and abs(metrics["sparsity"] - c.target_sparsity) <= c.sparsity_tolerance

    def warn_target_missed(self, last: Mapping[str, float]) -> None:
        c = self.config
        if c.target_speedup is None:
            log.warning("no evaluation within %.3f of target sparsity %.3f; keeping the final weights (sparsity %.4f)",
                        c.sparsity_tolerance, c.target_sparsity, last.get("sparsity", 0.0))
        else:
            log.warning("no evaluation within %.1f%% of target speedup %.2fx; keeping the final weights "
                        "(predicted %.2fx)", 100 * c.speedup_tolerance, c.target_speedup, last.get("predicted_speedup", 1.0))
