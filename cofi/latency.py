"""A latency model of CoFi structures on one deployment target.

A compact model with residual width d and, in layer l, h_l heads and u_l FFN
units is modelled as

    T = F(d) + Σ_l A(h_l, d) + Σ_l B(u_l, d),     A(0, d) = B(0, d) = 0

F is the fixed cost: embeddings, pooler, classifier, and every sublayer's residual
add and LayerNorm, which run even where the sublayer is removed (post-LN: x =
LN(x + bias)). A is what an attention sublayer adds to that (projections, scores),
B what an FFN sublayer adds; a sublayer with nothing kept adds nothing.

``LatencyModel`` holds those tables for one deployment and predicts a structure's
speedup (differentiably, for the Lagrangian of a speed target); cofi.profiling
measures them.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor

from cofi.configuration_cofi import CofiConfig
from cofi.deployment import Deployment
from cofi.sparsity import ModelShape, complete_counts


@dataclass(frozen=True)
class Structure:
    """What a compact model keeps: residual width, heads and FFN units per layer."""

    hidden: int
    heads: tuple[int, ...]
    units: tuple[int, ...]

    @classmethod
    def of(cls, config: CofiConfig) -> Structure:
        return cls(config.hidden_size, tuple(config.layer_num_heads), tuple(config.layer_intermediate_size))


def fingerprint(deployment: Deployment, hardware: dict) -> str:
    """A short hash naming one (hardware, deployment) pair."""
    text = json.dumps({"deployment": asdict(deployment), "hardware": hardware}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _interp1(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    """Piecewise-linear through (xs, ys) at x, linear beyond the ends (plain floats)."""
    if len(xs) == 1:
        return ys[0]
    j = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    return ys[j - 1] + (ys[j] - ys[j - 1]) * (x - xs[j - 1]) / (xs[j] - xs[j - 1])


class _Grid:
    """A grid xs (increasing) for piecewise-linear interpolation, linear beyond the ends,
    its segments precomputed so that a lookup is a few tensor ops: pruning does one every
    step, and on a GPU each op costs a kernel launch (see ``LatencyModel._tables``)."""

    def __init__(self, xs: Sequence[float], like: Tensor):
        xs = list(xs) if len(xs) > 1 else [xs[0], xs[0] + 1.0]  # one point: constant
        x = torch.tensor(xs, dtype=torch.float64)
        self.inner = x[1:-1].to(like)  # segment j covers [xs[j], xs[j+1]]; beyond the ends, the end segments
        self.start_and_inverse = torch.stack([x[:-1], 1.0 / x.diff()]).to(like)  # (2, K-1)

    def locate(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(segment index, position t in it: 0 at its start, 1 at its end) of each x; t is
        differentiable in x, the index is not (nothing is read back to the host)."""
        j = torch.searchsorted(self.inner, x.detach().contiguous())
        start, inverse = self.start_and_inverse.index_select(1, j.reshape(-1)).reshape((2,) + x.shape)
        return j, (x - start) * inverse

    def table(self, ys: Sequence[Sequence[float]], like: Tensor) -> Tensor:
        """Rows ys (R, K) as [value at each segment's start; change over it]: (2R, K-1)."""
        y = torch.tensor(ys, dtype=torch.float64)
        if y.shape[1] == 1:
            y = torch.cat([y, y], 1)
        return torch.cat([y[:, :-1], y.diff(dim=1)]).to(like)


def _lookup(table: Tensor, j: Tensor, t: Tensor) -> Tensor:
    """Values of a ``_Grid.table`` at located points: (R,) + t.shape."""
    start, change = table.index_select(1, j.reshape(-1)).reshape((table.shape[0],) + j.shape).chunk(2)
    return start + change * t


def _between(values: Tensor, j: Tensor, t: Tensor) -> Tensor:
    """``values`` (K, *S, L) interpolated along K at located points (j, t: shape S, one
    per row of S): (*S, L)."""
    index = torch.stack([j, j + 1]).unsqueeze(-1).expand((2,) + values.shape[1:])
    start, end = values.gather(0, index)
    return start + (end - start) * t.unsqueeze(-1)


@dataclass
class LatencyModel:
    """Measured tables of F(d), A(h, d) and B(u, d), each as a fraction of the unpruned
    model's latency measured in the same round (see ``profile``), and that latency in ms."""

    deployment: Deployment
    hardware: dict
    reference_ms: float  # the unpruned model (the teacher's shape): its fastest timing
    hidden_grid: list[int]
    head_grid: list[int]
    unit_grid: list[int]
    fixed: list[float]  # [hidden]
    attention: list[list[float]]  # [hidden][head]
    ffn: list[list[float]]  # [hidden][unit]
    scale: float = 1.0  # measured ÷ additive prediction on mixed structures (median): see ``profile``
    fit: dict = field(default_factory=dict)  # check_fit's summary

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.deployment, self.hardware)

    def _tables(self, like: Tensor) -> dict:
        """The grids and tables as tensors of ``like``'s dtype and device, built once per
        (device, dtype): pruning asks every step, and building them on a GPU would copy
        and read back (a device sync) each time. The head and unit grids start at (0, 0),
        a sublayer with nothing kept costs nothing, then (1, the first segment
        extrapolated): a real count ≥ 1 below the grid is extrapolated as before, and only
        an expected count under one unit falls linearly to 0."""
        cache = self.__dict__.setdefault("_tables_cache", {})  # not a field: to_dict leaves it out
        key = (like.device, like.dtype)
        if key not in cache:
            def from_zero(grid: list[int], table: list[list[float]]) -> tuple[list[float], list[list[float]]]:
                if grid[0] <= 1:
                    return [0] + grid, [[0.0] + row for row in table]
                return [0, 1] + grid, [[0.0, _interp1(1.0, grid, row)] + row for row in table]

            heads, attention = from_zero(self.head_grid, self.attention)
            units, ffn = from_zero(self.unit_grid, self.ffn)
            if len(self.hidden_grid) == 1:  # the hidden _Grid's second point: the same rows (constant in d)
                attention, ffn = attention * 2, ffn * 2
            grids = {"hidden": _Grid(self.hidden_grid, like), "heads": _Grid(heads, like), "units": _Grid(units, like)}
            cache[key] = {**grids,
                          "fixed": grids["hidden"].table([self.fixed], like),  # (2, Kd-1)
                          "attention": grids["heads"].table(attention, like),  # (2·Kd, Kh-1): a row per hidden width
                          "ffn": grids["units"].table(ffn, like)}  # (2·Kd, Ku-1)
        return cache[key]

    def relative_of_counts(self, shape: ModelShape, counts: Mapping[str, Tensor], calibrated: bool = True) -> Tensor:
        """Predicted latency ÷ the unpruned model's, from the units kept per group:

            T = scale · [F(d) + Σ_l mha(l)·A(heads(l), d) + Σ_l ffn(l)·B(units(l), d)]

        ``counts`` are ``sparsity.size_of_counts``'s (a missing family keeps everything):
        exact counts give the prediction for that structure; expected counts (sums of
        keep probabilities, layer gates' P(z>0)) give the expected latency, to first
        order, differentiable in log α: the gradient the latency constraint follows.
        Each term is at least 0 (extrapolated tables could dip below), the whole at least 1e-3.
        Counts may carry leading batch dimensions S (hidden S, the others (*S, L)) to
        predict several structures at once, one value each (S): pruning asks for the
        expected and the deterministic latency every step, and on a GPU one call of
        stacked counts launches half the kernels of two."""
        c = complete_counts(shape, counts)
        t = self._tables(c["hidden"])
        d = t["hidden"].locate(c["hidden"])  # the residual width's segment of the hidden grid
        fixed = _lookup(t["fixed"], *d)[0].clamp(min=0)  # (S)
        # per layer at every hidden width of the grid (Kd, *S, L), then at the width d: (*S, L)
        attention = _between(_lookup(t["attention"], *t["heads"].locate(c["head"])), *d).clamp(min=0)
        ffn = _between(_lookup(t["ffn"], *t["units"].locate(c["intermediate"])), *d).clamp(min=0)
        total = fixed + (c["mha"] * attention).sum(-1) + (c["ffn"] * ffn).sum(-1)
        return (self.scale * total if calibrated else total).clamp(min=1e-3)

    def _counts(self, s: Structure) -> dict[str, Tensor]:
        def t(x) -> Tensor:
            return torch.tensor(x, dtype=torch.float64)

        return {"hidden": t(s.hidden), "head": t(s.heads), "intermediate": t(s.units)}

    def _shape(self, s: Structure) -> ModelShape:
        # full sizes matter only for missing families; a Structure names them all
        return ModelShape(len(s.heads), max(self.head_grid), 1, max(self.hidden_grid), max(self.unit_grid))

    def additive(self, s: Structure) -> float:
        """F + ΣA + ΣB for structure ``s``, from the tables alone (a fraction of the unpruned latency)."""
        return float(self.relative_of_counts(self._shape(s), self._counts(s), calibrated=False))

    def relative(self, s: Structure) -> float:
        """Predicted latency of a compact model of structure ``s`` ÷ the unpruned model's."""
        return float(self.relative_of_counts(self._shape(s), self._counts(s)))

    def speedup(self, s: Structure) -> float:
        return 1.0 / self.relative(s)

    def predict_ms(self, s: Structure) -> float:
        return self.relative(s) * self.reference_ms

    def max_speedup(self, shape: ModelShape, families: Sequence[str], keep_multiple: int = 1) -> float:
        """The largest speedup pruning ``families`` can reach by this model: everything they
        can remove removed, the residual stream (if pruned) at its narrowest: ``keep_multiple``,
        or the narrowest width the profile measured if that is wider (never extrapolated)."""
        least = {f: torch.zeros(shape.num_layers, dtype=torch.float64) for f in families if f != "hidden"}
        if "hidden" in families:
            narrowest = max(min(keep_multiple, shape.hidden_size), min(self.hidden_grid))
            least["hidden"] = torch.tensor(float(narrowest), dtype=torch.float64)
        return 1.0 / float(self.relative_of_counts(shape, least))

    def check_reachable(self, speedup: float, shape: ModelShape, families: Sequence[str], keep_multiple: int = 1) -> None:
        """ValueError naming the largest speedup if ``speedup`` is beyond ``max_speedup``."""
        fastest = self.max_speedup(shape, families, keep_multiple)
        if speedup > fastest:
            raise ValueError(
                f"target_speedup={speedup:g} cannot be reached on {self.deployment.key}: the latency model allows "
                f"at most {fastest:.2f}x (the fixed costs remain when {', '.join(families)} are pruned away)"
            )

    def to_dict(self) -> dict:
        return {**asdict(self), "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, data: dict) -> LatencyModel:
        data = {k: v for k, v in data.items() if k != "fingerprint"}
        return cls(**{**data, "deployment": Deployment(**data["deployment"])})
