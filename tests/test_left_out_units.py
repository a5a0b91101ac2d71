"""Heads and FFN units whose mask is 0 are not computed (modeling_cofi.computed_units).

The reference is the same model with every unit computed and multiplied by its
mask (``computed_units`` switched off, as on the meta device): outputs,
gradients of every weight and of the gates' log α, and whole pruning runs must
agree, to float rounding, since leaving a term out of a sum or adding 0 × it
differ only in the order of the additions.
"""

from __future__ import annotations

import pytest
import torch

from cofi import modeling_cofi
from cofi.gates import GateConfig, HardConcreteGates
from cofi.sparsity import ModelShape
from cofi.pruning import PruneConfig
from tests.conftest import FINE_GRID
from tests.test_compact import ARCHS, make_inputs, make_model, random_masks
from tests.test_trainer import make_trainer

TOL = dict(rtol=1e-5, atol=1e-6)


def forward_backward(model, gates: HardConcreteGates, inputs, seed: int) -> tuple[dict, dict]:
    """Outputs and gradients (weights and log α) of one sampled-mask step."""
    model.zero_grad(set_to_none=True)
    gates.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    masks = gates.sample()
    out = model(**inputs, masks=masks, output_hidden_states=True)
    loss = out.logits.logsumexp(-1).sum() + sum(h.pow(2).mean() for h in out.hidden_states)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    grads |= {f"log_alpha.{f}": a.grad for f, a in gates.log_alpha.items()}
    return {"logits": out.logits.detach(), "hidden": [h.detach() for h in out.hidden_states], "masks": masks}, grads


def closing_gates(model, seed: int) -> HardConcreteGates:
    """Gates at log α that sample many exact zeros: half of the FFN units and heads
    mostly off, one layer's attention gate and another's FFN gate mostly off."""
    gen = torch.Generator().manual_seed(seed)
    gates = HardConcreteGates(ModelShape.from_config(model.config), GateConfig())
    with torch.no_grad():
        for family, a in gates.log_alpha.items():
            a.copy_(torch.where(torch.rand(a.shape, generator=gen) < 0.5, -3.0, 3.0))
        gates.log_alpha["mha"][0] = -4.6
        gates.log_alpha["ffn"][-1] = -4.6
        gates.log_alpha["hidden"].fill_(4.6)  # a dense hidden mask: the residual stream is not left out
    return gates


def run(model, seed: int, monkeypatch, dense: bool):
    with monkeypatch.context() as m:
        if dense:
            m.setattr(modeling_cofi, "computed_units", lambda masks: {})
        gates = closing_gates(model, seed)
        return forward_backward(model, gates, make_inputs(model, seed), seed)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("seed", range(6))
def test_sampled_masks_give_the_dense_outputs_and_gradients(arch, seed, monkeypatch):
    model = make_model(arch)
    fast, fast_grads = run(model, seed, monkeypatch, dense=False)
    ref, ref_grads = run(model, seed, monkeypatch, dense=True)
    for family in fast["masks"]:
        assert torch.equal(fast["masks"][family], ref["masks"][family])  # the same draw
    assert (fast["masks"]["intermediate"] == 0).any() and (fast["masks"]["head"] == 0).any()
    torch.testing.assert_close(fast["logits"], ref["logits"], **TOL)
    for h, h_ref in zip(fast["hidden"], ref["hidden"]):
        torch.testing.assert_close(h, h_ref, **TOL)
    for name, g_ref in ref_grads.items():
        g = fast_grads[name]
        if g is None:  # a whole sublayer left out: its dense gradient was exactly 0
            assert torch.count_nonzero(g_ref) == 0, name
        else:
            torch.testing.assert_close(g, g_ref, **TOL, msg=lambda m: f"{name}: {m}")


def test_left_out_units_get_exactly_zero_gradients(monkeypatch):
    """The rows of Q/K/V and of the FFN's up projection, and the columns of the output
    projections, of the units whose mask is 0."""
    model = make_model("bert")
    gates = closing_gates(model, 0)
    _, grads = forward_backward(model, gates, make_inputs(model), seed=0)
    torch.manual_seed(0)
    masks = gates.sample()
    D = model.config.hidden_size // model.config.num_attention_heads
    checked = 0
    for i, layer in enumerate(model.layers):
        off = (masks["intermediate"][i] == 0) | (masks["ffn"][i] == 0)
        g_up = grads[f"layers.{i}.ffn_up.weight"]
        g_down = grads[f"layers.{i}.ffn_down.weight"]
        if g_up is not None:
            assert torch.count_nonzero(g_up[off]) == 0 and torch.count_nonzero(g_down[:, off]) == 0
            assert torch.count_nonzero(g_up[~off]) > 0
            checked += int(off.sum())
        heads_off = ((masks["head"][i] == 0) | (masks["mha"][i] == 0)).repeat_interleave(D)
        g_q = grads[f"layers.{i}.query.weight"]
        if g_q is not None:
            assert torch.count_nonzero(g_q[heads_off]) == 0
            assert torch.count_nonzero(grads[f"layers.{i}.attn_out.weight"][:, heads_off]) == 0
            checked += int(heads_off.sum())
    assert checked > 0


@pytest.mark.parametrize("seed", range(4))
def test_evaluation_masks_give_the_dense_logits(seed, monkeypatch):
    """Evaluation masks: soft survivors, exact zeros, whole rows and layer gates off."""
    model = make_model("roberta")
    inputs = make_inputs(model, seed)
    masks = random_masks(model, seed, leave_out=False)
    with torch.no_grad():
        fast = model(**inputs, masks=masks).logits
        with monkeypatch.context() as m:
            m.setattr(modeling_cofi, "computed_units", lambda masks: {})
            ref = model(**inputs, masks=masks).logits
    torch.testing.assert_close(fast, ref, **TOL)


def test_computed_units_lists_each_layers_kept_heads_and_units():
    masks = {
        "head": torch.tensor([[0.5, 0.0, 1.0], [0.0, 0.0, 0.0]]),
        "mha": torch.tensor([1.0, 1.0]),
        "intermediate": torch.tensor([[0.0, 0.3, 0.0, 0.9], [1.0, 1.0, 1.0, 1.0]]),
        "ffn": torch.tensor([0.7, 0.0]),  # layer 1's FFN gate closed: none of its units computed
        "hidden": torch.tensor([1.0, 0.0]),  # the residual stream is never left out
    }
    computed = modeling_cofi.computed_units(masks)
    assert [k.tolist() for k in computed["heads"]] == [[0, 2], []]
    assert [k.tolist() for k in computed["units"]] == [[1, 3], []]
    assert all(k.dtype == torch.long for k in computed["heads"] + computed["units"])
    assert modeling_cofi.computed_units({"hidden": torch.ones(2)}) == {}
    no_gates = modeling_cofi.computed_units({"intermediate": masks["intermediate"]})
    assert [k.tolist() for k in no_gates["units"]] == [[1, 3], [0, 1, 2, 3]] and "heads" not in no_gates


def test_a_pruning_run_matches_the_dense_masked_computation(task, monkeypatch):
    """Steps in which a whole sublayer is left out give its weights a zero gradient (not
    none), so AdamW moves them as the dense computation did: the final weights and gates
    of two short pruning runs agree."""
    model = dict(FINE_GRID, attention_probs_dropout_prob=0.0)  # the same random draws in both runs

    def fit(dense: bool):
        with monkeypatch.context() as m:
            if dense:
                m.setattr(modeling_cofi, "computed_units", lambda masks: {})
            prune = PruneConfig(target_sparsity=0.7, distill_epochs=0.5, sparsity_warmup_epochs=2,
                                reg_learning_rate=0.1, lambda_2_init=100.0)
            trainer = make_trainer(task, prune=prune, model=model, epochs=4, eval_steps=12)
            with torch.no_grad():
                trainer.pruning.gates.log_alpha["mha"][0] = -4.6  # mostly off from the first pruning step
            left_out = []
            original = modeling_cofi.computed_units

            def spy(masks):
                computed = original(masks)
                if computed:
                    left_out.append(sum(len(k) == 0 for k in computed["heads"]))
                return computed

            m.setattr(modeling_cofi, "computed_units", spy)
            trainer.fit()
            return trainer, left_out

    fast, left_out = fit(dense=False)
    ref, _ = fit(dense=True)
    assert sum(left_out) >= 5  # steps with a whole attention sublayer left out
    for (name, p), (_, p_ref) in zip(fast.model.named_parameters(), ref.model.named_parameters()):
        torch.testing.assert_close(p, p_ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    for family, a in fast.pruning.gates.log_alpha.items():
        torch.testing.assert_close(a, ref.pruning.gates.log_alpha[family], rtol=1e-4, atol=1e-5)
