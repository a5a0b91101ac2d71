"""Distillation losses of CoFi (section 6 of the method page).

    L_distill = w · L_pred + (1 − w) · L_layer

* ``PredictionDistillLoss``: KL(teacher ‖ student) of temperature-softened
  distributions, times T²; MSE of the scores for regression (one logit).
* ``LayerDistillLoss``: each chosen teacher layer is matched to the closest
  still-existing student layer (optionally monotone), and the student layer,
  through a learned linear map W_layer initialised to the identity, is pulled
  towards it with a padding-aware MSE.
* ``DistillationLoss``: the weighted total, returned with its parts for logging.
* ``Distillation``: that loss bound to its frozen teacher for one training run
  (``DistillationLoss.with_teacher``): the teacher's outputs, cached where worth it.

Conventions: teacher layers are 1-based (``hidden_states[i]``, index 0 being the
embeddings); ``match_layers`` and ``existing_layers`` index student layers from
0 (rows of the masks, columns of the distance matrix); ``LayerDistillLoss``
reports its matches 1-based, like the teacher layers. Everything numeric runs
in fp32, also under autocast. The teacher is frozen: its outputs are detached.

Two defects of the reference code are fixed here: "still exists" looks at both
sublayers of a layer (heads and FFN units), applied to layer indices rather than
sorted positions, and a teacher layer with no qualifying student layer gets no
match (None) instead of an index past the end.
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cofi.teacher_cache import TeacherBatch, TeacherCache

__all__ = [
    "PredictionDistillLoss",
    "existing_layers",
    "existing_layers_of_structure",
    "match_columns",
    "match_layers",
    "as_match_list",
    "default_teacher_layers",
    "LayerDistillLoss",
    "DistillationLoss",
    "Distillation",
]


def _is_real(x: object) -> bool:
    """A real number (Python or NumPy scalar), not a bool, tensor or string."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _fp32(device: torch.device):
    """A context with autocast off, so that what runs inside stays in fp32 (a device
    without autocast, such as meta, needs none)."""
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


# --------------------------------------------------------------------------- #
# Prediction-layer distillation
# --------------------------------------------------------------------------- #


class PredictionDistillLoss(nn.Module):
    """KL(softmax(t/T) ‖ softmax(s/T)) · T², averaged over the batch.

    Args:
        temperature: T > 0 (2 in the paper).

    Forward:
        student_logits: (B, K)
        teacher_logits: (B, K), detached inside (the teacher is frozen)
        returns: scalar fp32 tensor.

    With K == 1 (regression, e.g. STS-B) the loss is instead the MSE between
    the student and teacher scores, mean over the batch, with no temperature:
    the KL of a single logit is identically 0.
    """

    def __init__(self, temperature: float):
        super().__init__()
        if not (_is_real(temperature) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.temperature = float(temperature)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
            raise ValueError(
                "expected student and teacher logits of the same shape (B, K), got "
                f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
            )
        with _fp32(student_logits.device):
            s = student_logits.float()
            t = teacher_logits.detach().float()
            if s.shape[-1] == 1:
                return F.mse_loss(s, t)
            T = self.temperature
            log_p_s = F.log_softmax(s / T, dim=-1)
            log_p_t = F.log_softmax(t / T, dim=-1)
            # Σ_k p_t (log p_t − log p_s), summed over classes, mean over the batch.
            return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (T * T)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


# --------------------------------------------------------------------------- #
# Which student layers still exist
# --------------------------------------------------------------------------- #


def existing_layers(masks: Mapping[str, Tensor | None] | None, num_layers: int) -> Tensor:
    """Bool (L,): does student layer l keep at least one head or one FFN unit?

    exists[l] = (mha[l] != 0 and any(head[l] != 0)) or (ffn[l] != 0 and any(intermediate[l] != 0))

    ``masks`` uses the model's keys: "head" (L, H), "mha" (L,), "intermediate"
    (L, F), "ffn" (L,); "hidden" is ignored. A missing (or None) family counts
    as all kept. A layer whose MHA gate is on but which has no head left only
    adds a constant bias: it counts as having no attention. Soft mask values
    count as kept when non-zero. The result lives on the masks' device
    (CPU without masks) and carries no gradient.
    """
    masks = {k: v for k, v in (masks or {}).items() if v is not None}
    device = next((v.device for v in masks.values()), torch.device("cpu"))

    def kept(family: str, per_layer_dims: int) -> Tensor:
        z = masks.get(family)
        if z is None:
            return torch.ones(num_layers, dtype=torch.bool, device=device)
        z = z.detach()
        if z.dim() != per_layer_dims or z.shape[0] != num_layers:
            raise ValueError(
                f"mask {family!r} has shape {tuple(z.shape)}; expected {num_layers} layers "
                f"and {per_layer_dims} dimension(s)"
            )
        nonzero = z != 0
        return nonzero.any(dim=-1) if per_layer_dims == 2 else nonzero

    attention = kept("mha", 1) & kept("head", 2)
    ffn = kept("ffn", 1) & kept("intermediate", 2)
    return attention | ffn


def existing_layers_of_structure(
    layer_num_heads: Sequence[int], layer_intermediate_size: Sequence[int], device: torch.device | str = "cpu"
) -> Tensor:
    """Bool (L,) for a compacted model: a layer exists iff it has a head or an FFN unit.

    Takes ``config.layer_num_heads`` and ``config.layer_intermediate_size``
    (host lists; the result is made on ``device``); agrees with ``existing_layers`` on the masks the model was compacted from.
    """
    if len(layer_num_heads) != len(layer_intermediate_size):
        raise ValueError(
            f"layer_num_heads has {len(layer_num_heads)} entries, "
            f"layer_intermediate_size has {len(layer_intermediate_size)}"
        )
    exists = [h > 0 or f > 0 for h, f in zip(layer_num_heads, layer_intermediate_size)]
    return torch.tensor(exists, dtype=torch.bool, device=device)


# --------------------------------------------------------------------------- #
# Layer matching
# --------------------------------------------------------------------------- #


NO_MATCH = -1  # a teacher layer with no qualifying student layer


def match_columns(distances: Tensor, exists: Tensor | None, monotone: bool) -> Tensor:
    """For each teacher layer (row), the closest existing student layer (column).

    Args:
        distances: (N_t, L_s); rows in increasing teacher depth. Detached here:
            no gradient flows through the choice.
        exists: (L_s,) bool, or None for all layers.
        monotone: False: an independent argmin per row over existing layers.
            True: from the top row down, each row must match a strictly lower
            column than the row above it (the top row: any existing layer).

    Returns:
        (N_t,) long on the distances' device: a 0-based column, or NO_MATCH when
        no column qualifies (no existing layer at all, or, monotone, none below
        the match of the row above; a row without a match leaves that bound
        unchanged). Ties go to the lower layer; NaN distances lose to any finite
        one. Everything stays on the device: no host sync in a training step.
    """
    if distances.dim() != 2:
        raise ValueError(f"distances must be (N_t, L_s), got shape {tuple(distances.shape)}")
    n_teacher, n_student = distances.shape
    d = distances.detach().float()
    largest = torch.finfo(d.dtype).max
    d = torch.nan_to_num(d, nan=largest, posinf=largest)  # below +inf, which marks non-candidates
    allowed = _allowed(exists, n_student, d.device)
    if not monotone:
        closest = torch.where(allowed, d, math.inf).argmin(-1)  # (N_t,): argmin takes the first of ties
        return torch.where(allowed.any(), closest, NO_MATCH)

    columns = torch.arange(n_student, device=d.device)
    bound = torch.full((), n_student, device=d.device)  # exclusive upper limit for the next (lower) row
    matches = []
    for i in range(n_teacher - 1, -1, -1):
        candidates = allowed & (columns < bound)  # (L_s,)
        closest = torch.where(candidates, d[i], math.inf).argmin()
        found = candidates.any()
        matches.append(torch.where(found, closest, NO_MATCH))
        bound = torch.where(found, closest, bound)
    return torch.stack(matches[::-1])


def _allowed(exists: Tensor | None, n_student: int, device: torch.device) -> Tensor:
    if exists is None:
        return torch.ones(n_student, dtype=torch.bool, device=device)
    if tuple(exists.shape) != (n_student,):
        raise ValueError(f"exists must have shape ({n_student},), got {tuple(exists.shape)}")
    return exists.detach().to(device=device, dtype=torch.bool)


def match_layers(distances: Tensor, exists: Tensor | None, monotone: bool) -> list[int | None]:
    """``match_columns`` as a host list: 0-based columns, None for no match (one sync)."""
    return as_match_list(match_columns(distances, exists, monotone))


def as_match_list(columns: Tensor, base: int = 0) -> list[int | None]:
    """Match columns (NO_MATCH for none) as a list of ``base``-based layers and None."""
    return [None if j == NO_MATCH else j + base for j in columns.tolist()]


MATCHINGS = ("dynamic", "monotone", "fixed")


def fixed_columns(student_columns: Tensor, exists: Tensor | None, num_student_layers: int) -> Tensor:
    """Columns of a fixed matching: each 0-based student column if that layer exists, else NO_MATCH."""
    in_range = (student_columns >= 0) & (student_columns < num_student_layers)
    alive = _allowed(exists, num_student_layers, student_columns.device)
    alive = alive[student_columns.clamp(0, num_student_layers - 1)] & in_range
    return torch.where(alive, student_columns, NO_MATCH)


def default_teacher_layers(num_teacher_layers: int, count: int | None = None) -> list[int]:
    """Evenly spaced 1-based teacher layers ending at the top one.

    12 layers → [3, 6, 9, 12]; 6 layers → [2, 4, 6]. ``count`` defaults to
    every other layer, at most 4: min(4, max(1, L // 2)). Layer k of count is
    ceil(k · L / count).
    """
    L = num_teacher_layers
    if L < 1:
        raise ValueError(f"num_teacher_layers must be >= 1, got {L}")
    if count is None:
        count = min(4, max(1, L // 2))
    if not 1 <= count <= L:
        raise ValueError(f"count must be in [1, {L}], got {count}")
    return [-(-k * L // count) for k in range(1, count + 1)]


# --------------------------------------------------------------------------- #
# Layerwise distillation
# --------------------------------------------------------------------------- #


class LayerDistillLoss(nn.Module):
    """Σ_i MSE(W_layer · s_{m(i)}, t_i) over the chosen teacher layers i with a match m(i).

    Args:
        hidden_size: C, the teacher's (and the uncompacted student's) width.
        teacher_layers: 1-based teacher layers, strictly increasing
            (e.g. ``default_teacher_layers(6)`` = [2, 4, 6]).
        matching: how each teacher layer finds its student layer:
            "dynamic"  the closest existing student layer, chosen every step (CoFi);
            "monotone" dynamic, but deeper teacher layers match strictly deeper
                       student layers (small data sets: RTE, MRPC);
            "fixed"    always ``student_layers[k]`` for ``teacher_layers[k]``
                       (default: the same layer index), if it still exists.
        student_layers: 1-based student layers of the fixed matching.

    ``transform`` is W_layer, an ``nn.Linear(C, C)`` initialised to the
    identity; it belongs to training only (the model never holds it).

    Forward:
        student_hidden: L_s + 1 tensors (B, T, C_s), the student's
            ``hidden_states`` (embeddings first; only [1:] are candidates)
        teacher_hidden: L_t + 1 tensors (B, T, C), detached inside
        attention_mask: (B, T), non-zero for real tokens, or None (all real)
        exists: (L_s,) bool (``existing_layers``), or None (all exist)
        returns: (loss, columns) — a scalar fp32 tensor, and (N_t,) long on the
            device: for each teacher layer the matched 0-based student layer,
            or NO_MATCH (``as_match_list(columns, base=1)`` gives indices into
            ``student_hidden`` and None, at the cost of one host sync).

    Distance: mean over real tokens and the C output channels of the squared
    difference, fp32. All N_t × L_s distances are computed without gradient to
    choose the matches; the loss is then recomputed with gradient for the
    matched pairs only. No match at all gives a zero loss still attached to
    W_layer, so ``backward`` works. Nothing here waits for the device.
    """

    def __init__(
        self,
        hidden_size: int,
        teacher_layers: Sequence[int],
        matching: str = "dynamic",
        student_layers: Sequence[int] | None = None,
    ):
        super().__init__()
        layers = [int(i) for i in teacher_layers]
        if not layers or layers[0] < 1 or any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(
                "teacher_layers must be a non-empty, strictly increasing list of 1-based "
                f"layers, got {list(teacher_layers)}"
            )
        if matching not in MATCHINGS:
            raise ValueError(f"matching={matching!r}; allowed: {', '.join(MATCHINGS)}")
        if student_layers is not None and (matching != "fixed" or len(student_layers) != len(layers)):
            raise ValueError(
                f"student_layers {list(student_layers)} need matching='fixed' and one entry per teacher layer {layers}"
            )
        self.teacher_layers = layers
        self.matching = matching
        self.student_layers = [int(j) for j in (student_layers or layers)]
        # 0-based columns of the fixed matching, a buffer so that it follows the module's device
        self.register_buffer("student_columns", torch.tensor(self.student_layers) - 1, persistent=False)
        self.transform = nn.Linear(hidden_size, hidden_size)
        with torch.no_grad():
            self.transform.weight.copy_(torch.eye(hidden_size))
            self.transform.bias.zero_()

    def restrict_input(self, kept_dims: Tensor) -> "LayerDistillLoss":
        """A copy whose W_layer reads only the kept hidden dimensions (for a compacted student).

        kept_dims: (C,) bool mask of kept dims, or 1-D integer indices (C_s,)
        in the order the compacted model stores them. The copy's map is
        Linear(C_s, C) with the kept weight columns and the same bias, so its
        loss on the compact hidden states equals this module's loss on the
        masked model's hidden states (which are zero on pruned dims). New
        parameters: build the optimizer after calling this.
        """
        W = self.transform.weight
        if kept_dims.dtype == torch.bool:
            if kept_dims.shape != (W.shape[1],):
                raise ValueError(
                    f"a bool kept_dims must have shape ({W.shape[1]},), got {tuple(kept_dims.shape)}"
                )
            index = kept_dims.nonzero().squeeze(1)
        elif not kept_dims.is_floating_point() and not kept_dims.is_complex() and kept_dims.dim() == 1:
            index = kept_dims.long()
        else:
            raise TypeError(f"kept_dims must be a bool mask or 1-D integer indices, got {kept_dims.dtype}")
        index = index.to(W.device)
        out = copy.deepcopy(self)
        linear = nn.Linear(index.numel(), W.shape[0], device=W.device, dtype=W.dtype)
        with torch.no_grad():
            linear.weight.copy_(W.index_select(1, index))
            linear.bias.copy_(self.transform.bias)
        out.transform = linear
        return out

    def forward(
        self,
        student_hidden: Sequence[Tensor],
        teacher_hidden: Sequence[Tensor],
        attention_mask: Tensor | None,
        exists: Tensor | None,
    ) -> tuple[Tensor, list[int | None]]:
        if max(self.teacher_layers) >= len(teacher_hidden):
            raise ValueError(
                f"teacher_layers {self.teacher_layers} need {max(self.teacher_layers) + 1} teacher hidden "
                f"states (embeddings + layers), got {len(teacher_hidden)}"
            )
        if len(student_hidden) < 2:
            raise ValueError("student_hidden must hold the embeddings and at least one layer output")
        device = student_hidden[1].device
        with _fp32(device):
            # (L_s, B, T, C): every student layer through W_layer, with gradient.
            W, bias = self.transform.weight, self.transform.bias
            stacked = torch.stack([h.float() for h in student_hidden[1:]])
            mapped = F.linear(stacked, W.float(), bias.float())
            # (N_t, B, T, C): the chosen teacher layers, frozen.
            teacher = torch.stack([teacher_hidden[i].detach().float() for i in self.teacher_layers])
            if mapped.shape[1:] != teacher.shape[1:]:
                raise ValueError(
                    f"mapped student states {tuple(mapped.shape[1:])} and teacher states "
                    f"{tuple(teacher.shape[1:])} differ; is W_layer's input width right?"
                )
            B, T, C = teacher.shape[1:]
            if attention_mask is None:
                weights = torch.ones(B, T, device=device)
            else:
                weights = (attention_mask != 0).float().to(device)  # (B, T)
            denom = weights.sum().clamp_min(1.0) * C

            if self.matching == "fixed":
                columns = fixed_columns(self.student_columns, exists, mapped.shape[0])
            else:
                with torch.no_grad():  # the choice: N_t × L_s distances, one teacher layer at a time
                    target = mapped.detach()
                    distances = torch.stack(
                        [((target - t).square().sum(-1) * weights).sum((1, 2)) / denom for t in teacher]
                    )  # (N_t, L_s)
                columns = match_columns(distances, exists, monotone=self.matching == "monotone")

            found = columns != NO_MATCH  # (N_t,)
            diff = mapped.index_select(0, columns.clamp_min(0)) - teacher  # (N_t, B, T, C)
            per_layer = (diff.square().sum(-1) * weights).sum((1, 2))  # (N_t,)
            loss = torch.where(found, per_layer, 0.0).sum() / denom
        return loss, columns

    def extra_repr(self) -> str:
        return f"teacher_layers={self.teacher_layers}, matching={self.matching}"


# --------------------------------------------------------------------------- #
# The total
# --------------------------------------------------------------------------- #


class DistillationLoss(nn.Module):
    """L_distill = w · L_pred + (1 − w) · L_layer.

    Args:
        prediction: the prediction-layer loss.
        layer: the layerwise loss, or None: then the total is L_pred alone
            (unweighted; w is not used) and "layer" is reported as 0.
        prediction_weight: w in [0, 1] (λ ∈ {0.1, 0.3, 0.5} in the paper).

    Forward:
        student_logits, teacher_logits: (B, K)
        student_hidden, teacher_hidden: hidden-state tuples (needed with a layer loss)
        attention_mask: (B, T) or None; exists: (L_s,) bool or None
        returns: {"pred": L_pred, "layer": L_layer, "distill": total}, scalar
            tensors; the layer matches of the last call are read from
            ``last_matches`` (1-based student layers, None for no match; a
            host sync, so read it at logging time only).

    The Lagrangian sparsity term is not part of this loss; add it outside.
    """

    def __init__(
        self,
        prediction: PredictionDistillLoss,
        layer: LayerDistillLoss | None,
        prediction_weight: float,
    ):
        super().__init__()
        w = prediction_weight
        if not (_is_real(w) and 0.0 <= w <= 1.0):
            raise ValueError(f"prediction_weight must be in [0, 1], got {w!r}")
        self.prediction = prediction
        self.layer = layer
        self.prediction_weight = float(w)
        self._last_columns: Tensor | None = None

    @property
    def last_matches(self) -> list[int | None] | None:
        return None if self._last_columns is None else as_match_list(self._last_columns, base=1)

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        student_hidden: Sequence[Tensor] | None = None,
        teacher_hidden: Sequence[Tensor] | None = None,
        attention_mask: Tensor | None = None,
        exists: Tensor | None = None,
    ) -> dict[str, Tensor]:
        pred = self.prediction(student_logits, teacher_logits)
        if self.layer is None:
            self._last_columns = None
            return {"pred": pred, "layer": torch.zeros_like(pred.detach()), "distill": pred}
        if student_hidden is None or teacher_hidden is None:
            raise ValueError(
                "a layer loss needs student_hidden and teacher_hidden (output_hidden_states=True)"
            )
        layer, self._last_columns = self.layer(student_hidden, teacher_hidden, attention_mask, exists)
        w = self.prediction_weight
        return {"pred": pred, "layer": layer, "distill": w * pred + (1.0 - w) * layer}

    def extra_repr(self) -> str:
        return f"prediction_weight={self.prediction_weight}"

    def with_teacher(self, teacher: nn.Module, device: torch.device, lengths: Sequence[int],
                     cache_bytes: int = 0) -> Distillation:
        """This loss bound to ``teacher`` for a training run on ``device`` over examples of
        ``lengths`` tokens (``cache_bytes`` > 0: their teacher outputs kept, cofi.teacher_cache)."""
        return Distillation(teacher, self, device, lengths, cache_bytes)


class Distillation:
    """A student's distillation in one training run: the frozen teacher on the device, its
    outputs for a micro-batch (computed, or read from a ``TeacherCache``), and the loss
    parts of the student's outputs against them."""

    def __init__(self, teacher: nn.Module, loss: DistillationLoss, device: torch.device, lengths: Sequence[int],
                 cache_bytes: int = 0) -> None:
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        self.loss = loss.to(device)
        self.device = device
        layers = loss.layer.teacher_layers if loss.layer is not None else []
        self.cache = TeacherCache(self.teacher, lengths, layers, cache_bytes, device) if cache_bytes > 0 else None
        self._structure_exists: Tensor | None = None  # existing layers of a compacted student (fixed)

    @property
    def needs_hidden_states(self) -> bool:
        """Whether the loss reads every layer's hidden states (a layer loss)."""
        return self.loss.layer is not None

    @torch.no_grad()
    def teacher_outputs(self, examples: Sequence[int], inputs: tuple[Tensor, Tensor, Tensor]) -> TeacherBatch:
        """The teacher's outputs for the training examples ``examples``, whose inputs
        (ids, attention mask, token types) are ``inputs`` (the caller's autocast applies)."""
        if self.cache is not None:
            return self.cache(examples, *inputs)
        out = self.teacher(*inputs, output_hidden_states=self.needs_hidden_states)
        return TeacherBatch(out.logits, out.hidden_states)

    def parts(self, student: Any, teacher: TeacherBatch, attention_mask: Tensor,
              masks: Mapping[str, Tensor] | None, student_config: Any) -> dict[str, Tensor]:
        """The loss parts ("pred", "layer", "distill") of the student's outputs (with the
        structure ``masks``, or the compacted one of ``student_config``)."""
        return self.loss(student.logits, teacher.logits, student.hidden_states, teacher.hidden_states,
                         attention_mask, self._existing_layers(masks, student_config))

    def _existing_layers(self, masks: Mapping[str, Tensor] | None, config: Any) -> Tensor:
        if masks:
            return existing_layers(masks, config.num_hidden_layers)
        if self._structure_exists is None:
            self._structure_exists = existing_layers_of_structure(
                config.layer_num_heads, config.layer_intermediate_size, self.device)
        return self._structure_exists

    def data_loss(self, parts: Mapping[str, Tensor], scales: Mapping[str, float]) -> Tensor:
        """A micro-batch's share of the global batch's loss, w · L_pred + (1 − w) · L_layer,
        each part weighted by ``scales`` (its share of the examples, or of the tokens)."""
        if self.loss.layer is None:
            return parts["pred"] * scales["pred"]
        w = self.loss.prediction_weight
        return w * parts["pred"] * scales["pred"] + (1.0 - w) * parts["layer"] * scales["layer"]
