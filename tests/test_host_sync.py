"""CI's guard for the GPU's code path: nothing in a pruning step or an evaluation batch
makes the host wait for the device (tests/host_sync.py says what counts).

The model takes the GPU's path wherever ``static_shapes`` is on (the default on every
device but the CPU); here it is forced on the CPU, so the tensors hold real values,
and the same steps also run on the meta device, where a copy to the host is visible.
"""

from __future__ import annotations

import pytest
import torch

from cofi.batching import Collator
from pipeline.paths import Speedup
from tests.conftest import synthetic_task
from tests.host_sync import HostSyncError, NoHostSync
from tests.test_devices import build_trainer, settings

TARGETS = [0.5, Speedup(1.5)]


@pytest.mark.parametrize("target", TARGETS, ids=str)
@pytest.mark.parametrize("name", settings())
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_the_gpu_path_never_waits_for_the_host(name, target, device):
    trainer = build_trainer(name, device, target=target, log_steps=1000)
    trainer.model.static_shapes = True  # the GPU's path (on meta already the default)
    batch = {k: v.to(device) for k, v in Collator(0)(synthetic_task(4, seed=3)).items() if k != "labels"}
    with NoHostSync(device):
        # pruning steps: sampled masks, forward, every loss part, the Lagrangian, backward,
        # the three optimisers (twice: the first creates their states)
        trainer.train_step(list(range(8)))
        trainer.train_step(list(range(8, 16)))
        # an evaluation batch with the deterministic masks
        trainer.model.eval()
        with torch.no_grad():
            logits = trainer.model(**batch, masks=trainer.pruning.gates.deterministic()).logits
    assert logits.shape == (4, 2)
    assert all(a.grad is not None for a in trainer.pruning.gates.log_alpha.values())


def test_the_cpu_path_leaves_units_out_and_the_guard_sees_it():
    """The CPU's own path reads the masks on the host (left-out units pay there): the
    guard refuses it, so the GPU-path test above guards something."""
    trainer = build_trainer("cofi", "cpu", log_steps=1000)
    assert trainer.model.static_shapes is False
    with pytest.raises(HostSyncError, match=r"modeling_cofi.py:\d+ \(computed_units"):
        with NoHostSync():
            trainer.train_step(list(range(8)))


@pytest.mark.parametrize(
    "what, expected",
    [
        (lambda x: x.nonzero(), "data-dependent shape"),
        (lambda x: x[x > 0], "boolean-mask indexing"),
        (lambda x: torch.unique(x), "data-dependent shape"),
        (lambda x: x.masked_select(x > 0), "data-dependent shape"),
        (lambda x: x.repeat_interleave(torch.tensor([1, 2, 1])), "data-dependent shape"),
        (lambda x: x.sum().item(), r"scalar read \(item\)"),
        (lambda x: x.tolist(), r"scalar read \(tolist\)"),
        (lambda x: bool(x.sum() > 0), r"scalar read \(bool"),
        (lambda x: float(x.sum()), r"scalar read \(float"),
        (lambda x: x.cpu(), r"device-to-host copy \(.cpu\(\)\)"),
        (lambda x: x.numpy(), "device-to-host copy"),
        (lambda x: torch.ones(3, device="meta").to("cpu"), "device-to-host copy"),
    ],
)
def test_the_guard_refuses_each_kind_of_host_wait(what, expected):
    x = torch.tensor([1.0, -2.0, 3.0])
    with pytest.raises(HostSyncError, match=expected):
        with NoHostSync():
            what(x)


def test_the_guard_lets_device_side_work_through():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    with NoHostSync():
        y = torch.where(x > 0, x, 0.0)  # a mask applied densely
        z = x[torch.tensor([0, 2])] * 2  # integer indices: a known shape
        (y.sum() + z.sum()).backward()
        moved = x.detach().to("cpu", torch.float64)  # the host's own tensor, a dtype change
    assert x.grad.tolist() == [3.0, 0.0, 3.0] and moved.dtype == torch.float64
