"""One BERT-family sequence classifier for every phase of CoFi.

The same module runs
  (a) in pruning, with masks sampled from hard-concrete gates,
  (b) in evaluation, with deterministic masks,
  (c) after compaction, with no masks and per-layer shapes from the config
      (fewer heads, narrower FFNs, a narrower residual stream, empty sublayers).

Masks are passed to ``forward`` as a mapping (all optional):

  "hidden"       (C,)    residual-stream dimensions, shared by every layer
  "head"         (L, H)  each head's context vector, before the output projection
  "mha"          (L,)    a layer's whole attention output (projection and bias)
  "intermediate" (L, F)  each FFN unit, after the activation
  "ffn"          (L,)    a layer's whole FFN output (down projection and bias)

With a hidden mask, every LayerNorm takes its statistics over the dimensions
whose mask is non-zero, which is exactly what the compacted model computes over
its remaining dimensions.

On the CPU, heads and FFN units whose mask (or layer gate) is 0 are not computed
at all (``computed_units``): the masked computation would multiply them by 0, so
leaving them out gives the same outputs and gradients (0 for their weights),
and a pruning step at high sparsity costs a fraction of a dense one. Choosing
them reads the masks on the host, and the weights it gathers change shape at
every step; on a GPU that is a wait per forward and no CUDA graphs. So where
``static_shapes`` is on (by default on every device but the CPU) every unit is
computed and multiplied by its mask: the same numbers, shapes fixed by the config.

Only public transformers APIs are used here, and nothing from the rest of the
``cofi`` package (see configuration_cofi.py).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import SequenceClassifierOutput

try:  # a package import, or transformers' loader of remote code
    from .configuration_cofi import CofiConfig
except ImportError:  # a plain module import from the model directory
    from configuration_cofi import CofiConfig


def masked_layer_norm(x: Tensor, norm: nn.LayerNorm, hidden_z: Tensor | None) -> Tensor:
    """LayerNorm over the kept hidden dimensions, then scaled by the hidden mask.

    x: (B, T, C); hidden_z: (C,) or None. Dimensions with hidden_z == 0 take no
    part in the mean and variance and come out as 0.
    """
    if hidden_z is None:
        return norm(x)
    x = x.float()  # statistics in fp32, as autocast does for F.layer_norm
    keep = (hidden_z != 0).to(x.dtype)  # (C,)
    count = keep.sum()
    mean = (x * keep).sum(-1, keepdim=True) / count  # (B, T, 1)
    centered = (x - mean) * keep  # (B, T, C)
    var = centered.pow(2).sum(-1, keepdim=True) / count  # (B, T, 1)
    y = centered * torch.rsqrt(var + norm.eps) * norm.weight + norm.bias
    return y * hidden_z


class CofiEmbeddings(nn.Module):
    def __init__(self, config: CofiConfig):
        super().__init__()
        C = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, C, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, C)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, C)
        self.LayerNorm = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.position_style = config.position_style
        self.pad_token_id = config.pad_token_id

    def forward(self, input_ids: Tensor, token_type_ids: Tensor, hidden_z: Tensor | None) -> Tensor:
        B, T = input_ids.shape
        if self.position_style == "padding_offset":
            # RoBERTa: positions count non-pad tokens, starting after padding_idx.
            not_pad = (input_ids != self.pad_token_id).long()
            position_ids = torch.cumsum(not_pad, dim=1) * not_pad + self.pad_token_id
        else:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(position_ids)
            + self.token_type_embeddings(token_type_ids)
        )  # (B, T, C)
        return self.dropout(masked_layer_norm(x, self.LayerNorm, hidden_z))


class CofiLayer(nn.Module):
    """Post-LN transformer layer: x = LN(x + MHA(x)); x = LN(x + FFN(x))."""

    def __init__(self, config: CofiConfig, index: int):
        super().__init__()
        C, D = config.hidden_size, config.attention_head_size
        self.num_heads = config.layer_num_heads[index]
        self.head_size = D
        width = config.layer_intermediate_size[index]
        self.query = nn.Linear(C, self.num_heads * D)
        self.key = nn.Linear(C, self.num_heads * D)
        self.value = nn.Linear(C, self.num_heads * D)
        self.attn_out = nn.Linear(self.num_heads * D, C)
        self.attn_norm = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.ffn_up = nn.Linear(C, width)
        self.ffn_down = nn.Linear(width, C)
        self.ffn_norm = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.act = ACT2FN[config.hidden_act]
        self.attn_dropout_p = config.attention_probs_dropout_prob
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def attention(
        self, x: Tensor, keep_tokens: Tensor, head_z: Tensor | None, out_z: Tensor | None, heads: Tensor | None = None
    ) -> Tensor:
        """heads: the indices of the heads to compute (None: all of them)."""
        B, T, C = x.shape
        D = self.head_size
        H = self.num_heads if heads is None else len(heads)
        if H == 0:  # no head left: the sublayer adds its (folded) bias only
            return _scaled(self.attn_out.bias, out_z).expand(B, T, C)
        dims = None if heads is None else (heads.unsqueeze(-1) * D + torch.arange(D, device=x.device)).flatten()  # (H*D,)
        q = F.linear(x, *_rows(self.query, dims)).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = F.linear(x, *_rows(self.key, dims)).view(B, T, H, D).transpose(1, 2)
        v = F.linear(x, *_rows(self.value, dims)).view(B, T, H, D).transpose(1, 2)
        if torch.onnx.is_in_onnx_export():
            ctx = exported_attention(q, k, v, keep_tokens, D ** -0.5)  # (B, H, T, D)
        else:
            p = self.attn_dropout_p if self.training else 0.0
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=keep_tokens, dropout_p=p)  # (B, H, T, D)
        ctx = ctx.transpose(1, 2).reshape(B, T, H * D)
        in_z = head_z.repeat_interleave(D) if head_z is not None else None  # (H_all*D,)
        return masked_linear(ctx, self.attn_out, in_z, out_z, dims)  # (B, T, C)

    def ffn(self, x: Tensor, int_z: Tensor | None, out_z: Tensor | None, units: Tensor | None = None) -> Tensor:
        """units: the indices of the FFN units to compute (None: all of them)."""
        if (self.ffn_up.out_features if units is None else len(units)) == 0:
            B, T, C = x.shape
            return _scaled(self.ffn_down.bias, out_z).expand(B, T, C)
        h = self.act(F.linear(x, *_rows(self.ffn_up, units)))  # (B, T, F)
        return masked_linear(h, self.ffn_down, int_z, out_z, units)  # (B, T, C)

    def forward(self, x: Tensor, keep_tokens: Tensor, masks: Mapping[str, Tensor]) -> Tensor:
        hidden_z = masks.get("hidden")
        a = self.attention(x, keep_tokens, masks.get("head"), _product(masks.get("mha"), hidden_z), masks.get("heads"))
        x = masked_layer_norm(x + self.dropout(a), self.attn_norm, hidden_z)
        f = self.ffn(x, masks.get("intermediate"), _product(masks.get("ffn"), hidden_z), masks.get("units"))
        return masked_layer_norm(x + self.dropout(f), self.ffn_norm, hidden_z)


def exported_attention(q: Tensor, k: Tensor, v: Tensor, keep_tokens: Tensor, scale: float) -> Tensor:
    """softmax(q·kᵀ·scale + mask)·v, SDPA's math in the form ONNX Runtime runs fastest: the
    exported SDPA computes its scale at run time and adds a Where over every score, about a
    quarter of an ONNX Runtime pass at batch 32 (docs/experiments/served-speed.md).

    q, k, v: (B, H, T, D); keep_tokens: (B, 1, 1, T) bool; scale: 1/√D, a constant of the graph.
    """
    mask = torch.zeros_like(keep_tokens, dtype=q.dtype).masked_fill(~keep_tokens, torch.finfo(q.dtype).min)
    return (q @ k.transpose(-1, -2) * scale + mask).softmax(-1) @ v  # (B, H, T, D)


def _product(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None or b is None:
        return b if a is None else a
    return a * b


def _scaled(t: Tensor, z: Tensor | None) -> Tensor:
    return t if z is None else t * z


def _rows(linear: nn.Linear, rows: Tensor | None) -> tuple[Tensor, Tensor]:
    """The weight and bias of a linear layer's output rows (all of them for None)."""
    if rows is None:
        return linear.weight, linear.bias
    return linear.weight[rows], linear.bias[rows]


def masked_linear(
    x: Tensor, linear: nn.Linear, in_z: Tensor | None, out_z: Tensor | None, columns: Tensor | None = None
) -> Tensor:
    """``linear(x * in_z) * out_z`` with both masks folded into the weight.

    x: (B, T, I); in_z: (I_all,) or None; out_z: (O,), a scalar, or None;
    columns: (I,) which of the layer's I_all inputs x holds (None: all of them).
    Scaling the (O, I) weight and (O,) bias is exact and cheaper than scaling
    (B, T, ·) activations twice (forward and backward), and under autocast it
    keeps the activations in bf16. Compaction folds the same factors (compact.py).
    """
    weight, bias = linear.weight, linear.bias
    if columns is not None:
        weight = weight[:, columns]
        in_z = in_z[columns] if in_z is not None else None
    if in_z is not None:
        weight = weight * in_z  # scales columns
    if out_z is not None:
        weight = weight * out_z.unsqueeze(-1)  # scales rows; a scalar's (1,) broadcasts
        bias = bias * out_z
    return F.linear(x, weight, bias)


def computed_units(masks: Mapping[str, Tensor]) -> dict[str, list[Tensor]]:
    """Per layer, the indices of the heads ("heads") and FFN units ("units") worth
    computing: those whose own mask and layer gate are both non-zero.

    One host read for all layers: the CPU's path only (``static_shapes`` off).
    """
    on = {}  # name -> (L, N) bool
    for name, unit, gate in (("heads", "head", "mha"), ("units", "intermediate", "ffn")):
        z = masks.get(unit)
        if z is not None:
            on[name] = (z != 0) if masks.get(gate) is None else (z != 0) & (masks[gate] != 0).unsqueeze(-1)
    if not on:
        return {}
    L = next(iter(on.values())).shape[0]
    rows = torch.cat([m.flatten() for m in on.values()]).cpu().split([m.shape[1] for m in on.values() for _ in range(L)])
    kept = [row.nonzero().squeeze(-1) for row in rows]  # on the host
    on_device = torch.cat(kept).to(next(iter(on.values())).device).split([len(k) for k in kept])  # one copy
    return {name: list(on_device[i * L : (i + 1) * L]) for i, name in enumerate(on)}


def layer_masks(masks: Mapping[str, Tensor], computed: Mapping[str, list[Tensor]], index: int) -> dict[str, Tensor]:
    """The masks one layer sees: its rows of the per-layer masks, the hidden mask, and
    its heads and units worth computing (``computed_units``)."""
    out = {k: masks[k][index] for k in ("head", "mha", "intermediate", "ffn") if masks.get(k) is not None}
    if masks.get("hidden") is not None:
        out["hidden"] = masks["hidden"]
    return out | {name: kept[index] for name, kept in computed.items()}


class CofiPreTrainedModel(PreTrainedModel):
    config_class = CofiConfig
    base_model_prefix = "cofi"
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class CofiForSequenceClassification(CofiPreTrainedModel):
    """Encoder, pooler (dense + activation on the first token) and a linear classifier.

    BERT's pooler (tanh), RoBERTa's and ELECTRA's classification heads (tanh,
    gelu) and DistilBERT's pre_classifier (relu) have the same shape and all map
    onto ``pooler`` + ``classifier`` here.
    """

    def __init__(self, config: CofiConfig):
        super().__init__(config)
        self.embeddings = CofiEmbeddings(config)
        self.layers = nn.ModuleList(CofiLayer(config, i) for i in range(config.num_hidden_layers))
        self.pooler = nn.Linear(config.hidden_size, config.classifier_hidden_size)
        self.pooler_act = ACT2FN[config.pooler_activation]
        dropout = config.classifier_dropout
        self.classifier_dropout = nn.Dropout(config.hidden_dropout_prob if dropout is None else dropout)
        self.classifier = nn.Linear(config.classifier_hidden_size, config.num_labels)
        self._static_shapes: bool | None = None
        self.post_init()

    @property
    def static_shapes(self) -> bool:
        """Compute every unit, masked (True), or leave out those whose mask is 0 (False,
        ``computed_units``). Unless set, on everywhere but the CPU: a GPU (and the meta
        device, which stands for one in tests) never waits for the host in a forward."""
        if self._static_shapes is not None:
            return self._static_shapes
        return self.classifier.weight.device.type != "cpu"

    @static_shapes.setter
    def static_shapes(self, value: bool | None) -> None:
        self._static_shapes = value

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
        masks: Mapping[str, Tensor] | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        **unused,
    ) -> SequenceClassifierOutput:
        masks = {k: v for k, v in (masks or {}).items() if v is not None}
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        keep_tokens = attention_mask.bool().view(B, 1, 1, T)  # broadcast over heads and queries

        computed = {} if self.static_shapes else computed_units(masks)
        x = self.embeddings(input_ids, token_type_ids, masks.get("hidden"))  # (B, T, C)
        hidden_states = [x]
        for i, layer in enumerate(self.layers):
            x = layer(x, keep_tokens, layer_masks(masks, computed, i))
            hidden_states.append(x)

        first = x[:, 0]  # (B, C)
        if self.config.pooler_input_dropout:
            first = self.classifier_dropout(first)
        pooled = self.pooler_act(self.pooler(first))  # (B, C_cls)
        logits = self.classifier(self.classifier_dropout(pooled))  # (B, num_labels)

        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels)
        if not return_dict:
            return tuple(v for v in (loss, logits, tuple(hidden_states) if output_hidden_states else None) if v is not None)
        return SequenceClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
        )
