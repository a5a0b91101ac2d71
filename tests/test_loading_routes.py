"""The three ways to load a compact model, each in a fresh interpreter with no terminal
(stdin closed, output piped), so that a prompt to run custom code would fail, not wait:

- with this package installed: ``import cofi``, then ``from_pretrained(<dir>)`` for the
  model and the tokenizer and ``pipeline(model=<dir>)``, with no remote code: the
  directory's Python files are never imported;
- without the package: ``trust_remote_code=True`` runs the directory's own copy of the
  model code, and gives the same logits;
- ONNX Runtime with the tokenizers library: no Python model code at all (torch,
  transformers and cofi cannot even be imported).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cofi.compact import compact, save_model
from cofi.convert import load_tokenizer
from cofi.onnx_export import export_onnx
from conftest import tiny_model
from pipeline.runtime import base_model_path

TEXTS = ["a gripping, beautifully acted film", "dull and far too long"]
LABELS = {0: "negative", 1: "positive"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, list[list[float]]]:
    """A compact model (3 heads in layer 0, none in layer 1, hidden 16 → 12) saved with
    the teacher's tokenizer, and its logits on TEXTS computed here."""
    tokenizer = load_tokenizer(base_model_path("all-MiniLM-L6-v2"))
    masks = {
        "head": torch.tensor([[1.0, 0.7, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]),
        "intermediate": torch.cat([torch.tensor([[0.9] * 5 + [0.0] * 27]), torch.full((1, 32), 0.8)]),
        "hidden": torch.tensor([1.0] * 12 + [0.0] * 4),
        "ffn": torch.tensor([1.0, 0.6]),
    }
    inputs = tokenizer(TEXTS, padding=True, return_tensors="pt")
    for seed in range(50):  # the first random model whose labels tell the two texts apart
        # initializer_range 0.5: logits large enough to differ between the texts
        model = tiny_model(seed=seed, vocab_size=len(tokenizer), initializer_range=0.5, id2label=LABELS,
                           label2id={v: k for k, v in LABELS.items()})
        small = compact(model.eval(), masks).eval()
        with torch.inference_mode():
            logits = small(**inputs).logits.tolist()
        if len({max(LABELS, key=lambda i: row[i]) for row in logits}) == 2:
            break
    else:
        raise AssertionError("no seed below 50 gives the two texts different labels")
    directory = save_model(small, tmp_path_factory.mktemp("routes") / "compact", extra=tokenizer.save_pretrained)
    export_onnx(small, directory.parent / "onnx" / "compact.onnx")
    return directory, logits


def blocking(*packages: str) -> str:
    """Python source that makes ``import <package>`` (and its submodules) fail."""
    return f"""
import importlib.abc, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {packages!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
sys.meta_path.insert(0, Blocked())
"""


def run_fresh(source: str, tmp_path: Path, *args: str) -> dict:
    """``source`` in a new interpreter with no terminal; its last stdout line, as JSON."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", source, *args], stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    last = (result.stdout.strip().splitlines() or [""])[-1]
    # transformers writes its remote-code prompt to stdout with no newline: the answer (EOF,
    # stdin is closed, so "no") and the script's JSON follow on the same line
    assert "{" in last, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads(last[last.index("{"):])


# what the process imported from the model directory or through transformers' remote-code loader
IMPORTED_FROM_DIRECTORY = """
def imported_from(directory):
    return sorted(name for name, module in list(sys.modules.items())
                  if name.startswith("transformers_modules")
                  or str(getattr(module, "__file__", None) or "").startswith(directory))
"""

PACKAGE_ROUTE = IMPORTED_FROM_DIRECTORY + """
import json, sys
import torch
import cofi
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

directory, texts = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForSequenceClassification.from_pretrained(directory)
tokenizer = AutoTokenizer.from_pretrained(directory)
classify = pipeline("text-classification", model=directory)
with torch.inference_mode():
    logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.tolist()
print(json.dumps({"class": f"{type(model).__module__}.{type(model).__name__}",
                  "pipeline_class": f"{type(classify.model).__module__}.{type(classify.model).__name__}",
                  "logits": logits, "pipeline": classify(texts), "imported": imported_from(directory)}))
"""


def test_with_the_package_model_tokenizer_and_pipeline_load_without_the_directorys_code(saved, tmp_path):
    directory, expected = saved
    planted = tmp_path / "compact"
    shutil.copytree(directory, planted)
    for name in ("configuration_cofi.py", "modeling_cofi.py"):  # the copies' code must never run
        path = planted / name
        path.write_text(f'raise RuntimeError("the model directory\'s {name} ran")\n' + path.read_text())
    assert "auto_map" in json.loads((planted / "config.json").read_text())  # the remote-code route stays open

    got = run_fresh(PACKAGE_ROUTE, tmp_path, str(planted), json.dumps(TEXTS))
    assert got["class"] == got["pipeline_class"] == "cofi.modeling_cofi.CofiForSequenceClassification"
    assert got["imported"] == []
    assert torch.allclose(torch.tensor(got["logits"]), torch.tensor(expected), rtol=0, atol=1e-5)
    for logits, result in zip(got["logits"], got["pipeline"]):
        probabilities = torch.tensor(logits).softmax(-1)
        assert result["label"] == LABELS[int(probabilities.argmax())]
        assert result["score"] == pytest.approx(float(probabilities.max()), abs=1e-6)


REMOTE_CODE_ROUTE = blocking("cofi") + IMPORTED_FROM_DIRECTORY + """
import json, sys
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

directory, texts = sys.argv[1], json.loads(sys.argv[2])
try:
    AutoModelForSequenceClassification.from_pretrained(directory)
    refused = None
except ValueError as e:
    refused = str(e)
model = AutoModelForSequenceClassification.from_pretrained(directory, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(directory)
classify = pipeline("text-classification", model=directory, trust_remote_code=True)
with torch.inference_mode():
    logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.tolist()
print(json.dumps({"refused": refused, "class": f"{type(model).__module__}.{type(model).__name__}",
                  "logits": logits, "pipeline": classify(texts), "imported": imported_from(directory)}))
"""


def test_without_the_package_trust_remote_code_runs_the_directorys_copy_of_the_model_code(saved, tmp_path):
    directory, expected = saved
    got = run_fresh(REMOTE_CODE_ROUTE, tmp_path, str(directory), json.dumps(TEXTS))
    assert "trust_remote_code=True" in got["refused"]  # without the flag: refused, no prompt waited for
    assert got["class"].startswith("transformers_modules.") and got["class"].endswith(
        ".modeling_cofi.CofiForSequenceClassification")
    assert any(name.endswith(".modeling_cofi") for name in got["imported"])
    assert torch.allclose(torch.tensor(got["logits"]), torch.tensor(expected), rtol=0, atol=1e-5)
    assert [r["label"] for r in got["pipeline"]] == [LABELS[int(torch.tensor(l).argmax())] for l in got["logits"]]


ONNX_ROUTE = blocking("cofi", "torch", "transformers") + """
import json, sys
import numpy as np
import onnxruntime
from tokenizers import Tokenizer

directory, model_path, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
tokenizer = Tokenizer.from_file(f"{directory}/tokenizer.json")
tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
encodings = tokenizer.encode_batch(texts)
inputs = {"input_ids": [e.ids for e in encodings], "attention_mask": [e.attention_mask for e in encodings],
          "token_type_ids": [e.type_ids for e in encodings]}
session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
feed = {i.name: np.array(inputs[i.name], dtype=np.int64) for i in session.get_inputs()}
labels = json.load(open(model_path.removesuffix(".onnx") + ".labels.json"))["id2label"]
(logits,) = session.run(["logits"], feed)
print(json.dumps({"logits": logits.tolist(), "labels": [labels[str(i)] for i in logits.argmax(-1)],
                  "loaded": sorted({name.split(".")[0] for name in sys.modules} & {"torch", "transformers", "cofi"})}))
"""


def test_onnx_runtime_and_the_tokenizers_library_classify_with_no_python_model_code(saved, tmp_path):
    directory, expected = saved
    got = run_fresh(ONNX_ROUTE, tmp_path, str(directory), str(directory.parent / "onnx" / "compact.onnx"),
                    json.dumps(TEXTS))
    assert got["loaded"] == []
    assert torch.allclose(torch.tensor(got["logits"]), torch.tensor(expected), rtol=0, atol=1e-4)
    assert got["labels"] == [LABELS[int(torch.tensor(l).argmax())] for l in expected]
