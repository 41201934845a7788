"""Grids: the facts every module shares and the one rule for what a valid grid is.

An ARC grid has 1..30 rows of 1..30 cells, all rows the same length, every cell a colour 0..9.
Task files (:mod:`arc.data`), submissions (:mod:`arc.score`), the token layout (:mod:`arc.tokens`),
augmentations and generators all take these facts from here, and every reader of a grid from JSON
(or from memory) checks it with :func:`parse_grid`.
"""
from __future__ import annotations

import numbers
from typing import Any

import numpy as np

N_COLOURS = 10  # colours are 0..9
MAX_SIDE = 30  # a grid has 1..MAX_SIDE rows and columns


class GridError(ValueError):
    """A value that is not a valid grid; the message names where it was found and the first problem."""


def _type_name(value: object) -> str:
    names = {dict: "an object", list: "a list", tuple: "a list", str: "a string", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _short(value: Any, n: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def parse_grid(value: object, where: str = "grid") -> np.ndarray:
    """A grid given as rows (JSON lists, tuples, or a 2-D integer numpy array) -> (H, W) int64.

    Valid: a non-empty list of equally long non-empty rows of integers 0..9 (bools and integral
    floats such as ``1.0`` are not integers), at most 30 rows and 30 columns. Raises
    :class:`GridError` naming ``where`` (e.g. ``train[1].input``) and the first problem found.
    """
    if isinstance(value, np.ndarray):
        if value.ndim != 2:
            raise GridError(f"{where} is an array with {value.ndim} dimensions, not 2")
        if not np.issubdtype(value.dtype, np.integer):
            raise GridError(f"{where} is an array of {value.dtype}, not integers")
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise GridError(f"{where} is {_type_name(value)}, not a list of rows")
    if not value:
        raise GridError(f"{where} is empty (no rows)")
    for r, row in enumerate(value):
        if not isinstance(row, (list, tuple)):
            raise GridError(f"{where} row {r} is {_type_name(row)}, not a list of cells")
        if not row:
            raise GridError(f"{where} row {r} is empty")
        if len(row) != len(value[0]):
            raise GridError(f"{where} is ragged: row {r} has {len(row)} cells, row 0 has {len(value[0])}")
    height, width = len(value), len(value[0])
    if height > MAX_SIDE or width > MAX_SIDE:
        raise GridError(f"{where} is {height}x{width}, larger than {MAX_SIDE}x{MAX_SIDE}")
    for r, row in enumerate(value):
        # `type(v) is int` keeps out bools and floats like 1.0; min/max run at C speed
        if all(type(v) is int for v in row) and 0 <= min(row) and max(row) < N_COLOURS:
            continue
        for c, v in enumerate(row):
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
                raise GridError(f"{where}[{r}][{c}] = {_short(v)} is not an integer colour 0-9")
            if not 0 <= v < N_COLOURS:
                raise GridError(f"{where}[{r}][{c}] = {v} is outside 0-9")
    return np.array(value, dtype=np.int64)  # (H, W)


def same_grid(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Exact equality of shape and every cell; None equals nothing."""
    return a is not None and b is not None and a.shape == b.shape and bool(np.array_equal(a, b))
