"""Sparsity control by a Lagrangian with learned multipliers (section 5).

    L_c = λ1·(ŝ − t) + λ2·(ŝ − t)²

The log α minimise L_c (gradient descent) while λ1, λ2 maximise it (gradient
ascent, an optimizer with ``maximize=True``). If ŝ stays below the target t, λ1
grows negative, which makes ∂L_c/∂ŝ = λ1 + 2λ2(ŝ − t) negative: descent then
raises ŝ. λ2 only ever grows, tightening the quadratic penalty.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Lagrangian(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lambda_1 = nn.Parameter(torch.zeros(()))
        self.lambda_2 = nn.Parameter(torch.zeros(()))

    def forward(self, expected_sparsity: Tensor, target: float) -> Tensor:
        gap = expected_sparsity - target
        return self.lambda_1 * gap + self.lambda_2 * gap * gap

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        """AdamW ascending on λ (the reference code used a negative learning rate)."""
        return torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=0.0, maximize=True)


def target_sparsity(step: int, final_target: float, prune_start: int, warmup_steps: int) -> float:
    """t(step): 0 before pruning starts, then linear up to final_target over warmup_steps."""
    if step < prune_start:
        return 0.0
    if warmup_steps <= 0:
        return final_target
    return final_target * min(1.0, (step - prune_start) / warmup_steps)
