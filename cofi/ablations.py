"""The ablations of CoFi (the paper's table 5): each is CoFi with these pruning
settings changed. Keys of the inner dicts are fields of the params' ``prune`` section."""

from __future__ import annotations

from typing import Any

ABLATIONS: dict[str, dict[str, Any]] = {
    "no_hidden_masks": {"families": ["head", "mha", "intermediate", "ffn"]},
    "no_layer_masks": {"families": ["hidden", "head", "intermediate"]},
    "no_layer_distill": {"distillation": "prediction"},
    "no_distill": {"distillation": "none"},
    "fixed_matching": {"layer_matching": "fixed"},
}
