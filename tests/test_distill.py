"""Tests of cofi.distill against small hand-written reference implementations."""

from __future__ import annotations

import math

import pytest
import torch

from cofi.distill import (
    DistillationLoss,
    LayerDistillLoss,
    PredictionDistillLoss,
    default_teacher_layers,
    existing_layers,
    existing_layers_of_structure,
    as_match_list,
    match_layers,
)

# --------------------------------------------------------------------------- #
# Reference implementations (plain, loop-based)
# --------------------------------------------------------------------------- #


def ref_kl(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    p_t = torch.softmax(teacher.double() / T, -1)
    log_p_t = torch.log_softmax(teacher.double() / T, -1)
    log_p_s = torch.log_softmax(student.double() / T, -1)
    return (p_t * (log_p_t - log_p_s)).sum() * T * T / student.shape[0]


def ref_distance(s: torch.Tensor, t: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """Mean squared difference over the real tokens (loop over the batch) and channels."""
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        real = attention_mask[b].bool()
        total += (s[b, real].double() - t[b, real].double()).pow(2).sum().item()
        count += int(real.sum()) * s.shape[-1]
    return total / count


def ref_match(d: list[list[float]], exists: list[bool], monotone: bool) -> list[int | None]:
    n_t, n_s = len(d), len(d[0])
    out: list[int | None] = [None] * n_t
    bound = n_s
    rows = range(n_t - 1, -1, -1) if monotone else range(n_t)
    for i in rows:
        best = None
        for j in range(n_s):
            if exists[j] and (not monotone or j < bound) and (best is None or d[i][j] < d[i][best]):
                best = j
        out[i] = best
        if monotone and best is not None:
            bound = best
    return out


# --------------------------------------------------------------------------- #
# Prediction loss
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("T", [1.0, 2.0, 5.0])
def test_prediction_kl_matches_reference(T):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 3, generator=g) * 3, torch.randn(7, 3, generator=g) * 3
    loss = PredictionDistillLoss(T)(s, t)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(ref_kl(s, t, T).item(), rel=1e-5)
    assert loss.item() > 0


def test_prediction_zero_when_equal_and_teacher_detached():
    t = torch.randn(4, 5, requires_grad=True)
    s = t.detach().clone().requires_grad_(True)
    loss = PredictionDistillLoss(2.0)(s, t)
    assert abs(loss.item()) < 1e-6
    loss.backward()
    assert t.grad is None


def test_prediction_gradient_direction():
    T = 2.0
    s = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[-1.0, 0.0, 2.0], [1.0, 0.0, 0.0]])
    loss_fn = PredictionDistillLoss(T)
    loss = loss_fn(s, t)
    loss.backward()
    # d(T² KL)/ds = T (p_s − p_t) / B
    expected = T * (torch.softmax(s.detach() / T, -1) - torch.softmax(t / T, -1)) / 2
    torch.testing.assert_close(s.grad, expected)
    with torch.no_grad():
        stepped = s - 1.0 * s.grad
    assert loss_fn(stepped, t) < loss


def test_prediction_regression_uses_mse():
    s, t = torch.tensor([[0.5], [2.0], [-1.0]]), torch.tensor([[1.0], [2.0], [1.0]])
    # the KL of a single logit is always 0: what the reference code optimises
    assert ref_kl(s, t, 2.0).item() == 0.0
    loss = PredictionDistillLoss(2.0)(s, t)
    assert loss.item() == pytest.approx(((0.5 - 1.0) ** 2 + 0 + 4.0) / 3)


def test_prediction_bf16_inputs_give_fp32():
    s, t = torch.randn(3, 4).bfloat16(), torch.randn(3, 4).bfloat16()
    loss = PredictionDistillLoss(2.0)(s, t)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_kl(s.float(), t.float(), 2.0).item(), rel=1e-5)


@pytest.mark.parametrize("T", [0, -1.5, float("nan"), float("inf")])
def test_prediction_bad_temperature(T):
    with pytest.raises(ValueError, match=r"temperature") as info:
        PredictionDistillLoss(T)
    assert repr(T) in str(info.value) and "> 0" in str(info.value)


def test_prediction_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        PredictionDistillLoss(2.0)(torch.zeros(2, 3), torch.zeros(2, 2))


# --------------------------------------------------------------------------- #
# Existing layers
# --------------------------------------------------------------------------- #


def structure_of(masks: dict[str, torch.Tensor]) -> tuple[list[int], list[int]]:
    """What compaction keeps: heads (and units) survive only under a non-zero layer gate."""
    heads = ((masks["head"] != 0).sum(-1) * (masks["mha"] != 0)).tolist()
    width = ((masks["intermediate"] != 0).sum(-1) * (masks["ffn"] != 0)).tolist()
    return heads, width


def edge_case_masks() -> dict[str, torch.Tensor]:
    L, H, Fw = 6, 3, 4
    head, mha = torch.ones(L, H), torch.ones(L)
    inter, ffn = torch.ones(L, Fw), torch.ones(L)
    # 0: everything kept
    head[1] = 0; ffn[1] = 0                        # 1: MHA gate on, no head; FFN gate off -> gone
    mha[2] = 0; inter[2] = 0; inter[2, 1] = 0.3    # 2: no MHA; one soft FFN unit -> exists
    head[3] = 0; head[3, 2] = 1; inter[3] = 0      # 3: one head; FFN gate on, no unit -> exists
    mha[4] = 0; ffn[4] = 0                         # 4: both layer gates off (units kept) -> gone
    head[5] = 0; inter[5] = 0                      # 5: both gates on, nothing inside -> gone
    return {"head": head, "mha": mha, "intermediate": inter, "ffn": ffn, "hidden": torch.ones(8)}


def test_existing_layers_edge_cases_and_structure_agree():
    masks = edge_case_masks()
    exists = existing_layers(masks, 6)
    assert exists.dtype == torch.bool
    assert exists.tolist() == [True, False, True, True, False, False]
    assert torch.equal(exists, existing_layers_of_structure(*structure_of(masks)))


def test_existing_layers_agree_on_random_masks():
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        L = 5
        masks = {
            "head": (torch.rand(L, 2, generator=g) < 0.4).float(),
            "mha": (torch.rand(L, generator=g) < 0.6).float(),
            "intermediate": (torch.rand(L, 3, generator=g) < 0.3).float() * 0.7,
            "ffn": (torch.rand(L, generator=g) < 0.6).float(),
        }
        assert torch.equal(existing_layers(masks, L), existing_layers_of_structure(*structure_of(masks)))


def test_existing_layers_missing_families_count_as_kept():
    assert existing_layers(None, 3).tolist() == [True] * 3
    assert existing_layers({"ffn": torch.zeros(3), "head": None}, 3).tolist() == [True] * 3  # attention kept
    only_heads = {"head": torch.tensor([[0.0, 0.0], [1.0, 0.0]]), "ffn": torch.zeros(2)}
    assert existing_layers(only_heads, 2).tolist() == [False, True]


def test_existing_layers_bad_shape():
    with pytest.raises(ValueError, match="head"):
        existing_layers({"head": torch.ones(4)}, 4)
    with pytest.raises(ValueError, match="entries"):
        existing_layers_of_structure([1, 2], [3])


# --------------------------------------------------------------------------- #
# Matching
# --------------------------------------------------------------------------- #


def test_match_free_uses_layer_indices_not_sorted_positions():
    d = torch.tensor([[0.5, 0.1, 0.9]])
    exists = torch.tensor([True, False, True])
    # The reference code masks the argsort [1, 0, 2] with exists -> picks removed layer 1.
    assert match_layers(d, exists, monotone=False) == [0]
    assert match_layers(d, exists, monotone=True) == [0]


def test_match_monotone_known_answer():
    d = torch.tensor(
        [
            [0.9, 0.8, 0.7, 0.1],  # free: 3
            [0.6, 0.2, 0.9, 0.9],  # free: 1
            [0.9, 0.9, 0.1, 0.3],  # free: 2
        ]
    )
    assert match_layers(d, None, monotone=False) == [3, 1, 2]
    assert match_layers(d, None, monotone=True) == [0, 1, 2]


def test_match_none_when_nothing_qualifies():
    d = torch.rand(3, 4)
    assert match_layers(d, torch.zeros(4, dtype=torch.bool), monotone=False) == [None] * 3
    assert match_layers(d, torch.zeros(4, dtype=torch.bool), monotone=True) == [None] * 3
    # monotone runs out of lower layers: only layer 1 exists
    only_one = torch.tensor([False, True, False, False])
    assert match_layers(d, only_one, monotone=True) == [None, None, 1]
    assert match_layers(d, only_one, monotone=False) == [1, 1, 1]


def test_match_random_against_reference():
    g = torch.Generator().manual_seed(2)
    for _ in range(200):
        n_t, n_s = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        d = torch.rand(n_t, n_s, generator=g)
        exists = torch.rand(n_s, generator=g) < 0.6
        for monotone in (False, True):
            assert match_layers(d, exists, monotone) == ref_match(d.tolist(), exists.tolist(), monotone)


def test_match_ties_nan_and_no_grad():
    nan = float("nan")
    d = torch.tensor([[0.2, 0.2, nan], [nan, nan, nan]], requires_grad=True)
    assert match_layers(d, torch.tensor([False, True, True]), monotone=False) == [1, 1]
    assert match_layers(d[:1], None, monotone=False) == [0]


# --------------------------------------------------------------------------- #
# Layer loss
# --------------------------------------------------------------------------- #

B, T, C = 3, 5, 8


def make_attention_mask() -> torch.Tensor:
    m = torch.ones(B, T, dtype=torch.long)
    m[0, 3:] = 0
    m[2, 1:] = 0
    return m


def make_states(plan: dict[int, tuple[int | None, float]], n_student: int, seed: int = 0):
    """Teacher: 6 layers. Student layer j = teacher layer plan[j][0] + noise of scale plan[j][1]."""
    g = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(B, T, C, generator=g) for _ in range(7)]
    student = [torch.randn(B, T, C, generator=g)]
    for j in range(1, n_student + 1):
        source, noise = plan.get(j, (None, 0.0))
        base = torch.randn(B, T, C, generator=g) if source is None else teacher[source]
        student.append(base + noise * torch.randn(B, T, C, generator=g))
    return student, teacher


def run_layer(loss_fn: LayerDistillLoss, *args):
    """The loss and its matches as a list: 1-based student layers, None for no match."""
    loss, columns = loss_fn(*args)
    return loss, as_match_list(columns, base=1)


def ref_layer_loss(loss_fn: LayerDistillLoss, student, teacher, mask, matches) -> float:
    total = 0.0
    with torch.no_grad():
        for i, j in zip(loss_fn.teacher_layers, matches):
            if j is not None:
                total += ref_distance(loss_fn.transform(student[j]), teacher[i], mask)
    return total


# Student 1 ≈ t2 (loose), 2 ≈ t4, 3 ≈ t2 (tight), 4 ≈ t6.
PLAN = {1: (2, 0.3), 2: (4, 0.05), 3: (2, 0.01), 4: (6, 0.05)}


def test_layer_free_finds_known_matches():
    student, teacher = make_states(PLAN, 4)
    mask = make_attention_mask()
    loss_fn = LayerDistillLoss(C, [2, 4, 6], matching="dynamic")
    loss, matches = run_layer(loss_fn, student, teacher, mask, torch.ones(4, dtype=torch.bool))
    assert matches == [3, 2, 4]  # 1-based student layers
    assert loss.item() == pytest.approx(ref_layer_loss(loss_fn, student, teacher, mask, matches), rel=1e-5)
    assert 0 < loss.item() < 0.01


def test_layer_monotone_known_matches():
    student, teacher = make_states(PLAN, 4)
    mask = make_attention_mask()
    loss_fn = LayerDistillLoss(C, [2, 4, 6], matching="monotone")
    loss, matches = run_layer(loss_fn, student, teacher, mask, None)
    # t6 -> s4; t4 -> below 4: s2; t2 -> below 2: s1 (the free choice s3 would break the order)
    assert matches == [1, 2, 4]
    assert loss.item() == pytest.approx(ref_layer_loss(loss_fn, student, teacher, mask, matches), rel=1e-5)


def test_layer_fixed_matching_ignores_distances():
    student, teacher = make_states(PLAN, 4)
    mask = make_attention_mask()
    # the student has 4 layers; teacher layers 2, 4, 6 always go to student layers 1, 2, 4
    loss_fn = LayerDistillLoss(C, [2, 4, 6], matching="fixed", student_layers=[1, 2, 4])
    loss, matches = run_layer(loss_fn, student, teacher, mask, None)
    assert matches == [1, 2, 4]
    assert loss.item() == pytest.approx(ref_layer_loss(loss_fn, student, teacher, mask, matches), rel=1e-5)
    _, matches = run_layer(loss_fn, student, teacher, mask, torch.tensor([True, False, True, True]))
    assert matches == [1, None, 4]  # a removed layer loses its teacher layer; no other takes it
    default = LayerDistillLoss(C, [2, 4], matching="fixed")  # same index: t2 → s2, t4 → s4
    assert run_layer(default, student, teacher, mask, None)[1] == [2, 4]
    with pytest.raises(ValueError, match="matching='closest'"):
        LayerDistillLoss(C, [2], matching="closest")
    with pytest.raises(ValueError, match="need matching='fixed'"):
        LayerDistillLoss(C, [2, 4], student_layers=[1, 2])


def test_layer_skips_removed_best_layer():
    student, teacher = make_states(PLAN, 4)
    mask = make_attention_mask()
    loss_fn = LayerDistillLoss(C, [2, 4, 6], matching="dynamic")
    exists = torch.tensor([True, True, False, True])  # s3, the best match of t2, is gone
    loss, matches = run_layer(loss_fn, student, teacher, mask, exists)
    assert matches == [1, 2, 4]
    assert loss.item() == pytest.approx(ref_layer_loss(loss_fn, student, teacher, mask, matches), rel=1e-5)


@pytest.mark.parametrize("matching", ["dynamic", "monotone", "fixed"])
def test_layer_no_match_at_all_is_finite_zero(matching):
    student, teacher = make_states(PLAN, 4)
    student = [s.requires_grad_(True) for s in student]
    loss_fn = LayerDistillLoss(C, [2, 4, 6], matching=matching)
    loss, matches = run_layer(loss_fn, student, teacher, make_attention_mask(), torch.zeros(4, dtype=torch.bool))
    assert matches == [None, None, None]
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.count_nonzero(loss_fn.transform.weight.grad) == 0


def test_layer_monotone_runs_out_of_lower_layers():
    student, teacher = make_states(PLAN, 4)
    mask = make_attention_mask()
    loss_fn = LayerDistillLoss(C, [2, 4, 6], matching="monotone")
    loss, matches = run_layer(loss_fn, student, teacher, mask, torch.tensor([False, False, False, True]))
    assert matches == [None, None, 4]
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(ref_distance(student[4], teacher[6], mask), rel=1e-5)


def test_layer_padding_does_not_matter():
    student, teacher = make_states(PLAN, 4)
    mask = make_attention_mask()
    loss_fn = LayerDistillLoss(C, [2, 4, 6], matching="dynamic")
    loss, matches = run_layer(loss_fn, student, teacher, mask, None)
    pad = (mask == 0).unsqueeze(-1)
    noisy_s = [s.masked_fill(pad, 1e3) for s in student]
    noisy_t = [t.masked_fill(pad, -1e3) for t in teacher]
    loss2, matches2 = run_layer(loss_fn, noisy_s, noisy_t, mask, None)
    assert matches2 == matches
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)
    # one unpadded example alone: same as the padded batch restricted to its real tokens
    one, _ = loss_fn([s[:1, :3] for s in noisy_s], [t[:1, :3] for t in noisy_t], None, None)
    ref, _ = loss_fn([s[:1] for s in noisy_s], [t[:1] for t in noisy_t], mask[:1], None)
    assert one.item() == pytest.approx(ref.item(), rel=1e-6)


def test_layer_identity_init_equal_states_zero_loss():
    _, teacher = make_states({}, 0)
    loss_fn = LayerDistillLoss(C, [2, 4, 6], matching="monotone")
    torch.testing.assert_close(loss_fn.transform.weight, torch.eye(C))
    assert torch.count_nonzero(loss_fn.transform.bias) == 0
    loss, matches = run_layer(loss_fn, teacher, teacher, None, None)
    assert matches == [2, 4, 6]
    assert loss.item() == 0.0


def test_layer_gradients_reach_matched_layers_and_map_only():
    student, teacher = make_states(PLAN, 4)
    student = [s.clone().requires_grad_(True) for s in student]
    teacher = [t.clone().requires_grad_(True) for t in teacher]
    loss_fn = LayerDistillLoss(C, [2, 4, 6], matching="dynamic")
    loss, matches = run_layer(loss_fn, student, teacher, make_attention_mask(), None)
    loss.backward()
    assert matches == [3, 2, 4]
    for j in range(5):
        grad = student[j].grad
        has = grad is not None and torch.count_nonzero(grad) > 0
        assert has == (j in matches), j
    assert all(t.grad is None for t in teacher)
    assert torch.count_nonzero(loss_fn.transform.weight.grad) > 0


def test_layer_fp32_under_autocast():
    student, teacher = make_states(PLAN, 4)
    loss_fn = LayerDistillLoss(C, [2, 4, 6], matching="dynamic")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, matches = run_layer(loss_fn, [s.bfloat16() for s in student], [t.bfloat16() for t in teacher], None, None)
    assert loss.dtype == torch.float32 and matches == [3, 2, 4]


def test_restrict_input_matches_zero_padded_full_states():
    student, teacher = make_states(PLAN, 4)
    mask = make_attention_mask()
    kept = torch.tensor([True, False, True, True, False, True, False, True])
    student = [s * kept for s in student]  # a masked model: pruned hidden dims are 0
    loss_fn = LayerDistillLoss(C, [2, 4, 6], matching="monotone")
    with torch.no_grad():  # a trained, non-identity map
        loss_fn.transform.weight.add_(0.1 * torch.randn(C, C))
        loss_fn.transform.bias.add_(0.1 * torch.randn(C))
    before = loss_fn.transform.weight.clone()
    full, full_matches = run_layer(loss_fn, student, teacher, mask, None)
    compact = [s[..., kept] for s in student]
    for kept_dims in (kept, kept.nonzero().squeeze(1)):
        small = loss_fn.restrict_input(kept_dims)
        assert small.transform.in_features == int(kept.sum()) and small.transform.out_features == C
        loss, matches = run_layer(small, compact, teacher, mask, None)
        assert matches == full_matches
        assert loss.item() == pytest.approx(full.item(), rel=1e-6)
    assert torch.equal(loss_fn.transform.weight, before)  # the original is untouched
    with pytest.raises(TypeError):
        loss_fn.restrict_input(kept.float())


def test_layer_bad_arguments():
    with pytest.raises(ValueError, match="strictly increasing"):
        LayerDistillLoss(C, [4, 2], matching="dynamic")
    with pytest.raises(ValueError, match="strictly increasing"):
        LayerDistillLoss(C, [0, 2], matching="dynamic")
    student, teacher = make_states(PLAN, 4)
    with pytest.raises(ValueError, match="teacher hidden"):
        LayerDistillLoss(C, [2, 7], matching="dynamic")(student, teacher, None, None)


def test_default_teacher_layers():
    assert default_teacher_layers(12) == [3, 6, 9, 12]
    assert default_teacher_layers(6) == [2, 4, 6]
    assert default_teacher_layers(1) == [1]
    assert default_teacher_layers(12, count=6) == [2, 4, 6, 8, 10, 12]
    with pytest.raises(ValueError, match="count"):
        default_teacher_layers(6, count=7)


# --------------------------------------------------------------------------- #
# Total
# --------------------------------------------------------------------------- #


def test_distillation_weighting():
    student, teacher = make_states(PLAN, 4)
    s_logits, t_logits = torch.randn(B, 3, requires_grad=True), torch.randn(B, 3)
    pred_fn = PredictionDistillLoss(2.0)
    layer_fn = LayerDistillLoss(C, [2, 4, 6], matching="dynamic")
    total = DistillationLoss(pred_fn, layer_fn, 0.3)
    parts = total(s_logits, t_logits, student, teacher, make_attention_mask())
    assert set(parts) == {"pred", "layer", "distill"}
    pred, layer = pred_fn(s_logits, t_logits), layer_fn(student, teacher, make_attention_mask(), None)[0]
    assert parts["pred"].item() == pytest.approx(pred.item())
    assert parts["layer"].item() == pytest.approx(layer.item())
    assert parts["distill"].item() == pytest.approx(0.3 * pred.item() + 0.7 * layer.item())
    parts["distill"].backward()
    assert s_logits.grad is not None and layer_fn.transform.weight.grad is not None

    total(s_logits, t_logits, student, teacher, None, torch.tensor([True, True, False, True]))
    assert total.last_matches == [1, 2, 4]
    with pytest.raises(ValueError, match="student_hidden"):
        total(s_logits, t_logits)

    only_pred = DistillationLoss(pred_fn, None, 0.3)(s_logits, t_logits)
    assert only_pred["distill"].item() == pytest.approx(pred.item())
    assert only_pred["layer"].item() == 0.0


@pytest.mark.parametrize("w", [-0.1, 1.5, float("nan")])
def test_distillation_bad_weight(w):
    with pytest.raises(ValueError, match=r"prediction_weight must be in \[0, 1\]") as info:
        DistillationLoss(PredictionDistillLoss(2.0), None, w)
    assert repr(w) in str(info.value)


def test_end_to_end_with_masked_model():
    """Hidden states of a masked CofiForSequenceClassification, then a compact-width check."""
    from cofi import CofiConfig, CofiForSequenceClassification

    torch.manual_seed(0)
    cfg = CofiConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=12, max_position_embeddings=16, num_labels=3)
    student, teacher = CofiForSequenceClassification(cfg).eval(), CofiForSequenceClassification(cfg).eval()
    ids = torch.randint(1, 50, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    masks = {"hidden": (torch.arange(16) % 3 != 0).float(), "mha": torch.tensor([1.0, 0.0, 1.0, 1.0]),
             "head": torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0]]),
             "ffn": torch.tensor([1.0, 0.0, 0.0, 1.0]), "intermediate": torch.ones(4, 12)}
    exists = existing_layers(masks, 4)
    assert exists.tolist() == [True, False, False, True]
    s_out = student(ids, mask, masks=masks, output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(ids, mask, output_hidden_states=True)
    layer_fn = LayerDistillLoss(16, default_teacher_layers(4), matching="dynamic")
    loss_fn = DistillationLoss(PredictionDistillLoss(2.0), layer_fn, 0.5)
    parts = loss_fn(s_out.logits, t_out.logits, s_out.hidden_states, t_out.hidden_states, mask, exists)
    assert all(j in (1, 4) for j in loss_fn.last_matches)
    parts["distill"].backward()
    assert torch.isfinite(loss_fn.layer.transform.weight.grad).all()

    kept = masks["hidden"] != 0
    small = loss_fn.layer.restrict_input(kept)
    compact_hidden = [h.detach()[..., kept] for h in s_out.hidden_states]
    full, _ = loss_fn.layer([h.detach() for h in s_out.hidden_states], t_out.hidden_states, mask, exists)
    sliced, _ = small(compact_hidden, t_out.hidden_states, mask, exists)
    assert sliced.item() == pytest.approx(full.item(), rel=1e-6)
