"""Load standard Hugging Face BERT-family checkpoints into ``CofiForSequenceClassification``.

The weights are read directly from the checkpoint files (safetensors or torch
``.bin``, single or sharded) and renamed by a key table; nothing from
transformers' BERT/RoBERTa modeling code is used, so the conversion does not
depend on how transformers lays out its own modules.

Supported sources: the sequence classifiers of BERT, RoBERTa (and the XLM-R /
CamemBERT variants, which share RoBERTa's layout), DistilBERT and ELECTRA (the
discriminator), and their bare encoders (``BertModel``, ``DistilBertModel``,
sentence-transformers models such as all-MiniLM-L6-v2, pre-training checkpoints
such as ``BertForMaskedLM`` or ``ElectraForPreTraining``). A
pooler or classifier the checkpoint lacks is freshly initialised and reported;
any other key that does not map is an error, so no weight is ever dropped
silently.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from cofi.configuration_cofi import CofiConfig
from cofi.modeling_cofi import CofiForSequenceClassification

logger = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ModelFamily",
    "LoadReport",
    "cofi_config_from_hf",
    "convert_state_dict",
    "load_pretrained",
    "load_pretrained_with_report",
    "load_tokenizer",
]


@dataclass(frozen=True)
class ModelFamily:
    """How one HF checkpoint layout maps onto ``CofiForSequenceClassification``.

    prefix: the base-model prefix of task checkpoints ("bert." in
        ``bert.encoder.layer.0...``); bare encoders are saved without it.
    position_style: ``CofiConfig.position_style`` for this family.
    head_rules: (regex on the un-prefixed key, replacement) for pooler and
        classifier weights.
    encoder_rules: the same for embeddings and layers.
    ignored: regexes on the un-prefixed key for weights that are deliberately
        not used (pre-training heads); they are listed in the ``LoadReport``.
    pooler_activation, pooler_input_dropout: how the head computes (CofiConfig).
    config_names: CofiConfig field -> the HF config's attribute, where they differ.
    token_types: False for a family without token type embeddings (DistilBERT):
        a zero embedding of one type stands in, which adds nothing.
    """

    prefix: str
    position_style: str
    head_rules: tuple[tuple[str, str], ...]
    encoder_rules: tuple[tuple[str, str], ...]
    ignored: tuple[str, ...] = ()
    pooler_activation: str = "tanh"
    pooler_input_dropout: bool = False
    config_names: Mapping[str, str] = field(default_factory=dict)
    token_types: bool = True


# Encoder keys (after the prefix is stripped) of BERT, RoBERTa and ELECTRA.
_ENCODER_RULES: tuple[tuple[str, str], ...] = (
    (
        r"embeddings\.(word_embeddings|position_embeddings|token_type_embeddings|LayerNorm)\.(weight|bias)",
        r"embeddings.\1.\2",
    ),
    (r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)", r"layers.\1.\2.\3"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"layers.\1.attn_out.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(weight|bias)", r"layers.\1.attn_norm.\2"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"layers.\1.ffn_up.\2"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"layers.\1.ffn_down.\2"),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.(weight|bias)", r"layers.\1.ffn_norm.\2"),
)

_BERT = ModelFamily(
    prefix="bert",
    position_style="absolute",
    head_rules=(
        (r"pooler\.dense\.(weight|bias)", r"pooler.\1"),
        (r"classifier\.(weight|bias)", r"classifier.\1"),
    ),
    ignored=(r"cls\..*",),  # MLM / NSP heads of BertForPreTraining / BertForMaskedLM
    encoder_rules=_ENCODER_RULES,
)

_ROBERTA = ModelFamily(
    prefix="roberta",
    position_style="padding_offset",
    # RobertaClassificationHead is dense + tanh + out_proj on the first token,
    # the same computation as our pooler + classifier.
    head_rules=(
        (r"classifier\.dense\.(weight|bias)", r"pooler.\1"),
        (r"classifier\.out_proj\.(weight|bias)", r"classifier.\1"),
    ),
    ignored=(
        r"lm_head\..*",  # RobertaForMaskedLM
        # RobertaModel's pooler: RobertaForSequenceClassification never uses it
        # (its head brings its own dense layer), and released RoBERTa checkpoints
        # ship it untrained, so we follow transformers and leave it out.
        r"pooler\.dense\.(weight|bias)",
    ),
    encoder_rules=_ENCODER_RULES,
    pooler_input_dropout=True,
)

_DISTILBERT = ModelFamily(
    prefix="distilbert",
    position_style="absolute",
    # DistilBertForSequenceClassification: pre_classifier + ReLU on the first token, then the classifier.
    head_rules=(
        (r"pre_classifier\.(weight|bias)", r"pooler.\1"),
        (r"classifier\.(weight|bias)", r"classifier.\1"),
    ),
    ignored=(r"vocab_(transform|layer_norm|projector)\..*",),  # DistilBertForMaskedLM
    encoder_rules=(
        (r"embeddings\.(word_embeddings|position_embeddings|LayerNorm)\.(weight|bias)", r"embeddings.\1.\2"),
        (r"transformer\.layer\.(\d+)\.attention\.q_lin\.(weight|bias)", r"layers.\1.query.\2"),
        (r"transformer\.layer\.(\d+)\.attention\.k_lin\.(weight|bias)", r"layers.\1.key.\2"),
        (r"transformer\.layer\.(\d+)\.attention\.v_lin\.(weight|bias)", r"layers.\1.value.\2"),
        (r"transformer\.layer\.(\d+)\.attention\.out_lin\.(weight|bias)", r"layers.\1.attn_out.\2"),
        (r"transformer\.layer\.(\d+)\.sa_layer_norm\.(weight|bias)", r"layers.\1.attn_norm.\2"),
        (r"transformer\.layer\.(\d+)\.ffn\.lin1\.(weight|bias)", r"layers.\1.ffn_up.\2"),
        (r"transformer\.layer\.(\d+)\.ffn\.lin2\.(weight|bias)", r"layers.\1.ffn_down.\2"),
        (r"transformer\.layer\.(\d+)\.output_layer_norm\.(weight|bias)", r"layers.\1.ffn_norm.\2"),
    ),
    pooler_activation="relu",
    config_names={"intermediate_size": "hidden_dim", "hidden_act": "activation", "hidden_dropout_prob": "dropout",
                  "attention_probs_dropout_prob": "attention_dropout", "classifier_dropout": "seq_classif_dropout"},
    token_types=False,
)

_ELECTRA = ModelFamily(
    prefix="electra",
    position_style="absolute",
    # ElectraClassificationHead: dropout, dense, gelu, dropout, out_proj on the first token.
    head_rules=(
        (r"classifier\.dense\.(weight|bias)", r"pooler.\1"),
        (r"classifier\.out_proj\.(weight|bias)", r"classifier.\1"),
    ),
    ignored=(r"discriminator_predictions\..*",),  # ElectraForPreTraining's replaced-token head
    encoder_rules=_ENCODER_RULES,
    pooler_activation="gelu",
    pooler_input_dropout=True,
)

# HF ``model_type`` -> how to convert it. XLM-R and CamemBERT are RoBERTa with
# another vocabulary: same module tree, same "roberta." prefix, same positions.
SUPPORTED_MODEL_TYPES: dict[str, ModelFamily] = {
    "bert": _BERT,
    "roberta": _ROBERTA,
    "xlm-roberta": _ROBERTA,
    "camembert": _ROBERTA,
    "distilbert": _DISTILBERT,
    "electra": _ELECTRA,
}

# Buffers some transformers versions saved; they carry no learned weights.
_BUFFERS = (r"embeddings\.position_ids", r"embeddings\.token_type_ids")

# Parameters that may be missing from a checkpoint and are then freshly initialised.
_HEAD_PARAMS = ("pooler.", "classifier.")

# Weight files in the order transformers prefers them.
_SAFETENSORS, _SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
_TORCH_BIN, _TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


@dataclass
class LoadReport:
    """What ``load_pretrained`` did with a checkpoint.

    loaded / fresh: names of our parameters copied from the checkpoint, and
    freshly initialised because the checkpoint has no such weight. ignored:
    checkpoint keys deliberately not used (pre-training heads, buffers).
    """

    source: str
    model_type: str
    weight_files: list[str]
    loaded: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"Loaded {len(self.loaded)} tensors from {self.source} (model_type={self.model_type})."
        ]
        if self.fresh:
            lines.append(f"Freshly initialised (not in the checkpoint): {', '.join(self.fresh)}")
        if self.ignored:
            lines.append(f"Not used from the checkpoint: {', '.join(self.ignored)}")
        return "\n".join(lines)


def _unsupported(hf_config: PretrainedConfig, why: str) -> ValueError:
    model_type = getattr(hf_config, "model_type", None)
    architectures = getattr(hf_config, "architectures", None)
    return ValueError(
        f"Cannot convert model_type={model_type!r} (architectures={architectures}): {why}. "
        f"Supported model types: {', '.join(sorted(SUPPORTED_MODEL_TYPES))} "
        "with absolute position embeddings."
    )


def _family(hf_config: PretrainedConfig) -> ModelFamily:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        why = "not a supported BERT-family encoder"
        if model_type == CofiConfig.model_type:
            why = "already a CoFi model; load it with CofiForSequenceClassification.from_pretrained"
        raise _unsupported(hf_config, why)
    # transformers 5 dropped the attribute (absolute only); older configs still carry it.
    position_type = getattr(hf_config, "position_embedding_type", "absolute") or "absolute"
    if position_type != "absolute":
        raise _unsupported(hf_config, f"position_embedding_type={position_type!r} is not 'absolute'")
    return SUPPORTED_MODEL_TYPES[model_type]


def cofi_config_from_hf(hf_config: PretrainedConfig, num_labels: int, **overrides) -> CofiConfig:
    """A full-size ``CofiConfig`` with the shapes and hyper-parameters of ``hf_config``.

    Label maps of ``hf_config`` are copied when they have ``num_labels`` entries
    (a checkpoint's classifier); ``overrides`` (e.g. ``id2label``) win over
    everything mapped here. Raises ValueError for an unsupported model.
    """
    family = _family(hf_config)
    hidden, heads = hf_config.hidden_size, hf_config.num_attention_heads

    def hf(name: str, default=None):
        return getattr(hf_config, family.config_names.get(name, name), default)

    if hidden % heads:
        raise _unsupported(hf_config, f"hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
    if not isinstance(hf("hidden_act"), str):
        raise _unsupported(hf_config, f"hidden_act={hf('hidden_act')!r} is not a named activation")
    if family.position_style == "padding_offset" and hf_config.pad_token_id is None:
        raise _unsupported(hf_config, "RoBERTa-style positions need pad_token_id")
    embedding_size = getattr(hf_config, "embedding_size", hidden)
    if embedding_size != hidden:
        raise _unsupported(hf_config, f"embedding_size={embedding_size} differs from hidden_size={hidden} "
                                      "(factorised embeddings with a projection, as in ELECTRA-small)")
    kwargs = dict(
        vocab_size=hf_config.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=hf_config.num_hidden_layers,
        num_attention_heads=heads,
        intermediate_size=hf("intermediate_size"),
        hidden_act=hf("hidden_act"),
        hidden_dropout_prob=hf("hidden_dropout_prob"),
        attention_probs_dropout_prob=hf("attention_probs_dropout_prob"),
        classifier_dropout=hf("classifier_dropout"),
        max_position_embeddings=hf_config.max_position_embeddings,
        type_vocab_size=hf_config.type_vocab_size if family.token_types else 1,
        layer_norm_eps=hf("layer_norm_eps", 1e-12),  # DistilBERT's LayerNorms: 1e-12, not in its config
        pad_token_id=hf_config.pad_token_id if hf_config.pad_token_id is not None else 0,
        position_style=family.position_style,
        pooler_input_dropout=family.pooler_input_dropout,
        pooler_activation=family.pooler_activation,
        source_model_type=hf_config.model_type,
        initializer_range=hf("initializer_range", 0.02),
        num_labels=num_labels,
    )
    id2label = getattr(hf_config, "id2label", None)
    if id2label and len(id2label) == num_labels:
        kwargs["id2label"] = {int(i): label for i, label in id2label.items()}
        kwargs["label2id"] = {label: int(i) for i, label in id2label.items()}
    kwargs.update(overrides)
    if "id2label" in overrides and "label2id" not in overrides:
        kwargs["label2id"] = {label: int(i) for i, label in overrides["id2label"].items()}
    return CofiConfig(**kwargs)


def _rename(key: str, rules: tuple[tuple[str, str], ...]) -> str | None:
    for pattern, replacement in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return match.expand(replacement)
    return None


def convert_state_dict(
    state_dict: Mapping[str, Tensor], model_type: str
) -> tuple[dict[str, Tensor], list[str]]:
    """Rename an HF checkpoint's tensors to ``CofiForSequenceClassification`` names.

    Returns (converted state dict, checkpoint keys deliberately not used).
    Raises ValueError naming every key that neither maps nor is a known
    pre-training head or buffer.
    """
    family = SUPPORTED_MODEL_TYPES[model_type]
    rules = family.encoder_rules + family.head_rules
    converted: dict[str, Tensor] = {}
    ignored: list[str] = []
    unexpected: list[str] = []
    for key, tensor in state_dict.items():
        name = key.removeprefix(family.prefix + ".")
        # Checkpoints converted from TF name LayerNorm parameters gamma/beta.
        name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
        name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
        target = _rename(name, rules)
        if target is not None:
            if target in converted:
                raise ValueError(f"Two checkpoint tensors map to {target!r} (second: {key!r})")
            converted[target] = tensor
        elif any(re.fullmatch(p, name) for p in _BUFFERS):
            continue  # not a weight: nothing to report
        elif any(re.fullmatch(p, name) for p in family.ignored):
            ignored.append(key)
        else:
            unexpected.append(key)
    if unexpected:
        raise ValueError(
            f"Checkpoint keys with no place in CofiForSequenceClassification "
            f"(model_type={model_type!r}): {', '.join(unexpected)}"
        )
    words = converted.get("embeddings.word_embeddings.weight")
    if not family.token_types and words is not None:  # one token type whose embedding adds nothing
        converted["embeddings.token_type_embeddings.weight"] = torch.zeros(1, words.shape[1], dtype=words.dtype)
    return converted, ignored


def _is_local(name_or_path: str) -> bool:
    """Whether ``name_or_path`` must be a local directory (it cannot be a Hub id)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    # "org/name" is a valid Hub id and a valid relative path: an existing path wins.
    if os.path.exists(name_or_path) or name_or_path.startswith((".", "~", "/")) or "\\" in name_or_path:
        return True
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return True
    return False


def _check_exists(name_or_path: str) -> None:
    if _is_local(name_or_path) and not os.path.isdir(name_or_path):
        kind = "is a file, not a model directory" if os.path.exists(name_or_path) else "does not exist"
        raise FileNotFoundError(f"Model path {name_or_path!r} {kind}.")


def _weight_files(name_or_path: str) -> list[str]:
    """The checkpoint's weight files, resolved like ``from_pretrained`` resolves them (a local
    directory, the Hub cache, or a download): safetensors first, then torch .bin; single or sharded."""
    from transformers.utils import cached_file
    from transformers.utils.hub import get_checkpoint_shard_files

    def resolve(filename: str) -> str | None:
        # None when absent; offline and not cached counts as absent, so the next format is tried
        return cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)

    for single, index in ((_SAFETENSORS, _SAFETENSORS_INDEX), (_TORCH_BIN, _TORCH_BIN_INDEX)):
        path = resolve(single)
        if path is not None:
            return [path]
        index_path = resolve(index)
        if index_path is not None:
            try:
                return get_checkpoint_shard_files(name_or_path, index_path)[0]
            except OSError as e:
                raise FileNotFoundError(f"{name_or_path}: shards listed in {index} are missing ({e})") from e
    raise FileNotFoundError(
        f"No weights found for {name_or_path!r}: expected {_SAFETENSORS}, {_SAFETENSORS_INDEX}, "
        f"{_TORCH_BIN} or {_TORCH_BIN_INDEX} (for a Hub id, the Hub may also be unreachable)."
    )


def _read_weights(files: list[str]) -> dict[str, Tensor]:
    state_dict: dict[str, Tensor] = {}
    for path in files:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state_dict.update(load_file(path, device="cpu"))
        else:
            # weights_only: a .bin is a pickle, and must not run code on load.
            state_dict.update(torch.load(path, map_location="cpu", weights_only=True))
    return state_dict


def _load_hf_config(name_or_path: str) -> PretrainedConfig:
    _check_exists(name_or_path)
    if _is_local(name_or_path) and not (Path(name_or_path) / "config.json").is_file():
        raise FileNotFoundError(f"Model directory {name_or_path!r} has no config.json.")
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except OSError as e:  # a Hub id that does not exist, or the Hub is unreachable
        raise FileNotFoundError(
            f"{name_or_path!r} is not a local directory, and its config could not be loaded "
            f"from the Hugging Face Hub: {e}"
        ) from e


def load_pretrained_with_report(
    name_or_path: str,
    num_labels: int,
    seed: int | None = None,
    id2label: Mapping[int, str] | None = None,
    dropout: float | None = None,
) -> tuple[CofiForSequenceClassification, LoadReport]:
    """``load_pretrained``, also returning what was loaded, initialised and left out."""
    name_or_path = os.path.expanduser(str(name_or_path))
    hf_config = _load_hf_config(name_or_path)
    overrides = {"id2label": dict(id2label)} if id2label is not None else {}
    if dropout is not None:  # every dropout of the model: hidden states, attention weights, classifier input
        overrides.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, classifier_dropout=dropout)
    config = cofi_config_from_hf(hf_config, num_labels, **overrides)
    config._name_or_path = name_or_path  # provenance, saved with the model

    files = _weight_files(name_or_path)
    converted, ignored = convert_state_dict(_read_weights(files), hf_config.model_type)

    # Built on the meta device: no memory and no random init for parameters that
    # the checkpoint overwrites anyway (and the global RNG stays untouched).
    with torch.device("meta"):
        model = CofiForSequenceClassification(config)
    expected = model.state_dict()

    classifier = converted.get("classifier.weight")
    if classifier is not None and classifier.shape[0] != num_labels:
        raise ValueError(
            f"{name_or_path!r} has a classifier with {classifier.shape[0]} labels, "
            f"but num_labels={num_labels} was requested."
        )
    for key, tensor in converted.items():
        if key not in expected:  # e.g. more layers in the weights than in config.json
            raise ValueError(f"{name_or_path!r}: checkpoint tensor for {key!r} has no place in the model")
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"{name_or_path!r}: shape {tuple(tensor.shape)} of {key!r} does not match the "
                f"config's {tuple(expected[key].shape)}"
            )
    missing = [k for k in expected if k not in converted]
    not_head = [k for k in missing if not k.startswith(_HEAD_PARAMS)]
    if not_head:
        raise ValueError(f"{name_or_path!r} lacks encoder weights: {', '.join(not_head)}")

    fresh = _init_fresh({k: expected[k].shape for k in missing}, config.initializer_range, seed)
    # fp32 master weights whatever the checkpoint's dtype (mixed precision is autocast's job).
    weights = {k: v.float() if v.is_floating_point() else v for k, v in converted.items()}
    # strict + assign: every parameter and buffer is replaced by a real tensor.
    model.load_state_dict({**weights, **fresh}, strict=True, assign=True)
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:  # a non-persistent buffer: would need computing, not loading
        raise RuntimeError(f"Not materialised after loading: {', '.join(left_on_meta)}")
    model.eval()  # like transformers' from_pretrained; call .train() to fine-tune

    report = LoadReport(
        source=name_or_path,
        model_type=hf_config.model_type,
        weight_files=files,
        loaded=[k for k in expected if k in converted],
        fresh=missing,
        ignored=ignored,
    )
    return model, report


def _init_fresh(shapes: Mapping[str, torch.Size], std: float, seed: int | None) -> dict[str, Tensor]:
    """New head parameters, initialised as ``_init_weights`` does: N(0, std) weights, zero biases.

    A generator seeded with ``seed`` makes them reproducible; with seed=None the
    global torch RNG is used (so ``torch.manual_seed`` applies).
    """
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    tensors = {}
    for name, shape in shapes.items():  # state_dict order: deterministic
        tensor = torch.zeros(shape)
        if not name.endswith(".bias"):
            tensor.normal_(0.0, std, generator=generator)
        tensors[name] = tensor
    return tensors


def load_pretrained(
    name_or_path: str,
    num_labels: int,
    seed: int | None = None,
    id2label: Mapping[int, str] | None = None,
    dropout: float | None = None,
) -> CofiForSequenceClassification:
    """A full-size CoFi classifier with the weights of a Hugging Face checkpoint.

    name_or_path: a Hub id or a local directory holding ``config.json`` and
        safetensors or torch ``.bin`` weights (single or sharded).
    num_labels: the classifier's outputs; must match an existing classifier.
    seed: seeds the fresh initialisation of a missing pooler / classifier.
    id2label: label names; by default copied from the checkpoint when it has
        ``num_labels`` of them.
    dropout: every dropout probability of the model (hidden states, attention
        weights, classifier input), saved with it; by default the checkpoint's.

    The model is returned in eval mode, in fp32. Freshly initialised and unused
    weights are logged at INFO; use ``load_pretrained_with_report`` to get them.
    """
    model, report = load_pretrained_with_report(name_or_path, num_labels, seed=seed, id2label=id2label, dropout=dropout)
    logger.info(report.summary())
    return model


def load_tokenizer(name_or_path: str, **kwargs):
    """``AutoTokenizer.from_pretrained`` with the same path check as ``load_pretrained``.

    sentence-transformers models keep the tokenizer in their root directory,
    next to config.json, so the same path works for both.
    """
    name_or_path = os.path.expanduser(str(name_or_path))
    _check_exists(name_or_path)
    return AutoTokenizer.from_pretrained(name_or_path, **kwargs)
