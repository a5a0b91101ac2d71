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
    sample_hard_concrete,
)
from cofi.lagrangian import Lagrangian, target_sparsity
from cofi.sparsity import FAMILIES, ModelShape, expected_sparsity, mask_sparsity, remaining_size

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


def test_keep_multiple_rounds_the_kept_count_to_a_multiple():
    torch.manual_seed(1)
    log_alpha = torch.randn(4, 40) * 3
    plain, aligned = deterministic_mask(log_alpha), deterministic_mask(log_alpha, keep_multiple=16)
    for row, p_row, a_row in zip(log_alpha, plain, aligned):
        kept = int((p_row != 0).sum())
        expected = kept if kept == 40 else min(40, round(kept / 16) * 16)
        assert int((a_row != 0).sum()) == expected
        # the survivors are those of largest log α, with their soft values
        assert set(torch.nonzero(a_row).flatten().tolist()) == set(row.argsort(descending=True)[:expected].tolist())
        assert torch.allclose(a_row[a_row != 0], torch.sigmoid(row[a_row != 0] / BETA))
    everything = deterministic_mask(torch.full((1, 20), 5.0), keep_multiple=16)
    assert int((everything != 0).sum()) == 20  # a whole group stays whole
    nearly = deterministic_mask(torch.cat([torch.full((1, 19), 5.0), torch.full((1, 1), -5.0)], 1), keep_multiple=16)
    assert int((nearly != 0).sum()) == 16  # 19 kept → the nearest multiple
    shape = ModelShape(num_layers=2, num_heads=2, head_size=4, hidden_size=24, intermediate_size=40)
    gates = HardConcreteGates(shape, GateConfig(keep_multiple=8))
    with torch.no_grad():
        gates.log_alpha["hidden"].copy_(torch.linspace(-5, 5, 24))
        gates.log_alpha["intermediate"].copy_(torch.linspace(-5, 5, 40).expand(2, 40))
    masks = gates.deterministic()
    assert int((masks["hidden"] != 0).sum()) % 8 == 0
    assert all(int((row != 0).sum()) % 8 == 0 for row in masks["intermediate"])
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
