"""Device placement: the whole training path on PyTorch's meta device (runs in CI,
no GPU needed), and the same path on CUDA where a GPU is present (marked `cuda`).

A tensor that ``cofi`` creates on the CPU and then mixes with device tensors
crashes a CUDA run. The meta device catches most of these without a GPU: a
non-scalar CPU tensor meeting a meta tensor raises, as it would meeting a CUDA
tensor. Some ops (``scatter_``'s source, say) are not device-checked on meta, so
the meta runs also go through ``SameDevice``, a dispatch mode that refuses any op
whose tensors live on two devices, 0-d CPU scalars excepted (CUDA allows those).
Nothing is read back to the host on meta (``.item()`` raises there), which also
proves that a training step never waits for the device.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cofi.ablations import ABLATIONS
from cofi.batching import Collator
from cofi.benchmark import time_forward
from cofi.compact import compact
from cofi.flops import forward_flops
from cofi.gates import GateConfig, HardConcreteGates
from cofi.metrics import accuracy
from cofi.sparsity import ModelShape, expected_sparsity
from cofi.trainer import TrainConfig, Trainer
from cofi.pruning import PruneConfig
from cofi.deployment import Deployment
from cofi.profiling import default_grids, profile
from pipeline.params import validate_params
from pipeline.paths import Speedup, Target
from pipeline.distillation import distillation_loss
from stages.prune import prune_config
from tests.conftest import FINE_GRID, synthetic_task, tiny_model
from tests.test_latency import exact
from tests.test_trainer import make_trainer
from tests.test_pipeline_e2e import ROOT, TINY, copy_project, merge, run

# Ops that move data between devices on purpose.
COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default, torch.ops.aten._copy_from.default}


class SameDevice(TorchDispatchMode):
    """Raises on any op whose tensor arguments sit on more than one device."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in COPIES:
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            devices = {t.device for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
            if len(devices) > 1:
                raise RuntimeError(f"{func} mixes devices {sorted(map(str, devices))}")
        return func(*args, **kwargs)


def settings() -> dict[str, dict]:
    """The default CoFi setting and every ablation of the ablation table."""
    return {"cofi": {}, **ABLATIONS}


def params_with(prune_override: dict):
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["prune"].update(prune_override)
    data["prune"]["keep_multiple"] = 4  # the tiny model's widths are 16 and 32
    return validate_params(data)


def build_trainer(name: str, device: str, warmup_epochs: float = 1.0, target: Target = 0.5, **train) -> Trainer:
    """A pruning trainer for ablation ``name`` (as the prune stage builds it), pruning from
    step 0 with a sparsity warm-up of ``warmup_epochs``; a speedup target on an exact latency model."""
    params = params_with(settings()[name])
    student, teacher = tiny_model(seed=0), tiny_model(seed=0)
    loss = distillation_loss(params, student.config.hidden_size, student.config.num_hidden_layers)
    latency = None
    if isinstance(target, Speedup):
        latency = profile(student.config, Deployment(), default_grids(student.config, keep_multiple=4), prepare=exact)
    prune = prune_config(params, target, latency)
    prune.distill_epochs, prune.sparsity_warmup_epochs = 0.0, warmup_epochs
    config = TrainConfig(**{"epochs": 2, "batch_size": 8, "progress": False, "device": device, **train})
    return Trainer(
        student, synthetic_task(32, seed=1), synthetic_task(16, seed=2), config,
        metric_fn=accuracy, primary_metric="accuracy", collate=Collator(0), prune=prune,
        teacher=teacher if loss is not None else None, distill=loss,
    )


def on(device: str, module: torch.nn.Module) -> bool:
    return all(t.device.type == device for t in [*module.parameters(), *module.buffers()])


@pytest.mark.parametrize("name", settings())
def test_the_training_path_runs_on_the_meta_device(name):
    with SameDevice():
        trainer = build_trainer(name, "meta")
        assert on("meta", trainer.model) and on("meta", trainer.pruning.gates) and on("meta", trainer.pruning.lagrangian)
        if trainer.distillation is not None:
            assert on("meta", trainer.distillation.loss) and on("meta", trainer.distillation.teacher)
        before = copy.deepcopy(dict(trainer.pruning.gates.log_alpha))

        # a pruning step: sampled masks, forward, every loss part, the Lagrangian,
        # backward, the three optimisers; twice, so the optimiser states are used
        trainer.train_step(list(range(8)))
        trainer.train_step(list(range(8, 16)))
        step, logged, _ = trainer._unread[-1]
        assert step == 1 and {"lagrangian", "expected_sparsity", "mask_sparsity", "target_sparsity", "grad_norm"} <= set(logged)
        assert {t.device.type for t in logged.values()} == {"meta"}  # nothing was read back
        assert all(a.grad is not None for a in trainer.pruning.gates.log_alpha.values())
        assert all(a is not before[f] for f, a in trainer.pruning.gates.log_alpha.items())

        # evaluation with deterministic masks (keep_multiple and the layer rule included)
        masks = trainer.pruning.gates.deterministic()
        assert {m.device.type for m in masks.values()} == {"meta"}
        shape = ModelShape.from_config(trainer.model.config)
        assert expected_sparsity(shape, {f: (m != 0).double() for f, m in masks.items()}).device.type == "meta"
        assert trainer.pruning.gates.deterministic_sparsity().device.type == "meta"
        batch = {k: v.to("meta") for k, v in Collator(0)(synthetic_task(4, seed=3)).items() if k != "labels"}
        trainer.model.eval()
        assert trainer.model(**batch, masks=masks).logits.shape == (4, 2)

    # Compaction: which units survive sets the new shapes, a host decision, so the
    # masks come from the host (here: gates on the CPU) while the weights stay on meta.
    gates = HardConcreteGates(shape, trainer.pruning.config.gates)
    with torch.no_grad():
        for a in gates.log_alpha.values():
            a.normal_(generator=torch.Generator().manual_seed(0))
    host_masks = gates.deterministic()
    reference = compact(trainer.model.to_empty(device="cpu").eval(), host_masks)
    with SameDevice():
        small = compact(trainer.model.to("meta"), host_masks)
        assert on("meta", small)
        assert {k: v.shape for k, v in small.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
        assert forward_flops(small, 16) == forward_flops(reference, 16)
        assert small(**batch).logits.shape == (4, 2)


def test_the_teacher_cache_runs_on_the_meta_device():
    """Epoch 0's batches fill the teacher cache; a batch from it alone and a batch mixing
    kept and new examples then read it back, all on meta (indices made on the host go
    to the device)."""
    with SameDevice():
        trainer = build_trainer("cofi", "meta", teacher_cache_gb=1.0)
        cache = trainer.teacher_cache
        assert cache is not None and cache.kept == 32
        for examples in ([*range(8)], [*range(8, 16)], [*range(8)], [4, 5, 6, 7, 16, 17, 18, 19]):
            trainer.train_step(examples)
        assert (cache.computed, cache.reused) == (20, 12)
        assert cache.hidden.device.type == "meta" and cache.logits.device.type == "meta"
        assert {t.device.type for t in trainer._unread[-1][1].values()} == {"meta"}


cuda = pytest.mark.cuda


@cuda
def test_cuda_pruning_reaches_its_target(task):
    """tests/test_trainer.py's control run (fine-grid model, keep_multiple 4, λ2 from 100) on CUDA."""
    prune = PruneConfig(target_sparsity=0.8, distill_epochs=1, sparsity_warmup_epochs=8, reg_learning_rate=0.1,
                        lambda_2_init=100.0, gates=GateConfig(keep_multiple=4))
    trainer = make_trainer(task, prune=prune, model=FINE_GRID, epochs=25, eval_steps=12, device="cuda")
    result = trainer.fit()
    assert {p.device.type for p in trainer.model.parameters()} == {"cuda"}
    assert abs(trainer.history[-1]["mask_sparsity"] - 0.8) <= 0.02
    assert result.target_reached and abs(result.best_metrics["sparsity"] - 0.8) <= trainer.pruning.config.sparsity_tolerance


@cuda
def test_cuda_compaction_is_exact_in_fp32():
    model = tiny_model(seed=0).cuda().eval()
    gates = HardConcreteGates(ModelShape.from_config(model.config)).cuda()
    with torch.no_grad():
        for a in gates.log_alpha.values():
            a.normal_(0.0, 2.0)
    masks = gates.deterministic()
    batch = {k: v.cuda() for k, v in Collator(0)(synthetic_task(8, seed=3)).items() if k != "labels"}
    torch.backends.cuda.matmul.allow_tf32 = False  # exactness is an fp32 property
    masked = model(**batch, masks=masks).logits
    small = compact(model, masks)
    assert on("cuda", small)
    assert (small(**batch).logits - masked).abs().max().item() <= 1e-4


@cuda
def test_cuda_bf16_autocast_steps_match_fp32():
    """bf16 autocast on the GPU takes fp32's steps up to bf16 rounding: every step's loss
    within 1% (the CPU's emulated bf16 stays within 1.5e-4 of the loss on this model:
    tests/test_trainer.py::test_bf16_autocast_trains), and bf16 really ran (the losses
    are not fp32's). fp32 without TF32, so that the reference is fp32."""
    torch.backends.cuda.matmul.allow_tf32 = False
    fp32 = build_trainer("cofi", "cuda", warmup_epochs=0.5, epochs=1, log_steps=1)
    fp32.fit()
    trainer = build_trainer("cofi", "cuda", bf16=True, warmup_epochs=0.5, epochs=1, log_steps=1)
    assert trainer.bf16 == torch.cuda.is_bf16_supported(including_emulation=False)
    trainer.fit()
    got, want = [h["loss"] for h in trainer.history], [h["loss"] for h in fp32.history]
    assert len(got) == len(want) == trainer.total_steps
    assert got != want
    assert got == pytest.approx(want, rel=1e-2)


@cuda
@pytest.mark.parametrize("target", [0.5, Speedup(1.5)], ids=str)
def test_cuda_pruning_steps_never_wait_for_the_device(target):
    """torch's sync debug mode raises on anything in a step that waits for the GPU: a value
    read back, a blocking copy. Values are read every log_steps only (not within these steps)."""
    trainer = build_trainer("cofi", "cuda", target=target, log_steps=1000)
    trainer.train_step(list(range(8)))  # first step: optimiser states, cached latency tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for start in (8, 16, 24):
            trainer.train_step(list(range(start, start + 8)))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(a.grad is not None for a in trainer.pruning.gates.log_alpha.values())


@cuda
def test_cuda_benchmark_harness_times_with_cuda_events():
    timing = time_forward(tiny_model(seed=0).cuda(), batch_size=4, sequence_length=16, warmup=1, repeats=3)
    assert timing.device == "cuda" and 0.0 < timing.q1_ms <= timing.median_ms <= timing.q3_ms


@cuda
@pytest.mark.integration
@pytest.mark.skipif(shutil.which("dvc") is None, reason="needs dvc")
def test_cuda_dvc_repro_of_the_pipeline(tmp_path):
    """Training on the GPU, and a speedup target on a GPU deployment: profiled, pruned to and benchmarked there."""
    gpu = {"device": "cuda", "runtime": "torch", "precision": "fp32", "batch_size": 1, "sequence_length": 16, "threads": 0}
    project = copy_project(tmp_path, merge(TINY, {"compute": {"device": "cuda"},
                                                  "prune": {"targets": [0.5], "deployment": "gpu-b1"},
                                                  "deployments": {"gpu-b1": gpu}}))
    run(["dvc", "repro"], project)
    metrics = json.loads((project / "metrics" / "compact-0.5.json").read_text())
    assert metrics["sparsity_counted"] == pytest.approx(metrics["sparsity_masks"], abs=1e-9)
    profile = json.loads((project / "metrics" / "profile-gpu-b1.json").read_text())
    latency = json.loads((project / "outputs" / "latency" / "gpu-b1.json").read_text())
    assert torch.cuda.get_device_name() in json.dumps(latency["hardware"])
    print(f"gpu-b1 latency model: worst |error| {profile['worst_relative_error']:.1%}, "
          f"mean {profile['mean_relative_error']:.1%}, {profile['profile_seconds']:.0f} s")
    pruned = json.loads((project / "metrics" / "compact-1.5x.json").read_text())
    assert pruned["target_speedup"] == 1.5
    assert json.loads((project / "metrics" / "prune-1.5x.json").read_text())["deployment"] == "gpu-b1"
    benchmark = json.loads((project / "metrics" / "benchmark" / "cofi-1.5x.json").read_text())
    print(f"1.5x on gpu-b1: predicted {pruned['predicted_speedup']:.2f}x, measured {benchmark['measured_speedup']:.2f}x")
    assert json.loads(run(["dvc", "status", "--json"], project).stdout) == {}
