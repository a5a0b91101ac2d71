"""Compaction is exact: the compact model computes what the masked model computes.

Tiny random BERT- and RoBERTa-style models with every parameter randomised
(LayerNorms and biases included), so that a wrong fold cannot pass by accident.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from cofi import CofiConfig, CofiForSequenceClassification
from cofi.compact import compact
from cofi.sparsity import (
    ModelShape,
    count_prunable_parameters,
    mask_sparsity,
    remaining_size,
)

ATOL = 1e-4  # fp32; observed differences are ~1e-6
B, T = 4, 9  # batch, sequence length of the test inputs
ARCHS = {
    "bert": dict(position_style="absolute", type_vocab_size=2, pad_token_id=0),
    "roberta": dict(position_style="padding_offset", type_vocab_size=1, pad_token_id=1),
    "distilbert": dict(position_style="absolute", type_vocab_size=1, pad_token_id=0, pooler_activation="relu"),
    "electra": dict(position_style="absolute", type_vocab_size=2, pad_token_id=0, pooler_activation="gelu",
                    pooler_input_dropout=True),
}
SIZES = dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=4, intermediate_size=24)


def make_model(arch: str, seed: int = 0, **sizes) -> CofiForSequenceClassification:
    """A tiny eval-mode model with every parameter random (no identity LayerNorms, no zero biases)."""
    config = CofiConfig(
        vocab_size=50,
        max_position_embeddings=T + 8,  # RoBERTa positions start after pad_token_id
        num_labels=3,
        **ARCHS[arch],
        **{**SIZES, **sizes},
    )
    model = CofiForSequenceClassification(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))  # LayerNorm scale in [0.5, 1.5)
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def make_inputs(model: CofiForSequenceClassification, seed: int = 0) -> dict[str, Tensor]:
    """Random tokens with right padding in some rows (and token types for BERT)."""
    config = model.config
    gen = torch.Generator().manual_seed(1000 + seed)
    input_ids = torch.randint(2, config.vocab_size, (B, T), generator=gen)
    lengths = torch.tensor([T, T - 3, 2, T - 1])
    attention_mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # (B, T)
    input_ids = input_ids.masked_fill(attention_mask == 0, config.pad_token_id)
    token_type_ids = torch.randint(0, config.type_vocab_size, (B, T), generator=gen)
    return dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


def soft(shape: tuple[int, ...], p_zero: float, gen: torch.Generator) -> Tensor:
    """Soft mask values in (0, 1], each zero with probability p_zero."""
    values = 1.0 - torch.rand(shape, generator=gen)  # (0, 1]
    return values * (torch.rand(shape, generator=gen) >= p_zero)


def random_masks(
    model: CofiForSequenceClassification, seed: int, leave_out: bool = True
) -> dict[str, Tensor | None]:
    """Soft masks with random zeros, sometimes whole layers off, sometimes (leave_out) a family None."""
    shape = ModelShape.from_config(model.config)
    gen = torch.Generator().manual_seed(seed)
    masks = {
        "hidden": soft(shape.mask_shape("hidden"), 0.3, gen),
        "head": soft(shape.mask_shape("head"), 0.35, gen),
        "mha": soft(shape.mask_shape("mha"), 0.25, gen),
        "intermediate": soft(shape.mask_shape("intermediate"), 0.4, gen),
        "ffn": soft(shape.mask_shape("ffn"), 0.25, gen),
    }
    # Whole rows: a layer left with no head / no unit while its gate may stay on.
    masks["head"][torch.rand(shape.num_layers, generator=gen) < 0.2] = 0
    masks["intermediate"][torch.rand(shape.num_layers, generator=gen) < 0.2] = 0
    if masks["hidden"].count_nonzero() == 0:
        masks["hidden"][0] = 0.5
    for family in masks:  # each family is left out of about one pattern in ten
        if leave_out and torch.rand((), generator=gen) < 0.1:
            masks[family] = None
    return masks


def assert_exact(model, masks, inputs=None) -> CofiForSequenceClassification:
    """Compact and compare logits and every hidden state (on the kept dims) with the masked model."""
    inputs = inputs or make_inputs(model)
    small = compact(model, masks)
    with torch.no_grad():
        ref = model(**inputs, masks=masks, output_hidden_states=True)
        out = small(**inputs, output_hidden_states=True)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=ATOL)

    hidden = masks.get("hidden")
    keep = torch.arange(model.config.hidden_size) if hidden is None else torch.nonzero(hidden).flatten()
    assert len(out.hidden_states) == len(ref.hidden_states) == model.config.num_hidden_layers + 1
    for h_small, h_ref in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(h_small, h_ref[..., keep], rtol=0, atol=ATOL)
        dropped = torch.ones(h_ref.shape[-1], dtype=torch.bool)
        dropped[keep] = False
        assert torch.all(h_ref[..., dropped] == 0)  # the masked stream is 0 off the kept dims
    return small


def full_masks(model, **values) -> dict[str, Tensor]:
    """All-ones masks of the model's shape, with some families replaced."""
    shape = ModelShape.from_config(model.config)
    families = ("hidden", "head", "mha", "intermediate", "ffn")
    masks = {family: torch.ones(shape.mask_shape(family)) for family in families}
    masks.update(values)
    return masks


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy machine
    OpenMP spinning makes every op orders of magnitude slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(ARCHS))
def model(request) -> CofiForSequenceClassification:
    return make_model(request.param)


# ---------------------------------------------------------------------------
# exactness on random patterns


@pytest.mark.parametrize("seed", range(20))
def test_random_masks_exact(model, seed):
    masks = random_masks(model, seed)
    small = assert_exact(model, masks, make_inputs(model, seed))
    assert small.config.hidden_size == (
        model.config.hidden_size if masks["hidden"] is None else int(masks["hidden"].count_nonzero())
    )


def test_random_patterns_cover_the_edge_cases():
    """The 20 random patterns include layers off, empty sublayers with the gate on, missing families."""
    model = make_model("bert")
    seen = dict(mha_off=0, ffn_off=0, no_head_gate_on=0, no_unit_gate_on=0, missing=0)
    for seed in range(20):
        m = random_masks(model, seed)
        seen["missing"] += any(v is None for v in m.values())
        if m["mha"] is not None:
            seen["mha_off"] += int((m["mha"] == 0).any())
            if m["head"] is not None:
                seen["no_head_gate_on"] += int(((m["head"] == 0).all(-1) & (m["mha"] != 0)).any())
        if m["ffn"] is not None:
            seen["ffn_off"] += int((m["ffn"] == 0).any())
            if m["intermediate"] is not None:
                seen["no_unit_gate_on"] += int(((m["intermediate"] == 0).all(-1) & (m["ffn"] != 0)).any())
    assert all(count > 0 for count in seen.values()), seen


def test_original_model_untouched(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config_before = model.config.to_dict()
    compact(model, random_masks(model, 3))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.config.to_dict() == config_before


def test_compact_config_records_structure(model):
    masks = full_masks(
        model,
        hidden=torch.tensor([1.0, 0.0] * 8),
        head=torch.tensor([[1.0, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]),
        mha=torch.tensor([1.0, 0.3, 0.0]),
    )
    masks["intermediate"][1, :10] = 0
    small = compact(model, masks)
    c, orig = small.config, model.config
    assert isinstance(c, CofiConfig)
    assert c.hidden_size == 8
    assert c.layer_num_heads == [2, 0, 0]
    assert c.layer_intermediate_size == [24, 14, 24]
    assert c.attention_head_size == orig.attention_head_size == 4
    assert c.classifier_hidden_size == orig.classifier_hidden_size == 16
    assert small.pooler.out_features == 16 and small.pooler.in_features == 8
    for key in ("num_labels", "id2label", "label2id", "vocab_size", "position_style", "pad_token_id",
                "type_vocab_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        assert getattr(c, key) == getattr(orig, key), key
    assert c is not orig and not small.training


# ---------------------------------------------------------------------------
# named edge cases


def test_heads_all_removed_layer_gate_on(model):
    """Layer 1 keeps its MHA gate but loses every head: the sublayer adds a constant."""
    head = torch.rand(3, 4) + 0.1
    head[1] = 0
    hidden = torch.rand(16) + 0.1
    masks = full_masks(model, head=head, mha=torch.tensor([0.9, 0.6, 0.8]), hidden=hidden)
    small = assert_exact(model, masks)
    layer = small.layers[1]
    assert small.config.layer_num_heads == [4, 0, 4]
    assert layer.attn_out.weight.shape == (16, 0) and layer.query.weight.shape == (0, 16)
    expected = model.layers[1].attn_out.bias * 0.6 * hidden
    torch.testing.assert_close(layer.attn_out.bias, expected)
    assert layer.attn_out.bias.abs().min() > 0


def test_ffn_no_unit_left_layer_gate_on(model):
    inter = torch.rand(3, 24) + 0.1
    inter[2] = 0
    masks = full_masks(model, intermediate=inter, ffn=torch.tensor([0.5, 1.0, 0.7]))
    small = assert_exact(model, masks)
    layer = small.layers[2]
    assert small.config.layer_intermediate_size == [24, 24, 0]
    assert layer.ffn_up.weight.shape == (0, 16) and layer.ffn_down.weight.shape == (16, 0)
    torch.testing.assert_close(layer.ffn_down.bias, model.layers[2].ffn_down.bias * 0.7)


def test_layer_with_both_sublayers_removed(model):
    masks = full_masks(model, mha=torch.tensor([1.0, 0.0, 0.4]), ffn=torch.tensor([0.8, 0.0, 1.0]))
    small = assert_exact(model, masks)
    layer = small.layers[1]
    assert small.config.layer_num_heads[1] == 0 and small.config.layer_intermediate_size[1] == 0
    # The gate removes the bias too; the LayerNorms stay (the masked model normalises x + 0).
    assert torch.all(layer.attn_out.bias == 0) and torch.all(layer.ffn_down.bias == 0)
    torch.testing.assert_close(layer.attn_norm.weight, model.layers[1].attn_norm.weight)


def test_all_layers_removed(model):
    masks = {"mha": torch.zeros(3), "ffn": torch.zeros(3)}
    small = assert_exact(model, masks)
    assert small.config.layer_num_heads == [0, 0, 0]
    assert small.config.layer_intermediate_size == [0, 0, 0]
    assert count_prunable_parameters(small) == 0


@pytest.mark.parametrize("kept", [1, 2, 8, 15])
def test_hidden_dims_removed(model, kept):
    gen = torch.Generator().manual_seed(kept)
    hidden = torch.zeros(16)
    idx = torch.randperm(16, generator=gen)[:kept]
    hidden[idx] = 1.0 - torch.rand(kept, generator=gen)
    small = assert_exact(model, full_masks(model, hidden=hidden))
    assert small.config.hidden_size == kept
    assert small.embeddings.word_embeddings.weight.shape == (50, kept)
    assert small.embeddings.LayerNorm.weight.shape == (kept,)
    assert small.layers[0].query.weight.shape == (16, kept)
    assert small.pooler.weight.shape == (16, kept)


@pytest.mark.parametrize(
    "families",
    [(), ("hidden",), ("head", "intermediate"), ("mha", "ffn"), ("hidden", "head", "ffn")],
    ids=lambda f: "+".join(f) or "none",
)
@pytest.mark.parametrize("missing", ["absent", "None"])
def test_masks_partially_missing(model, families, missing):
    """Only `families` are given; the others are absent from the mapping or None."""
    masks = random_masks(model, seed=7, leave_out=False)
    masks = {k: (v if k in families else None) for k, v in masks.items()}
    if missing == "absent":
        masks = {k: v for k, v in masks.items() if v is not None}
    small = assert_exact(model, masks)
    if not families:  # nothing masked: the compact model is the model
        assert num_params(small) == num_params(model)
        for k, v in model.state_dict().items():
            assert torch.equal(small.state_dict()[k], v), k


def test_binary_masks_exact_and_unscaled(model):
    masks = random_masks(model, 11)
    binary = {k: None if v is None else (v != 0).float() for k, v in masks.items()}
    small = assert_exact(model, binary)
    kept = torch.nonzero(binary["hidden"]).flatten() if binary["hidden"] is not None else slice(None)
    torch.testing.assert_close(small.embeddings.LayerNorm.weight, model.embeddings.LayerNorm.weight[kept])


def test_compact_model_can_be_compacted_again(model):
    """A heterogeneous compact model still takes hidden and layer masks."""
    head = torch.ones(3, 4)
    head[0, :2] = 0
    first = compact(model, random_masks(model, 5) | {"head": head, "mha": None})
    assert first.config.layer_num_heads == [2, 4, 4]
    gen = torch.Generator().manual_seed(0)
    hidden = soft((first.config.hidden_size,), 0.3, gen)
    hidden[0] = 1.0
    masks = {"hidden": hidden, "mha": torch.tensor([0.5, 0.0, 1.0]), "ffn": torch.tensor([1.0, 0.7, 0.0])}
    assert_exact(first, masks)
    with pytest.raises(ValueError, match="one size"):  # no (L, H) head mask fits it
        compact(first, {"head": torch.ones(3, 4)})


# ---------------------------------------------------------------------------
# sparsity bookkeeping


@pytest.mark.parametrize("seed", range(10))
def test_prunable_count_matches_mask_sparsity(model, seed):
    shape = ModelShape.from_config(model.config)
    masks = random_masks(model, seed)
    small = compact(model, masks)
    counted = count_prunable_parameters(small)
    implied = shape.prunable_size * (1 - mask_sparsity(shape, masks))
    assert abs(implied - counted) < 1e-6 * shape.prunable_size
    assert round(implied) == counted

    # With the gates pushed to 0/1, the expected size E is the compact model's size.
    binary = {k: (v != 0).float() for k, v in masks.items() if v is not None}
    assert remaining_size(shape, binary).item() == counted
    assert count_prunable_parameters(compact(model, binary)) == counted


def test_forward_without_masks_and_fewer_parameters(model):
    masks = random_masks(model, 2)
    small = compact(model, masks)
    inputs = make_inputs(model)
    with torch.no_grad():
        logits = small(**inputs, masks=None).logits
        assert torch.equal(logits, small(**inputs).logits)
    assert logits.shape == (B, 3) and torch.isfinite(logits).all()
    assert num_params(small) < num_params(model)
    assert count_prunable_parameters(small) < count_prunable_parameters(model)


def test_train_mode_and_dtype_preserved():
    model = make_model("bert").train()
    small = compact(model, random_masks(model, 1))
    assert small.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in small.parameters())
    assert all(p.requires_grad for p in small.parameters())


# ---------------------------------------------------------------------------
# bad masks


def test_rejects_bad_masks():
    model = make_model("bert")
    with pytest.raises(ValueError, match="shape"):
        compact(model, {"head": torch.ones(3, 5)})
    with pytest.raises(ValueError, match="unknown"):
        compact(model, {"heads": torch.ones(3, 4)})
    with pytest.raises(ValueError, match="every hidden dimension"):
        compact(model, {"hidden": torch.zeros(16)})


def test_compact_model_exports_without_data_dependent_branches():
    """torch.export fails on Python branches that read tensor values; empty sublayers included."""
    model = make_model("roberta")
    head = torch.ones(3, 4)
    head[1] = 0  # layer 1: no head, gate on
    hidden = (torch.arange(16) % 3 != 0).float()
    masks = {"head": head, "ffn": torch.tensor([1.0, 0.5, 0.0]), "hidden": hidden}
    small = compact(model, masks)

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.inner(input_ids, attention_mask, token_type_ids).logits

    inputs = make_inputs(model)
    program = torch.export.export(Logits(small), (), kwargs=inputs, strict=False)
    other = make_inputs(model, seed=5)  # same shapes, other token values
    with torch.no_grad():
        for x in (inputs, other):
            expected = model(**x, masks=masks).logits
            torch.testing.assert_close(program.module()(**x), expected, rtol=0, atol=ATOL)


def test_a_compact_model_alone_reports_its_sparsity():
    """The config keeps the full shape, so sparsity is countable without the masks."""
    from cofi.sparsity import model_sparsity

    model = make_model("bert", seed=5)
    shape = ModelShape.from_config(model.config)
    masks = random_masks(model, seed=5, leave_out=False)
    small = compact(model, masks)
    assert ModelShape.from_config(small.config) == shape
    assert model_sparsity(small) == pytest.approx(mask_sparsity(shape, masks), abs=1e-12)
