"""Labels of a classification task: integers or strings, mapped to class ids.

The order of the classes (their ids) is, in this order of precedence:

1. an explicit list of names: ids in the list's order; a string label is a name
   of the list, an integer label is an id into it (0 .. len - 1);
2. otherwise the distinct labels of the training split, sorted: integers
   numerically, strings by Unicode code point (``sorted`` in Python), so
   ``["Business", "Sports", "World"]`` get ids 0, 1, 2 and integer labels
   ``{0, 1}`` keep their values.

A validation label that the training split never uses, labels that mix integers
and strings, and labels that are neither are errors naming file, row and column.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from cofi.data import data_error

_INTEGER = re.compile(r"[+-]?\d+")


def _kind(value: object) -> str | None:
    """"integer", "string", or None (neither: a float, a bool, a missing value)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return "integer"
    if isinstance(value, str):
        # a CSV column of numbers with one word in it is read as strings: "1" is still an integer
        return "integer" if _INTEGER.fullmatch(value.strip()) else "string"
    return None


def _normalise(value: object, kind: str) -> int | str:
    return int(value) if kind == "integer" else str(value)


def _check_kinds(labels: pd.Series, source: str, column: str, expected: str | None) -> str:
    """The one kind of every label in ``labels`` (must be ``expected``, the training labels' kind, if given)."""
    before = "the training labels" if expected else "the labels before it"
    missing = labels.isna().to_numpy()
    if missing.any():  # first: a missing cell turns a column of integers into floats
        raise data_error(source, "empty label", int(missing.argmax()), column)
    for row, value in enumerate(labels.tolist()):
        kind = _kind(value)
        if kind is None:
            raise data_error(source, f"label {value!r} is neither an integer nor a string", row, column)
        if expected is None:
            expected = kind
        elif kind != expected:
            raise data_error(source, f"mixed label types: {value!r} is {'an' if kind == 'integer' else 'a'} "
                                     f"{kind}, but {before} are {expected}s", row, column)
    return expected  # type: ignore[return-value]


@dataclass(frozen=True)
class LabelSet:
    """The classes of a task: ``names`` in id order, and the kind of its labels."""

    names: tuple[str, ...]
    kind: str  # "integer" or "string": what the training split's labels are
    explicit: bool  # names given in params: integer labels are ids into them

    @classmethod
    def from_train(
        cls, labels: pd.Series, source: str, column: str, names: Sequence[str] | None = None
    ) -> LabelSet:
        """The label set of a training split (see the module docstring for the order)."""
        kind = _check_kinds(labels, source, column, None)
        if names is not None:
            label_set = cls(tuple(str(n) for n in names), kind, explicit=True)
            label_set.encode(labels, source, column)  # every training label must be one of them
            return label_set
        return cls(tuple(str(v) for v in sorted({_normalise(v, kind) for v in labels.tolist()})), kind, False)

    def encode(self, labels: pd.Series, source: str, column: str) -> list[int]:
        """Class ids of ``labels``, which must be of this set's kind and among its classes."""
        _check_kinds(labels, source, column, self.kind)
        index = {name: i for i, name in enumerate(self.names)}
        ids = []
        for row, value in enumerate(labels.tolist()):
            value = _normalise(value, self.kind)
            if self.explicit and self.kind == "integer":
                if not 0 <= value < len(self.names):
                    raise data_error(source, f"label {value} is not an id of the {len(self.names)} labels "
                                             f"{list(self.names)}", row, column)
                ids.append(value)
            elif str(value) in index:
                ids.append(index[str(value)])
            else:
                where = f"the labels {list(self.names)}" if self.explicit else "the training split"
                raise data_error(source, f"label {value!r} does not occur in {where}", row, column)
        return ids
