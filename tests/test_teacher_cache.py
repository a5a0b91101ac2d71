"""The teacher's outputs kept per example (cofi.teacher_cache): what a batch gets back
against a fresh forward pass of that batch, which examples the budget keeps, and a
whole pruning run with and without the cache."""

from __future__ import annotations

import pytest
import torch

from cofi.batching import Collator
from cofi.teacher_cache import BYTES_PER_VALUE, TeacherCache
from cofi.pruning import PruneConfig
from tests.conftest import synthetic_task, tiny_model
from tests.test_trainer import make_trainer

LAYERS = [1, 2]  # hidden states kept: the tiny model's two layers


def cache_of(data, budget_bytes=2**30, layers=LAYERS):
    teacher = tiny_model(seed=0).eval()
    return teacher, TeacherCache(teacher, [len(e["input_ids"]) for e in data], layers, budget_bytes, torch.device("cpu"))


def inputs(data, examples):
    batch = Collator(0)([data[i] for i in examples])
    return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]


@torch.no_grad()
def test_a_batch_gets_what_a_forward_pass_of_it_gives():
    data = synthetic_task(40, seed=1)
    teacher, cache = cache_of(data)
    first = [0, 1, 2, 3, 4, 5]
    out = cache(first, *inputs(data, first))
    fresh = teacher(*inputs(data, first), output_hidden_states=True)
    assert torch.equal(out.logits, fresh.logits)  # a batch of new examples is the forward pass itself
    assert all(torch.equal(out.hidden_states[k], fresh.hidden_states[k]) for k in LAYERS)
    assert (cache.computed, cache.reused) == (6, 0)

    mixed = [3, 30, 0, 31, 5]  # kept and new rows, padded to another length than before
    ids, mask, types = inputs(data, mixed)
    out = cache(mixed, ids, mask, types)
    fresh = teacher(ids, mask, types, output_hidden_states=True)
    assert (cache.computed, cache.reused) == (8, 3)
    torch.testing.assert_close(out.logits, fresh.logits, rtol=1e-5, atol=1e-6)
    real = mask.bool()
    for k in LAYERS:
        torch.testing.assert_close(out.hidden_states[k][real], fresh.hidden_states[k][real], rtol=1e-5, atol=1e-6)
        kept_rows = torch.tensor([0, 2, 4])
        assert torch.all(out.hidden_states[k][kept_rows][~real[kept_rows]] == 0)  # their padding: zeros
    assert [k for k, h in enumerate(out.hidden_states) if h is not None] == LAYERS
    assert cache.stored[[0, 1, 2, 3, 4, 5, 30, 31]].all() and cache.stored.sum() == 8

    again = cache(mixed, ids, mask, types)  # every row kept now: no forward pass
    assert (cache.computed, cache.reused) == (8, 8)
    torch.testing.assert_close(again.logits, out.logits, rtol=0, atol=0)


@torch.no_grad()
def test_the_budget_keeps_the_longest_prefix_that_fits():
    data = synthetic_task(40, seed=1)
    lengths = [len(e["input_ids"]) for e in data]
    teacher = tiny_model(seed=0)
    per_token = len(LAYERS) * teacher.config.hidden_size * BYTES_PER_VALUE
    per_example = teacher.config.num_labels * BYTES_PER_VALUE
    budget = sum(lengths[:10]) * per_token + 10 * per_example  # exactly the first 10
    teacher, cache = cache_of(data, budget)
    assert cache.kept == 10 and cache.nbytes == budget
    _, one_short = cache_of(data, budget - 1)
    assert one_short.kept == 9

    examples = [8, 9, 10, 11]
    for _ in range(3):
        cache(examples, *inputs(data, examples))
    assert cache.stored.nonzero()[0].tolist() == [8, 9]  # 10 and 11 lie past the budget: computed each time
    assert (cache.computed, cache.reused) == (4 + 2 + 2, 2 + 2)
    _, none = cache_of(data, 0)
    assert none.kept == 0 and none.hidden is None


@torch.no_grad()
def test_prediction_distillation_keeps_only_the_logits():
    data = synthetic_task(20, seed=1)
    teacher, cache = cache_of(data, layers=[])
    cache([0, 1], *inputs(data, [0, 1]))
    out = cache([1, 0], *inputs(data, [1, 0]))
    assert out.hidden_states is None and cache.hidden is None
    torch.testing.assert_close(out.logits, teacher(*inputs(data, [1, 0])).logits, rtol=1e-5, atol=1e-6)


def test_a_pruning_run_computes_each_example_once_and_ends_where_the_uncached_run_does(task):
    """3 epochs: epoch 0 step for step the same as without the cache (its batches are all
    new), then every teacher output read from the buffer; the run ends within float
    rounding of the uncached one."""
    prune = PruneConfig(target_sparsity=0.4, distill_epochs=0.5, sparsity_warmup_epochs=1, reg_learning_rate=0.1)
    steps = {}
    for gb in (0.0, 1.0):
        trainer = make_trainer(task, prune=prune, epochs=3, log_steps=1, teacher_cache_gb=gb)
        result = trainer.fit()
        steps[gb] = (trainer, result, trainer.history)
    plain, cached = steps[0.0], steps[1.0]
    assert plain[0].teacher_cache is None
    cache = cached[0].teacher_cache
    assert cache.computed == len(task[0]) and cache.reused == 2 * len(task[0])
    per_epoch = cached[0].steps_per_epoch
    assert cached[2][:per_epoch] == plain[2][:per_epoch]  # bit for bit
    for a, b in zip(plain[2][per_epoch:], cached[2][per_epoch:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)  # measured: 2e-8 apart at most
    for (name, a), b in zip(plain[0].model.state_dict().items(), cached[0].model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)  # measured: 9e-8


@pytest.mark.cuda
def test_a_cuda_pruning_run_computes_each_example_once(task):
    """On the GPU (pinned index copies): the same counts, and a run that ends close to the
    uncached one (TF32 kernels round differently by shape, so not within fp32 rounding)."""
    prune = PruneConfig(target_sparsity=0.4, distill_epochs=0.5, sparsity_warmup_epochs=1, reg_learning_rate=0.1)
    runs = []
    for gb in (0.0, 1.0):
        trainer = make_trainer(task, prune=prune, epochs=3, log_steps=1, teacher_cache_gb=gb, device="cuda")
        trainer.fit()
        runs.append(trainer)
    cache = runs[1].teacher_cache
    assert cache.hidden.is_cuda and (cache.computed, cache.reused) == (len(task[0]), 2 * len(task[0]))
    assert runs[1].history[-1]["loss"] == pytest.approx(runs[0].history[-1]["loss"], rel=0.05)


def test_one_epoch_or_less_keeps_nothing(task):
    trainer = make_trainer(task, prune=None, epochs=1, teacher_cache_gb=1.0)
    assert trainer.teacher_cache is None
    assert make_trainer(task, epochs=1.5, teacher_cache_gb=1.0).teacher_cache is not None
    assert make_trainer(task, teacher=False, epochs=3, teacher_cache_gb=1.0).teacher_cache is None
