"""The pruned structure of a compact model, per layer (pure python: no plotting, no tracking)."""

from __future__ import annotations

from typing import Sequence

__all__ = ["structure_table", "structure_summary"]


def structure_table(
    layer_num_heads: Sequence[int],
    layer_intermediate_size: Sequence[int],
    num_heads: int,
    intermediate_size: int,
) -> dict[str, list]:
    """Per-layer structure as columns: layer, heads, heads_kept, ffn_units, ffn_kept, removed."""
    if len(layer_num_heads) != len(layer_intermediate_size):
        raise ValueError(
            f"{len(layer_num_heads)} layers of heads but {len(layer_intermediate_size)} of FFN units"
        )
    heads = [int(h) for h in layer_num_heads]
    units = [int(u) for u in layer_intermediate_size]
    return {
        "layer": list(range(len(heads))),
        "heads": heads,
        "heads_kept": [h / num_heads if num_heads else 0.0 for h in heads],
        "ffn_units": units,
        "ffn_kept": [u / intermediate_size if intermediate_size else 0.0 for u in units],
        "removed": [h == 0 and u == 0 for h, u in zip(heads, units)],
    }


def structure_summary(table: dict[str, list], num_heads: int, intermediate_size: int) -> dict[str, float]:
    """Fractions of all heads and FFN units kept, and the number of layers removed entirely."""
    n = len(table["layer"])
    return {
        "heads_kept": sum(table["heads"]) / (num_heads * n) if num_heads and n else 0.0,
        "ffn_kept": sum(table["ffn_units"]) / (intermediate_size * n) if intermediate_size and n else 0.0,
        "layers_removed": float(sum(table["removed"])),
    }
