"""Hard-concrete gates, expected size and the Lagrangian (sections 3–5)."""

import math

import pytest
import torch

from cofi.gates import (
    BETA,
    LIMIT_L,
    LIMIT_R,
    LOG_ALPHA_MAX,
    LOG_ALPHA_MIN,
    GateConfig,
    HardConcreteGates,
    deterministic_mask,
    keep_probability,
    kept_count,
    sample_hard_concrete,
)
from cofi.compact import compact
from cofi.lagrangian import Lagrangian, controlled_sparsity, target_sparsity
from cofi.sparsity import FAMILIES, ModelShape, expected_sparsity, mask_sparsity, model_sparsity, remaining_size
from cofi.pruning import PruneConfig
from tests.conftest import tiny_model

SHAPE = ModelShape(num_layers=3, num_heads=4, head_size=2, hidden_size=8, intermediate_size=16)


def test_sampled_frequency_of_nonzero_matches_keep_probability():
    torch.manual_seed(0)
    log_alpha = torch.tensor([-4.0, -2.0, -1.0, 0.0, 0.5, 1.0, 2.0, 4.0])
    n = 200_000
    z = sample_hard_concrete(log_alpha.expand(n, -1))
    freq = (z > 0).float().mean(0)
    p = keep_probability(log_alpha)
    # binomial standard error ≤ 0.5/sqrt(n) ≈ 0.0011; 5 standard errors
    assert torch.allclose(freq, p, atol=5 * 0.5 / math.sqrt(n))
    # the closed form itself: P(z>0) = P(s > -l/(r-l))
    threshold = -LIMIT_L / (LIMIT_R - LIMIT_L)
    logit_threshold = math.log(threshold / (1 - threshold))
    assert torch.allclose(p, torch.sigmoid(log_alpha - BETA * logit_threshold), atol=1e-6)


def test_samples_are_in_unit_interval_with_exact_zeros_and_ones():
    torch.manual_seed(0)
    z = sample_hard_concrete(torch.zeros(10_000))
    assert z.min() == 0.0 and z.max() == 1.0
    assert ((z > 0) & (z < 1)).any()


def test_samples_are_differentiable_in_log_alpha():
    log_alpha = torch.zeros(100, requires_grad=True)
    sample_hard_concrete(log_alpha).sum().backward()
    assert log_alpha.grad is not None and log_alpha.grad.abs().sum() > 0


def test_deterministic_mask_zeros_the_expected_count_of_smallest_log_alpha():
    torch.manual_seed(0)
    for _ in range(50):
        log_alpha = torch.randn(5, 16) * 3
        z = deterministic_mask(log_alpha)
        for row, zrow in zip(log_alpha, z):
            num_zeros = round(16 - float(keep_probability(row).sum()))
            assert int((zrow == 0).sum()) == num_zeros
            # the zeros are exactly the smallest log α
            assert set(torch.nonzero(zrow == 0).flatten().tolist()) == set(row.argsort()[:num_zeros].tolist())
            # survivors keep a soft value sigmoid(log α / β) in (0, 1)
            kept = zrow != 0
            assert torch.allclose(zrow[kept], torch.sigmoid(row[kept] / BETA))


def uniform_log_alpha(size: int, expected_kept: float) -> torch.Tensor:
    """(1, size) equal log α whose keep probabilities sum to ``expected_kept``."""
    p = expected_kept / size
    return torch.full((1, size), math.log(p / (1 - p)) + BETA * math.log(-LIMIT_L / LIMIT_R))


@pytest.mark.parametrize(
    "expected_kept, multiple, kept",
    [
        (0.4, 16, 0),  # rounds to 0 units: the group goes
        (3.2, 16, 16),  # 3 → up to 16, not down to 0
        (8.4, 16, 16),  # 8 → 16 (the nearest multiple would be 0 or 16; up is 16)
        (16.2, 16, 16),  # a multiple stays
        (17.4, 16, 32),  # 17 → up to 32, not down to 16
        (33.0, 16, 40),  # 48 would exceed the group: capped at its 40 units
        (39.6, 16, 40),  # the whole group stays whole
        (17.4, 1, 17),  # the paper's rule: round(Σ P(z > 0))
        (17.6, 1, 18),
    ],
)
def test_kept_count_rounds_up_to_a_multiple_never_to_zero_and_at_most_the_group(expected_kept, multiple, kept):
    log_alpha = uniform_log_alpha(40, expected_kept)
    assert float(keep_probability(log_alpha).sum()) == pytest.approx(expected_kept, abs=1e-4)
    assert kept_count(log_alpha, multiple).tolist() == [kept]
    assert int((deterministic_mask(log_alpha, multiple) != 0).sum()) == kept


@pytest.mark.parametrize("multiple", [1, 4, 16])
def test_deterministic_mask_keeps_the_rounded_count_of_largest_log_alpha(multiple):
    torch.manual_seed(1)
    log_alpha = torch.empty(6, 40).uniform_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)  # realistic: within the clamp
    z = deterministic_mask(log_alpha, keep_multiple=multiple)
    for row, z_row in zip(log_alpha, z):
        rounded = round(float(keep_probability(row).sum()))
        kept = min(40, math.ceil(rounded / multiple) * multiple)
        assert int((z_row != 0).sum()) == kept
        # the survivors are those of largest log α, with their soft values
        assert set(torch.nonzero(z_row).flatten().tolist()) == set(row.argsort(descending=True)[:kept].tolist())
        assert torch.allclose(z_row[z_row != 0], torch.sigmoid(row[z_row != 0] / BETA))


def test_keep_multiple_applies_to_hidden_dims_and_ffn_units_only():
    shape = ModelShape(num_layers=2, num_heads=6, head_size=4, hidden_size=24, intermediate_size=40)
    gates = HardConcreteGates(shape, GateConfig(keep_multiple=8))
    p_half = BETA * math.log(-LIMIT_L / LIMIT_R)  # log α where P(z>0) = 0.5: symmetric around it, half kept
    with torch.no_grad():
        gates.log_alpha["hidden"].copy_(torch.linspace(-3, 3, 24) + p_half)  # 12 kept of 24 → 16
        gates.log_alpha["intermediate"].copy_(torch.linspace(-3, 3, 40).expand(2, 40) + p_half)  # 20 of 40 → 24
        gates.log_alpha["head"].copy_(torch.linspace(-3, 3, 6).expand(2, 6) + p_half)  # 3 of 6: not rounded to 8
    masks = gates.deterministic()
    assert int((masks["hidden"] != 0).sum()) == 16
    assert [int((row != 0).sum()) for row in masks["intermediate"]] == [24, 24]
    assert [int((row != 0).sum()) for row in masks["head"]] == [3, 3]
    with pytest.raises(ValueError, match="keep_multiple=0"):
        GateConfig(keep_multiple=0)


def test_layer_gate_is_dropped_exactly_when_keep_probability_below_half():
    gates = HardConcreteGates(SHAPE)
    p_half = BETA * math.log(-LIMIT_L / LIMIT_R)  # log α where P(z>0) = 0.5
    with torch.no_grad():
        gates.log_alpha["mha"].copy_(torch.tensor([p_half - 0.01, p_half + 0.01, 3.0]))
        gates.log_alpha["ffn"].copy_(torch.tensor([-3.0, p_half + 0.01, p_half - 0.01]))
    masks = gates.deterministic()
    assert (masks["mha"] != 0).tolist() == [False, True, True]
    assert (masks["ffn"] != 0).tolist() == [False, True, False]


def test_families_can_be_switched_off_for_ablations():
    no_hidden = HardConcreteGates(SHAPE, GateConfig(families=("head", "mha", "intermediate", "ffn")))
    assert set(no_hidden.sample()) == {"head", "mha", "intermediate", "ffn"}
    no_layers = HardConcreteGates(SHAPE, GateConfig(families=("hidden", "head", "intermediate")))
    assert set(no_layers.deterministic()) == {"hidden", "head", "intermediate"}
    with pytest.raises(ValueError, match=r"unknown mask families \['heads'\]"):
        GateConfig(families=("heads",))


def test_mask_shapes_and_clamp():
    gates = HardConcreteGates(SHAPE)
    for family, z in gates.sample().items():
        assert z.shape == SHAPE.mask_shape(family)
    gates.clamp_()
    for a in gates.log_alpha.values():
        assert a.min() >= LOG_ALPHA_MIN and a.max() <= LOG_ALPHA_MAX


def test_expected_size_matches_a_hand_computation():
    shape = ModelShape(num_layers=2, num_heads=2, head_size=3, hidden_size=6, intermediate_size=4)
    keep = {
        "hidden": torch.tensor([1, 1, 1, 0.5, 0.5, 0]),
        "head": torch.tensor([[1.0, 0.5], [0.2, 0.0]]),
        "mha": torch.tensor([1.0, 0.5]),
        "intermediate": torch.tensor([[1, 1, 0, 0.0], [0.5, 0.5, 0.5, 0.5]]),
        "ffn": torch.tensor([0.0, 1.0]),
    }
    hidden = 4.0
    heads = 1.0 * (1.0 + 0.5) + 0.5 * (0.2 + 0.0)
    units = 0.0 * 2 + 1.0 * 2.0
    assert float(remaining_size(shape, keep)) == pytest.approx(hidden * (4 * 3 * heads + 2 * units))
    full = 2 * (4 * 6 * 2 * 3 + 2 * 6 * 4)
    assert shape.prunable_size == full
    assert float(expected_sparsity(shape, keep)) == pytest.approx(1 - hidden * (12 * heads + 2 * units) / full)
    assert float(expected_sparsity(shape, {})) == 0.0


def test_expected_sparsity_of_saturated_gates_equals_mask_sparsity():
    """Gates pushed to 0/1: ŝ equals the sparsity of the deterministic masks."""
    torch.manual_seed(1)
    gates = HardConcreteGates(SHAPE)
    with torch.no_grad():
        for a in gates.log_alpha.values():
            a.copy_(torch.where(torch.rand_like(a) < 0.3, -1e4, 1e4))
    assert float(gates.expected_sparsity().detach()) == pytest.approx(mask_sparsity(SHAPE, gates.deterministic()), abs=1e-6)


def test_target_sparsity_warms_up_linearly_from_prune_start():
    assert target_sparsity(0, 0.6, prune_start=10, warmup_steps=20) == 0.0
    assert target_sparsity(10, 0.6, 10, 20) == 0.0
    assert target_sparsity(20, 0.6, 10, 20) == pytest.approx(0.3)
    assert target_sparsity(30, 0.6, 10, 20) == pytest.approx(0.6)
    assert target_sparsity(100, 0.6, 10, 20) == pytest.approx(0.6)
    assert target_sparsity(10, 0.6, 10, 0) == 0.6


def test_target_sparsity_ramps_from_the_initial_sparsity_of_the_masks():
    assert target_sparsity(0, 0.6, prune_start=10, warmup_steps=20, initial=0.1) == 0.1
    assert target_sparsity(10, 0.6, 10, 20, initial=0.1) == 0.1
    assert target_sparsity(20, 0.6, 10, 20, initial=0.1) == pytest.approx(0.35)
    assert target_sparsity(30, 0.6, 10, 20, initial=0.1) == pytest.approx(0.6)
    assert target_sparsity(20, 0.05, 10, 20, initial=0.1) == pytest.approx(0.075)  # a target below the start: down


def test_a_cubic_ramp_rises_fast_then_slows_to_a_stop_at_the_target():
    # progress p = 0, 1/4, 1/2, 1: 1 - (1 - p)^3 = 0, 37/64, 7/8, 1 of the way from 0.1 to 0.9
    steps = {10: 0.0, 15: 37 / 64, 20: 7 / 8, 30: 1.0, 50: 1.0}
    for step, share in steps.items():
        assert target_sparsity(step, 0.9, 10, 20, initial=0.1, ramp="cubic") == pytest.approx(0.1 + 0.8 * share, abs=1e-12)
    assert target_sparsity(5, 0.9, 10, 20, initial=0.1, ramp="cubic") == 0.1  # before pruning starts
    # the slope: 3x the linear ramp's at the start, 0 at the end
    early = target_sparsity(11, 0.9, 10, 20, ramp="cubic") - target_sparsity(10, 0.9, 10, 20, ramp="cubic")
    late = target_sparsity(30, 0.9, 10, 20, ramp="cubic") - target_sparsity(29, 0.9, 10, 20, ramp="cubic")
    assert early == pytest.approx(3 * 0.9 / 20, rel=0.1) and late == pytest.approx(0.9 * (1 / 20) ** 3, abs=1e-12)
    with pytest.raises(ValueError, match=r"ramp='cosine'; allowed: linear, cubic"):
        PruneConfig(target_sparsity=0.9, ramp="cosine")


@pytest.mark.parametrize("start, target", [(0.1, 0.5), (0.8, 0.5)])
def test_lagrangian_multipliers_push_sparsity_toward_target(start, target):
    """λ ascends, log α descends: ŝ must move toward the target from either side."""
    torch.manual_seed(0)
    gates = HardConcreteGates(SHAPE, GateConfig(init_log_alpha=dict.fromkeys(FAMILIES, 0.0)))
    # set every gate so that ŝ starts at `start`
    with torch.no_grad():
        lo, hi = -10.0, 10.0
        for _ in range(60):
            mid = (lo + hi) / 2
            for a in gates.log_alpha.values():
                a.fill_(mid)
            if float(gates.expected_sparsity().detach()) > start:
                lo = mid
            else:
                hi = mid
    lagrangian = Lagrangian()
    gate_opt = torch.optim.AdamW(gates.parameters(), lr=0.05, weight_decay=0.0)
    lambda_opt = lagrangian.make_optimizer(0.05)
    first = float(gates.expected_sparsity().detach())
    assert first == pytest.approx(start, abs=1e-3)
    for step in range(300):
        loss = lagrangian(gates.expected_sparsity(), target)
        gate_opt.zero_grad(), lambda_opt.zero_grad()
        loss.backward()
        gate_opt.step(), lambda_opt.step()
        if step == 0:
            # λ1 moved in the direction of the gap (ascent), λ2 grew
            assert math.copysign(1, float(lagrangian.lambda_1.detach())) == math.copysign(1, start - target)
            assert float(lagrangian.lambda_2.detach()) > 0
    final = float(gates.expected_sparsity().detach())
    assert abs(final - target) < abs(first - target) / 5


def realistic_gates(seed: int, keep_multiple: int) -> tuple[HardConcreteGates, torch.nn.Module]:
    """Gates of a 3-layer tiny model with log α as training leaves them (within the
    clamp, not saturated): 1 of 3 attention and 2 of 3 FFN layer gates closed."""
    model = tiny_model(seed=0, num_hidden_layers=3).eval()
    gates = HardConcreteGates(ModelShape.from_config(model.config), GateConfig(keep_multiple=keep_multiple))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for a in gates.log_alpha.values():
            a.uniform_(LOG_ALPHA_MIN, LOG_ALPHA_MAX, generator=generator)
        gates.log_alpha["mha"][0] = LOG_ALPHA_MIN  # closed, as the clamp leaves them
        gates.log_alpha["ffn"][:2] = LOG_ALPHA_MIN
    return gates, model


@pytest.mark.parametrize("seed", range(5))
def test_controlled_sparsity_is_the_masks_and_the_compact_models_with_realistic_gates(seed):
    """docs/method.md's claim (section 5), with closed layer gates and keep_multiple: the value the
    Lagrangian sees, the deterministic masks' sparsity and the compact model's
    counted sparsity agree; the gradient is the smooth ŝ's."""
    gates, model = realistic_gates(seed, keep_multiple=4)
    masks = gates.deterministic()
    shipped = gates.deterministic_sparsity()  # float64, from the kept counts
    assert float(shipped) == pytest.approx(mask_sparsity(gates.shape, masks), abs=1e-12)
    assert model_sparsity(compact(model, masks)) == pytest.approx(float(shipped), abs=1e-12)

    controlled = controlled_sparsity(gates.expected_sparsity(), shipped)
    assert float(controlled.detach()) == pytest.approx(float(shipped), abs=1e-6)  # float32 of the exact value
    controlled.backward()
    straight_through = {f: a.grad.clone() for f, a in gates.log_alpha.items()}
    gates.zero_grad()
    gates.expected_sparsity().backward()
    for family, a in gates.log_alpha.items():
        assert torch.equal(straight_through[family], a.grad), family
        assert a.grad.abs().min() > 0  # every unit, in closed layers too, feels the constraint


def test_smooth_expected_sparsity_counts_closed_layer_gates():
    """Why ŝ only lends its gradient: every unit open, 1 of 3 attention and 2 of 3 FFN
    layer gates closed at the clamp, each still counting P(z>0) ≈ 0.047 in ŝ."""
    gates, _ = realistic_gates(0, keep_multiple=1)
    with torch.no_grad():
        for family in ("hidden", "head", "intermediate"):
            gates.log_alpha[family].fill_(LOG_ALPHA_MAX)
        gates.log_alpha["mha"][1:] = gates.log_alpha["ffn"][2] = LOG_ALPHA_MAX
    closed = float(keep_probability(torch.tensor(LOG_ALPHA_MIN)))
    assert closed == pytest.approx(0.047, abs=0.001)
    assert float(gates.deterministic_sparsity()) == pytest.approx(0.5)  # 3 of 6 equal sublayers removed
    # the closed sublayers' weight in ŝ, less the open units' own P(z>0) < 1
    assert float(gates.expected_sparsity().detach()) == pytest.approx(0.5 - 0.5 * closed, abs=0.01)
