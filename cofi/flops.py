"""Forward-pass FLOPs of a (possibly compact) classifier, from its actual structure.

Counted: every matrix multiplication, at 2 FLOPs per multiply-add. Per layer
with h kept heads of size D, f kept FFN units and residual width C, for a
sequence of T tokens:

    Q, K, V projections      3 · 2·T·C·(h·D)
    scores QKᵀ and P·V       2 · 2·T·T·(h·D)
    attention output         2·T·(h·D)·C
    FFN up and down          2 · 2·T·C·f

plus the pooler (2·C·C_cls) and the classifier (2·C_cls·labels) on the first
token. Embedding lookups, LayerNorm, softmax, activations and biases are left
out: they are O(T·C) against O(T·C²) and the same for every way of pruning.
The ratio teacher FLOPs / compact FLOPs is the speedup the structure allows.
"""

from __future__ import annotations

from torch import nn


def layer_flops(tokens: int, hidden: int, heads: int, head_size: int, ffn_units: int) -> int:
    width = heads * head_size
    attention = 3 * 2 * tokens * hidden * width + 2 * 2 * tokens * tokens * width + 2 * tokens * width * hidden
    ffn = 2 * 2 * tokens * hidden * ffn_units
    return attention + ffn


def forward_flops(model: nn.Module, sequence_length: int) -> int:
    """FLOPs of one example of ``sequence_length`` tokens through ``model``."""
    hidden = model.embeddings.word_embeddings.embedding_dim
    total = sum(
        layer_flops(sequence_length, hidden, layer.num_heads, layer.head_size, layer.ffn_up.out_features)
        for layer in model.layers
    )
    head = 2 * model.pooler.in_features * model.pooler.out_features
    head += 2 * model.classifier.in_features * model.classifier.out_features
    return total + head
