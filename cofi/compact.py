"""Compaction, saving and loading of CoFi models (section 8 of the method page).

``compact`` turns a model plus deterministic masks into a smaller dense model
that computes what ``model(..., masks=masks)`` computes in eval mode. The
folding follows from the masked forward pass in modeling_cofi.py. With z the
hidden mask and K the hidden dimensions it keeps, one layer computes

    x = LN_z(x + z * m_mha * attn_out(head_z * ctx(x)))
    x = LN_z(x + z * m_ffn * ffn_down(int_z * act(ffn_up(x))))

where LN_z takes its statistics over K and multiplies its output by z. So the
residual stream is exactly 0 outside K everywhere (embeddings included), and on
K it equals the stream of a dense model in which

  - every LayerNorm has weight[K] * z and bias[K] * z;
  - every Linear that reads the stream (query, key, value, ffn_up, pooler) and
    every embedding table keeps the columns K only;
  - attn_out keeps rows K scaled by z * m_mha, the input columns of the heads
    with head_z != 0 scaled by head_z, and bias[K] * z * m_mha;
  - ffn_down keeps rows K scaled by z * m_ffn, the units with int_z != 0
    scaled by int_z, and bias[K] * z * m_ffn.

A sublayer left with no head (or no unit) still adds its folded bias, a
constant; modeling_cofi.py represents it with zero-size Linears and returns
the bias directly. A layer gate of 0 drops the whole sublayer, bias included.

``save_model`` writes a Hugging Face directory (config.json, model.safetensors
and a copy of configuration_cofi.py / modeling_cofi.py) that loads with
``AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)``
where only torch and transformers are installed; ``load_model`` loads it
through this package's own classes.
"""

from __future__ import annotations

import copy
import os
import shutil
import threading
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from cofi.configuration_cofi import CofiConfig
from cofi.manifest import fsync_path, plain_file_mode, read_manifest, verify_files
from cofi.modeling_cofi import CofiForSequenceClassification

__all__ = ["compact", "save_model", "load_model"]

Masks = Mapping[str, "Tensor | None"]


# ----------------------------------------------------------------------------
# compaction


@torch.no_grad()
def compact(model: CofiForSequenceClassification, masks: Masks) -> CofiForSequenceClassification:
    """A new dense model equal to ``model(..., masks=masks)`` in eval mode.

    masks: any of "hidden" (C,), "head" (L, H), "mha" (L,), "intermediate" (L, F),
    "ffn" (L,); a missing or None family keeps everything at 1. A unit is kept
    iff its mask is non-zero, and surviving soft values are folded into the
    adjacent weights. ``model`` is not modified; the result is on the same
    device, in the same dtype and in the same train/eval mode.
    """
    hidden_z, layers_z = _per_layer_masks(model, masks)
    keep = torch.nonzero(hidden_z).flatten()  # (C',) kept hidden dimensions
    if keep.numel() == 0:
        raise ValueError("the hidden mask removes every hidden dimension; nothing to compact")
    z = hidden_z[keep]  # (C',)

    state: dict[str, Tensor] = {}
    state.update(_embeddings_state(model.embeddings, keep, z))
    num_heads, widths = [], []
    for i, (layer, layer_z) in enumerate(zip(model.layers, layers_z)):
        layer_state, heads, width = _layer_state(layer, keep, z, **layer_z)
        state.update({f"layers.{i}.{k}": v for k, v in layer_state.items()})
        num_heads.append(heads)
        widths.append(width)
    # The pooler reads the stream; its output (the classifier input) keeps its width.
    state["pooler.weight"], state["pooler.bias"] = _fold_linear(model.pooler, cols=keep)
    state["classifier.weight"], state["classifier.bias"] = _fold_linear(model.classifier)

    config = compact_config(model.config, keep.numel(), num_heads, widths)
    return _build(config, state, training=model.training)


def _per_layer_masks(
    model: CofiForSequenceClassification, masks: Masks
) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """Validate ``masks`` and fill missing families with ones.

    Returns the hidden mask (C,) and, per layer, its "head_z" (H_l,), "mha_z" (),
    "int_z" (F_l,), "ffn_z" (). Masks are detached, copied to the host (which
    units survive sets the new shapes: a host decision, made once per mask) and
    kept in at least fp32 so that folding adds no rounding of its own; each
    index and scale goes to the weights' device where it is used.
    """
    unknown = set(masks) - {"hidden", "head", "mha", "intermediate", "ffn"}
    if unknown:
        raise ValueError(f"unknown mask families: {sorted(unknown)}")
    weight = model.embeddings.word_embeddings.weight
    dtype = torch.promote_types(weight.dtype, torch.float32)
    layers = list(model.layers)
    L, C = len(layers), model.config.hidden_size

    def get(family: str, shape: tuple[int, ...]) -> Tensor:
        value = masks.get(family)
        if value is None:
            return torch.ones(shape, dtype=dtype)
        if tuple(value.shape) != shape:
            raise ValueError(f"mask {family!r} has shape {tuple(value.shape)}, expected {shape}")
        return value.detach().to(device="cpu", dtype=dtype)

    def ones(n: int) -> Tensor:
        return torch.ones(n, dtype=dtype)

    # An (L, H) or (L, F) mask needs every layer at one size (a full-size model);
    # a compact model can still be compacted again with the other families.
    def per_layer(family: str, sizes: list[int]) -> Tensor | list[Tensor]:
        if masks.get(family) is None:
            return [ones(n) for n in sizes]
        if len(set(sizes)) > 1:
            raise ValueError(f"mask {family!r} needs layers of one size, got sizes {sizes}")
        return get(family, (L, sizes[0] if sizes else 0))

    hidden, mha, ffn = get("hidden", (C,)), get("mha", (L,)), get("ffn", (L,))
    head = per_layer("head", [layer.num_heads for layer in layers])  # L x (H,)
    inter = per_layer("intermediate", [layer.ffn_up.out_features for layer in layers])  # L x (F,)
    layers_z = [
        {"head_z": head[i], "mha_z": mha[i], "int_z": inter[i], "ffn_z": ffn[i]} for i in range(L)
    ]
    return hidden, layers_z


def _fold_linear(
    linear: nn.Linear,
    rows: Tensor | None = None,
    cols: Tensor | None = None,
    row_scale: Tensor | None = None,
    col_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Weight and bias of a Linear cut to ``rows`` x ``cols`` with scales folded in.

    y = row_scale * (W[rows, cols] @ (col_scale * x) + b[rows]): row_scale (len(rows),)
    multiplies outputs, col_scale (len(cols),) multiplies inputs. Returns
    weight (out', in') and bias (out',) as fresh tensors in the Linear's dtype.
    """
    w, b = linear.weight, linear.bias  # (out, in), (out,)
    dtype = w.dtype
    w = w.to(torch.promote_types(dtype, torch.float32))
    b = b.to(w.dtype)
    if rows is not None:
        rows = rows.to(w.device)
        w, b = w[rows], b[rows]
    if cols is not None:
        w = w[:, cols.to(w.device)]
    if col_scale is not None:
        w = w * col_scale.to(w.device)
    if row_scale is not None:
        row_scale = row_scale.to(w.device)
        w, b = w * row_scale[:, None], b * row_scale
    return w.to(dtype).contiguous().clone(), b.to(dtype).contiguous().clone()


def _fold_norm(norm: nn.LayerNorm, keep: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """LayerNorm over the kept dims (C',) whose output is scaled by the hidden mask z (C',)."""
    keep, z = keep.to(norm.weight.device), z.to(norm.weight.device)
    w = norm.weight[keep].to(z.dtype) * z
    b = norm.bias[keep].to(z.dtype) * z
    return w.to(norm.weight.dtype).contiguous(), b.to(norm.bias.dtype).contiguous()


def _embeddings_state(embeddings: nn.Module, keep: Tensor, z: Tensor) -> dict[str, Tensor]:
    cols = keep.to(embeddings.word_embeddings.weight.device)
    state = {
        f"embeddings.{name}.weight": getattr(embeddings, name).weight[:, cols].contiguous()  # (V, C')
        for name in ("word_embeddings", "position_embeddings", "token_type_embeddings")
    }
    w, b = _fold_norm(embeddings.LayerNorm, keep, z)
    state["embeddings.LayerNorm.weight"], state["embeddings.LayerNorm.bias"] = w, b
    return state


def _layer_state(
    layer: nn.Module,
    keep: Tensor,
    z: Tensor,
    head_z: Tensor,
    mha_z: Tensor,
    int_z: Tensor,
    ffn_z: Tensor,
) -> tuple[dict[str, Tensor], int, int]:
    """Compact parameters of one layer, its number of heads and its FFN width.

    keep, z: (C',) kept hidden dims and their mask values; head_z (H,), int_z (F,);
    mha_z and ffn_z are 0-d. A layer gate of 0 removes every head / unit, and with
    them the bias (row_scale is 0).
    """
    D = layer.head_size
    state: dict[str, Tensor] = {}

    heads = torch.nonzero((head_z != 0) & (mha_z != 0)).flatten()  # (H',)
    head_cols = (heads[:, None] * D + torch.arange(D, device=heads.device)).flatten()  # (H'*D,)
    for name in ("query", "key", "value"):
        state[f"{name}.weight"], state[f"{name}.bias"] = _fold_linear(
            getattr(layer, name), rows=head_cols, cols=keep
        )
    state["attn_out.weight"], state["attn_out.bias"] = _fold_linear(
        layer.attn_out,
        rows=keep,
        cols=head_cols,
        row_scale=z * mha_z,
        col_scale=head_z[heads].repeat_interleave(D),
    )

    units = torch.nonzero((int_z != 0) & (ffn_z != 0)).flatten()  # (F',)
    state["ffn_up.weight"], state["ffn_up.bias"] = _fold_linear(layer.ffn_up, rows=units, cols=keep)
    state["ffn_down.weight"], state["ffn_down.bias"] = _fold_linear(
        layer.ffn_down, rows=keep, cols=units, row_scale=z * ffn_z, col_scale=int_z[units]
    )

    # Both LayerNorms stay even when their sublayer is gone: the masked model
    # still normalises x + 0.
    for name in ("attn_norm", "ffn_norm"):
        state[f"{name}.weight"], state[f"{name}.bias"] = _fold_norm(getattr(layer, name), keep, z)
    return state, heads.numel(), units.numel()


def compact_config(
    config: CofiConfig, hidden_size: int, num_heads: list[int], widths: list[int]
) -> CofiConfig:
    """A copy of ``config`` (labels, head size, classifier width, ...) with the kept structure.

    num_attention_heads, intermediate_size and full_hidden_size keep their
    original values: they name the full shape the masks referred to, while layer_num_heads and
    layer_intermediate_size say what each layer has now.
    """
    # attention_head_size and classifier_hidden_size are stored resolved (not
    # re-derived from the new hidden size) and config.json always records them.
    config = copy.deepcopy(config)
    config.full_hidden_size = config.full_hidden_size  # resolved before the width changes
    config.hidden_size = hidden_size
    config.layer_num_heads = list(num_heads)
    config.layer_intermediate_size = list(widths)
    return config


def _build(config: CofiConfig, state: dict[str, Tensor], training: bool) -> CofiForSequenceClassification:
    """Instantiate without random init (meta device) and take ``state`` as the parameters."""
    with torch.device("meta"), warnings.catch_warnings():
        # Empty sublayers are zero-size Linears; initialising them warns, harmlessly.
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        model = CofiForSequenceClassification(config)
    # strict: every parameter of the new model must come from the compaction.
    model.load_state_dict(state, strict=True, assign=True)
    return model.train(training)


# ----------------------------------------------------------------------------
# saving and loading

_REGISTRATION_LOCK = threading.Lock()
_MISSING = object()


@contextmanager
def _registered_for_auto_classes(model: CofiForSequenceClassification) -> Iterator[None]:
    """Register the model's classes for the Auto classes during one save_pretrained.

    register_for_auto_class sets a class attribute (``_auto_class``) that makes
    save_pretrained copy the defining modules into the directory and write
    ``auto_map`` into config.json. Left set, it would also change how every other
    instance saves and loads, so it is undone afterwards, together with the
    ``auto_map`` that save_pretrained adds to the model's config.
    """
    classes = (type(model.config), type(model))
    with _REGISTRATION_LOCK:
        old_auto = [vars(cls).get("_auto_class", _MISSING) for cls in classes]
        old_map = vars(model.config).get("auto_map", _MISSING)
        if old_map is not _MISSING:  # save_pretrained edits it in place
            old_map = copy.deepcopy(old_map)
        try:
            type(model.config).register_for_auto_class()  # "AutoConfig"
            type(model).register_for_auto_class("AutoModelForSequenceClassification")
            yield
        finally:
            for cls, old in zip(classes, old_auto):
                if old is _MISSING:
                    delattr(cls, "_auto_class")
                else:
                    cls._auto_class = old
            if old_map is _MISSING:
                vars(model.config).pop("auto_map", None)
            else:
                model.config.auto_map = old_map


def save_model(
    model: CofiForSequenceClassification,
    path: str | os.PathLike,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Save ``model`` as a self-contained Hugging Face directory at ``path``, atomically.

    The directory holds config.json (with ``auto_map`` and the per-layer
    structure), model.safetensors, configuration_cofi.py and modeling_cofi.py.
    ``extra(directory)``, if given, writes more files (a tokenizer, masks, a
    manifest) into the directory before it is complete. It is written to a
    temporary sibling and renamed into place; an existing directory at ``path``
    is replaced only once the new one is complete. Its files and directories get
    the modes of plain writes under the umask (0644 and 0755 under the usual 022).
    Returns the path.
    """
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir (unlike tempfile.mkdtemp's 0o700) gives the usual umask permissions.
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    os.mkdir(tmp)
    try:
        with _registered_for_auto_classes(model):
            model.save_pretrained(tmp, safe_serialization=True)
        _check_saved(tmp)
        if extra is not None:
            extra(tmp)
        # safetensors (0.8) writes through a temporary file and leaves it owner-only (0600):
        # every file gets the mode of a plain write, so another account can serve the model
        mode = plain_file_mode()
        for file in tmp.rglob("*"):
            if file.is_file():
                file.chmod(mode)
        _fsync_tree(tmp)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_model(path: str | os.PathLike, verify: bool = False) -> CofiForSequenceClassification:
    """Load a model saved by ``save_model`` with this package's classes (no remote code), in eval mode.

    ``verify``: first check every file of the directory against its manifest
    (cofi.manifest), so that a truncated or modified file is a ManifestError naming
    it, not a crash somewhere inside safetensors or a model with other weights.
    """
    if verify:
        verify_files(path, read_manifest(path))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return CofiForSequenceClassification.from_pretrained(os.fspath(path))


def _check_saved(directory: Path) -> None:
    """Fail before the rename if save_pretrained did not write a loadable, self-contained model."""
    needed = ("config.json", "configuration_cofi.py", "modeling_cofi.py")
    missing = [name for name in needed if not (directory / name).is_file()]
    # one file, or shards with an index for a model above save_pretrained's shard size
    weights = ("model.safetensors", "model.safetensors.index.json")
    if not any((directory / name).is_file() for name in weights):
        missing.append("model.safetensors")
    if missing:
        raise RuntimeError(f"save_pretrained did not write {missing} into {directory}")


def _fsync_tree(directory: Path) -> None:
    """Flush every file and the directory itself, so the rename publishes complete data."""
    for file in directory.iterdir():
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    fsync_path(directory)




def _replace_dir(src: Path, dst: Path) -> None:
    """Move the complete directory ``src`` to ``dst``, replacing what is there.

    A rename cannot overwrite a non-empty directory, so an existing ``dst`` is
    first renamed aside and deleted only after ``src`` is in place. A crash in
    between leaves both complete directories as hidden siblings, never a
    partial one at ``dst``.
    """
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex}")
        os.rename(dst, old)
    try:
        os.rename(src, dst)
    except BaseException:
        if old is not None:
            os.rename(old, dst)
        raise
    fsync_path(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
