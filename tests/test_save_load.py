"""save_model / load_model: exact round trips, remote-code loading without this
project installed, empty sublayers, and atomic replacement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import Tensor

import cofi
from cofi import CofiConfig, CofiForSequenceClassification
from cofi.compact import compact, load_model, save_model

REPO = Path(cofi.__file__).resolve().parent.parent
B, T = 3, 8


def make_model(arch: str, seed: int = 0) -> CofiForSequenceClassification:
    style = {
        "bert": dict(position_style="absolute", type_vocab_size=2, pad_token_id=0),
        "roberta": dict(position_style="padding_offset", type_vocab_size=1, pad_token_id=1),
    }[arch]
    config = CofiConfig(
        vocab_size=50, hidden_size=12, num_hidden_layers=3, num_attention_heads=3,
        intermediate_size=16, max_position_embeddings=T + 8, num_labels=2,
        id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1}, **style,
    )
    model = CofiForSequenceClassification(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))  # non-identity LayerNorms
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def make_inputs(model: CofiForSequenceClassification) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, 50, (B, T), generator=gen)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, 5:] = 0
    input_ids[attention_mask == 0] = model.config.pad_token_id
    token_type_ids = torch.randint(0, model.config.type_vocab_size, (B, T), generator=gen)
    return dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


def heterogeneous(arch: str) -> CofiForSequenceClassification:
    """Compact model with every kind of empty sublayer and a narrower residual stream.

    layer 0: 2 heads, FFN gate on but no unit left (bias only)
    layer 1: MHA gate on but no head left (bias only), 5 FFN units
    layer 2: both sublayers gated off (0 heads, 0 units, zero biases)
    """
    model = make_model(arch)
    head = torch.tensor([[0.7, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    intermediate = torch.zeros(3, 16)
    intermediate[1, :5] = torch.linspace(0.2, 1.0, 5)
    masks = {
        "hidden": torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.9, 1.0, 1.0, 0.3, 0.0, 1.0, 1.0]),
        "head": head,
        "mha": torch.tensor([1.0, 0.6, 0.0]),
        "intermediate": intermediate,
        "ffn": torch.tensor([0.8, 1.0, 0.0]),
    }
    small = compact(model, masks)
    assert small.config.layer_num_heads == [2, 0, 0]
    assert small.config.layer_intermediate_size == [0, 5, 0]
    return small


def logits(model, inputs) -> Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; avoids OpenMP contention on busy machines
    yield
    torch.set_num_threads(threads)


MODELS = {
    "bert_full": lambda: make_model("bert"),
    "bert_heterogeneous": lambda: heterogeneous("bert"),
    "roberta_heterogeneous": lambda: heterogeneous("roberta"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[CofiForSequenceClassification, Path]]:
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, build in MODELS.items():
        model = build()
        out[name] = (model, save_model(model, root / name))
    return out


# ---------------------------------------------------------------------------
# in-process round trip


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_exact(saved, name):
    model, path = saved[name]
    loaded = load_model(path)
    assert type(loaded) is CofiForSequenceClassification and not loaded.training
    inputs = make_inputs(model)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))
    # every tensor, zero-size ones included, comes back with its shape and values
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert restored[key].shape == original[key].shape, key
        assert torch.equal(restored[key], original[key]), key
    for key in ("hidden_size", "layer_num_heads", "layer_intermediate_size", "attention_head_size",
                "classifier_hidden_size", "id2label", "label2id", "position_style"):
        assert getattr(loaded.config, key) == getattr(model.config, key), key


def test_empty_sublayers_survive(saved):
    model, path = saved["bert_heterogeneous"]
    loaded = load_model(path)
    assert loaded.layers[0].ffn_up.weight.shape == (0, 9)
    assert loaded.layers[1].query.weight.shape == (0, 9)
    assert loaded.layers[1].attn_out.weight.shape == (9, 0)
    # bias-only sublayers keep their constant, gated-off ones their zeros
    assert loaded.layers[1].attn_out.bias.abs().min() > 0
    assert torch.equal(loaded.layers[1].attn_out.bias, model.layers[1].attn_out.bias)
    assert torch.all(loaded.layers[2].attn_out.bias == 0) and torch.all(loaded.layers[2].ffn_down.bias == 0)


def test_directory_contents(saved):
    model, path = saved["bert_heterogeneous"]
    assert sorted(os.listdir(path)) == sorted(
        ["config.json", "model.safetensors", "configuration_cofi.py", "modeling_cofi.py"]
    )
    config = json.loads((path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_cofi.CofiConfig",
        "AutoModelForSequenceClassification": "modeling_cofi.CofiForSequenceClassification",
    }
    # the structure is written out, not left to defaults derived from hidden_size
    assert config["model_type"] == "cofi_bert"
    assert config["hidden_size"] == 9 and config["attention_head_size"] == 4
    assert config["classifier_hidden_size"] == 12
    assert config["layer_num_heads"] == [2, 0, 0] and config["layer_intermediate_size"] == [0, 5, 0]
    for source in ("configuration_cofi.py", "modeling_cofi.py"):
        assert (path / source).read_bytes() == (REPO / "cofi" / source).read_bytes()


def test_registration_is_scoped(saved, tmp_path):
    """Saving leaves no global Auto-class registration and no auto_map on the live config."""
    assert CofiForSequenceClassification._auto_class is None
    assert CofiConfig._auto_class is None
    model, _ = saved["bert_full"]
    assert "auto_map" not in vars(model.config)
    model.config.auto_map = {"AutoConfig": "custom.Config"}  # a user's own auto_map is restored
    save_model(model, tmp_path / "m")
    assert model.config.auto_map == {"AutoConfig": "custom.Config"}
    del model.config.auto_map


# ---------------------------------------------------------------------------
# remote code, in an interpreter where the project cannot be imported

REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, os, sys

    repo = os.path.realpath(sys.argv[1])
    jobs = json.load(open(sys.argv[2]))

    # Hide the project: its checkout on sys.path and setuptools' editable-install
    # finder (a meta path entry, a path hook and a marker entry on sys.path).
    def origin(obj):
        return getattr(obj, "__module__", None) or type(obj).__module__

    sys.path[:] = [
        p for p in sys.path
        if p and "__editable__" not in p and not os.path.realpath(p).startswith(repo)
    ]
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in origin(f)]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in origin(h)]
    sys.path_importer_cache.clear()
    try:
        import cofi
    except ImportError:
        pass
    else:
        sys.exit("cofi is importable from " + str(cofi.__file__))

    import torch
    from transformers import AutoModelForSequenceClassification

    torch.set_num_threads(1)
    for job in jobs:
        model = AutoModelForSequenceClassification.from_pretrained(job["path"], trust_remote_code=True)
        assert type(model).__name__ == "CofiForSequenceClassification"
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        assert not model.training
        inputs = torch.load(job["inputs"])
        with torch.no_grad():
            torch.save(model(**inputs).logits, job["output"])

    # The plain-import fallback of modeling_cofi.py (model directory on sys.path).
    sys.path.insert(0, jobs[0]["path"])
    import modeling_cofi
    assert modeling_cofi.CofiConfig.__module__ == "configuration_cofi"
    assert not any(m == "cofi" or m.startswith("cofi.") for m in sys.modules), "cofi was imported"
    print("REMOTE-OK")
    """
)


def test_remote_code_load_without_project(saved, tmp_path):
    jobs, expected = [], {}
    for name, (model, path) in saved.items():
        inputs = make_inputs(model)
        torch.save(inputs, tmp_path / f"{name}.in.pt")
        expected[name] = logits(model, inputs)
        jobs.append(
            dict(path=str(path), inputs=str(tmp_path / f"{name}.in.pt"), output=str(tmp_path / f"{name}.out.pt"))
        )
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "remote.py").write_text(REMOTE_SCRIPT)
    work = tmp_path / "cwd"
    work.mkdir()

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        HF_HOME=str(tmp_path / "hf"),  # remote code is copied into HF_HOME/modules
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    result = subprocess.run(
        [sys.executable, str(tmp_path / "remote.py"), str(REPO), str(tmp_path / "jobs.json")],
        cwd=work, env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0 and "REMOTE-OK" in result.stdout, result.stdout + result.stderr

    for name, job in zip(saved, jobs):
        remote = torch.load(job["output"])
        # Same weights, same code, one thread on both sides: bit-identical.
        assert torch.equal(remote, expected[name]), (name, (remote - expected[name]).abs().max())


# ---------------------------------------------------------------------------
# atomicity


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_save_over_existing_dir_replaces_it(tmp_path):
    first, second = make_model("bert", seed=0), heterogeneous("roberta")
    path = tmp_path / "model"
    save_model(first, path)
    (path / "stale.txt").write_text("from an older save")
    save_model(second, path)

    loaded = load_model(path)
    inputs = make_inputs(second)
    assert torch.equal(logits(loaded, inputs), logits(second, inputs))
    assert not (path / "stale.txt").exists()
    assert leftovers(tmp_path) == [] and sorted(os.listdir(tmp_path)) == ["model"]


def test_failed_save_keeps_previous_model(tmp_path, monkeypatch):
    model = make_model("bert")
    path = tmp_path / "model"
    save_model(model, path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def crash(self, directory, **kwargs):
        Path(directory, "model.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(CofiForSequenceClassification, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        save_model(heterogeneous("bert"), path)
    monkeypatch.undo()

    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert leftovers(tmp_path) == []
    assert CofiForSequenceClassification._auto_class is None and CofiConfig._auto_class is None
    inputs = make_inputs(model)
    assert torch.equal(logits(load_model(path), inputs), logits(model, inputs))


def test_save_to_new_nested_path_and_over_a_file(tmp_path):
    model = heterogeneous("bert")
    path = save_model(model, tmp_path / "a" / "b" / "model")
    assert (path / "model.safetensors").is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        save_model(model, tmp_path / "file")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_a_saved_model_has_the_modes_a_plain_write_gives(tmp_path, umask):
    """Every file of a model directory, its manifest included, is as readable as one written
    with open(): a serving container running as another account reads it. A temporary
    file's owner-only 0600 must not reach the outputs."""
    from cofi.manifest import atomic_write, write_manifest

    previous = os.umask(umask)
    try:
        path = save_model(heterogeneous("bert"), tmp_path / "model", extra=write_manifest)
        atomic_write(tmp_path / "metrics.json", "{}")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(previous)
    plain = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert plain == 0o666 & ~umask
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_file()}
    assert "model/manifest.json" in modes and "model/model.safetensors" in modes
    assert modes == dict.fromkeys(modes, plain)
    assert (path.stat().st_mode & 0o777) == 0o777 & ~umask
