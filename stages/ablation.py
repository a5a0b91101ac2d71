"""Stage `ablation@<name>`: CoFi at baselines.target with one part switched off.

The switch is a row of ``pipeline.params.ABLATIONS`` (changed prune params);
the stage runs prune → finetune → compact exactly as the main sweep does, into
the variant "ablation-<name>": outputs/{pruned,finetuned,compact}/ablation-<name>-<target>
and metrics/{prune,finetune,compact}-ablation-<name>-<target>.json."""

from __future__ import annotations

from pathlib import Path

from pipeline.params import ABLATIONS, Params, validate_params
from pipeline.runtime import is_main_process
from stages import compact, finetune, prune


def variant(name: str) -> str:
    return f"ablation-{name}"


def ablated(params: Params, name: str) -> Params:
    """``params`` with the ablation's prune overrides, validated like the file itself."""
    data = params.model_dump()
    data["prune"].update(ABLATIONS[name])
    return validate_params(data, source=f"ablation {name}")


def run(params: Params, name: str, root: Path = Path(".")) -> dict:
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation {name!r}; known: {', '.join(ABLATIONS)}")
    changed = ablated(params, name)
    target = params.baselines.target
    prune.run(changed, target, root, variant(name))
    finetune.run(changed, target, root, variant(name))
    if not is_main_process():  # training is shared; exporting is the main process's
        return {}
    return compact.run(changed, target, root, variant(name))
