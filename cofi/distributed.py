"""The processes of a multi-process run, on Hugging Face Accelerate over torch.distributed.

Launched with ``torchrun`` or ``accelerate launch`` (N processes, gloo on CPU,
NCCL on CUDA), ``Processes.from_environment`` joins the process group through
``accelerate.PartialState``; launched plainly it is a single process and every
collective below is a no-op. The trainer keeps replicas identical by
construction: same seed for every initial weight, gradients summed across
processes before one identical update (weights, gates and λ alike).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Processes:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, cpu: bool = False) -> "Processes":
        """The launcher's processes; ``cpu`` (or no CUDA): gloo on CPU, else NCCL, one GPU each."""
        cpu = cpu or not torch.cuda.is_available()
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls(0, 1, torch.device("cpu" if cpu else "cuda"))
        from accelerate import PartialState

        state = PartialState(cpu=cpu)  # joins the process group from the launcher's environment
        return cls(state.process_index, state.num_processes, state.device)

    def sum(self, tensor: Tensor) -> Tensor:
        """Element-wise sum over processes."""
        if self.world_size == 1:
            return tensor
        from accelerate.utils import reduce

        return reduce(tensor, reduction="sum")

    def sum_gradients(self, parameters: Sequence[nn.Parameter]) -> None:
        """Replace every parameter's gradient by its sum over processes, in one all-reduce.
        A parameter without a gradient on this process contributes zeros."""
        if self.world_size == 1 or not parameters:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = self.sum(torch.cat([g.reshape(-1).float() for g in grads]))
        offset = 0
        for p, g in zip(parameters, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            offset += n

    def gather(self, items: list[Any]) -> list[Any]:
        """The concatenation of every process's ``items`` (picklable), on every process."""
        if self.world_size == 1:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(items)

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()
