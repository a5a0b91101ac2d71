"""Configuration of a CoFi encoder classifier.

This file and ``modeling_cofi.py`` are copied next to every saved model so that
``AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)``
works where only torch and transformers are installed. Keep both files free of
imports from the rest of the ``cofi`` package.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class CofiConfig(PretrainedConfig):
    """A BERT-family encoder whose layers may differ in shape.

    A full-size (unpruned) model has ``layer_num_heads[l] == num_attention_heads``
    and ``layer_intermediate_size[l] == intermediate_size`` for every layer. A
    compacted model records what CoFi kept: a layer may have fewer heads (0 means
    the attention sublayer does no work), a narrower FFN (0 likewise), and the
    residual stream may be narrower than the original ``hidden_size``.
    """

    model_type = "cofi_bert"

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        attention_head_size: int | None = None,
        intermediate_size: int = 3072,
        layer_num_heads: list[int] | None = None,
        layer_intermediate_size: list[int] | None = None,
        classifier_hidden_size: int | None = None,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        classifier_dropout: float | None = None,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        layer_norm_eps: float = 1e-12,
        pad_token_id: int = 0,
        position_style: str = "absolute",  # "absolute" (BERT) or "padding_offset" (RoBERTa)
        pooler_input_dropout: bool = False,  # RoBERTa's and ELECTRA's heads also drop out the pooler's input
        pooler_activation: str = "tanh",  # BERT, RoBERTa: tanh; DistilBERT: relu; ELECTRA: gelu
        source_model_type: str = "bert",
        full_hidden_size: int | None = None,
        **kwargs,
    ):
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        # Fixed at the original width: a compact model keeps whole heads, and the
        # attention scale 1/sqrt(head size) must not change.
        self.attention_head_size = attention_head_size or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.layer_num_heads = list(layer_num_heads or [num_attention_heads] * num_hidden_layers)
        self.layer_intermediate_size = list(
            layer_intermediate_size or [intermediate_size] * num_hidden_layers
        )
        # The pooler's output (the classifier's input) keeps the original width:
        # hidden-dimension masks act on the residual stream only.
        self.classifier_hidden_size = classifier_hidden_size or hidden_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.classifier_dropout = classifier_dropout
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.layer_norm_eps = layer_norm_eps
        if position_style not in ("absolute", "padding_offset"):
            raise ValueError(
                f"position_style={position_style!r}; allowed: 'absolute', 'padding_offset'"
            )
        self.position_style = position_style
        self.pooler_input_dropout = pooler_input_dropout
        self.pooler_activation = pooler_activation
        self.source_model_type = source_model_type
        # The residual width before pruning: with num_attention_heads and
        # intermediate_size it names the full shape, so a compact model alone
        # can report its sparsity.
        self.full_hidden_size = full_hidden_size or hidden_size
        if len(self.layer_num_heads) != num_hidden_layers:
            raise ValueError(
                f"layer_num_heads has {len(self.layer_num_heads)} entries, "
                f"num_hidden_layers is {num_hidden_layers}"
            )
        if len(self.layer_intermediate_size) != num_hidden_layers:
            raise ValueError(
                f"layer_intermediate_size has {len(self.layer_intermediate_size)} entries, "
                f"num_hidden_layers is {num_hidden_layers}"
            )
