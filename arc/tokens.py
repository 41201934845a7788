"""The token layout: the only module that knows token ids, how grids become sequences, which
positions are training targets, and how generated ids become a grid again.

Vocabulary (16 ids)::

    0-9   colours (a colour's id is the colour itself)
    10    PAD   padding, never a colour and never a target
    11    ROW   end of a grid row
    12    IN    an input grid starts
    13    OUT   an output grid starts
    14    EOO   end of an output grid
    15    BOS   start of sequence

A task instance reads::

    BOS  IN <in rows> OUT <out rows> EOO   (one per demonstration)   IN <test in rows> OUT <test out rows> EOO

where ``<rows>`` is each row's colours followed by ROW. A 2x3 grid [[1,2,3],[4,5,6]] is
``1 2 3 ROW 4 5 6 ROW``. At prediction time the sequence stops after the test's OUT and the model
writes ``<rows> EOO``; the shape follows from where ROW and EOO fall (see :func:`decode_grid`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from arc.grid import MAX_SIDE, N_COLOURS

PAD, ROW, IN, OUT, EOO, BOS = 10, 11, 12, 13, 14, 15
VOCAB_SIZE = 16
IGNORE_INDEX = -100  # cross-entropy's ignore_index: y on every non-target position
BLOCK_SIZE = 4096  # default maximum sequence length
MAX_GRID_TOKENS = MAX_SIDE * (MAX_SIDE + 1) + 1  # a 30x30 grid's rows, row ends, and EOO

TOKEN_NAMES = {PAD: "PAD", ROW: "ROW", IN: "IN", OUT: "OUT", EOO: "EOO", BOS: "BOS"}
Targets = Literal["test", "outputs"]
TARGET_CHOICES = ("test", "outputs")


def grid_tokens(grid: np.ndarray) -> np.ndarray:
    """A grid's rows, each followed by ROW: (H, W) ints in 0..9 -> (H * (W + 1),) int64."""
    grid = np.asarray(grid, dtype=np.int64)
    h, w = grid.shape
    out = np.empty((h, w + 1), dtype=np.int64)
    out[:, :w] = grid
    out[:, w] = ROW
    return out.reshape(-1)


def grid_length(shape: tuple[int, int]) -> int:
    """Tokens a grid of this shape takes, without markers."""
    h, w = shape
    return h * (w + 1)


def pair_length(input_shape: tuple[int, int], output_shape: tuple[int, int]) -> int:
    """Tokens one demonstration takes: IN rows OUT rows EOO."""
    return grid_length(input_shape) + grid_length(output_shape) + 3


@dataclass(frozen=True)
class Encoded:
    """One flattened instance. ``target`` marks the ids a model is trained to predict."""

    ids: np.ndarray  # (L,) int64
    target: np.ndarray  # (L,) bool: True where ids[i] is an output-grid token counted in the loss
    demos_used: tuple[int, ...]  # indices of the demonstrations kept, in sequence order
    demos_dropped: int

    def xy(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of length L-1: y is x shifted by one, IGNORE_INDEX off target."""
        x = self.ids[:-1]
        y = np.where(self.target[1:], self.ids[1:], IGNORE_INDEX)
        return x, y


class DoesNotFit(ValueError):
    """An instance whose test pair plus one demonstration exceeds the block."""


def _choose_demos(demo_lengths: Sequence[int], budget: int) -> list[int]:
    """Indices of demonstrations to keep so their total length is within budget: drop the
    longest first (keeps the most examples), never fewer than one, order preserved."""
    keep = list(range(len(demo_lengths)))
    total = sum(demo_lengths)
    by_length = sorted(keep, key=lambda i: (-demo_lengths[i], -i))
    for i in by_length:
        if total <= budget or len(keep) == 1:
            break
        keep.remove(i)
        total -= demo_lengths[i]
    if total > budget:
        raise DoesNotFit(f"needs {total - budget} more tokens than the block allows even with one demonstration")
    return keep


def encode_instance(
    demos: Sequence[tuple[np.ndarray, np.ndarray]],
    test_input: np.ndarray,
    test_output: np.ndarray | None = None,
    *,
    targets: Targets = "outputs",
    block_size: int = BLOCK_SIZE,
) -> Encoded:
    """Flatten demonstrations plus a test pair into one sequence of at most ``block_size`` ids.

    With ``test_output`` the sequence is a training instance that ends in the test output and
    EOO; without it, it is a prompt that ends with the test's OUT marker and keeps room for the
    largest possible output grid. Demonstrations are dropped (longest first) until it fits;
    raises :class:`DoesNotFit` if even one demonstration does not.
    ``targets``: ``"test"`` counts only the test output, ``"outputs"`` also every demonstration
    output after the first (the first has nothing to learn the rule from).
    """
    if targets not in TARGET_CHOICES:
        raise ValueError(f"targets must be one of {TARGET_CHOICES}, got {targets!r}")
    if not demos:
        raise ValueError("an instance needs at least one demonstration")
    demo_lengths = [pair_length(np.shape(i), np.shape(o)) for i, o in demos]
    tail = grid_length(np.shape(test_input)) + 2  # IN rows OUT
    tail += grid_length(np.shape(test_output)) + 1 if test_output is not None else MAX_GRID_TOKENS
    keep = _choose_demos(demo_lengths, block_size - 1 - tail)

    pieces: list[np.ndarray] = [np.array([BOS], dtype=np.int64)]
    masks: list[np.ndarray] = [np.zeros(1, dtype=bool)]

    def add(ids: np.ndarray, is_target: bool) -> None:
        pieces.append(ids)
        masks.append(np.full(len(ids), is_target, dtype=bool))

    for n, i in enumerate(keep):
        inp, out = demos[i]
        add(np.array([IN], dtype=np.int64), False)
        add(grid_tokens(inp), False)
        add(np.array([OUT], dtype=np.int64), False)
        add(np.append(grid_tokens(out), EOO), targets == "outputs" and n > 0)
    add(np.array([IN], dtype=np.int64), False)
    add(grid_tokens(test_input), False)
    add(np.array([OUT], dtype=np.int64), False)
    if test_output is not None:
        add(np.append(grid_tokens(test_output), EOO), True)
    ids = np.concatenate(pieces)
    return Encoded(ids=ids, target=np.concatenate(masks), demos_used=tuple(keep), demos_dropped=len(demos) - len(keep))


def encode_prompt(
    demos: Sequence[tuple[np.ndarray, np.ndarray]], test_input: np.ndarray, *, block_size: int = BLOCK_SIZE
) -> Encoded:
    """The prompt a model completes: everything up to and including the test's OUT marker."""
    return encode_instance(demos, test_input, None, block_size=block_size)


@dataclass(frozen=True)
class Decoded:
    """A generated grid, or the reason it is not one."""

    grid: np.ndarray | None
    reason: str | None  # None when grid is well formed

    @property
    def ok(self) -> bool:
        return self.grid is not None


def decode_grid(ids: Sequence[int]) -> Decoded:
    """Strictly parse generated ids (``<rows> EOO``, anything after EOO ignored) into a grid.

    Well formed means: only colours and ROW before EOO, every row ends with ROW, 1..30 rows and
    columns, all rows the same width, and an EOO at the end.
    """
    rows: list[list[int]] = []
    row: list[int] = []
    for pos, tok in enumerate(int(t) for t in ids):
        if 0 <= tok < N_COLOURS:
            row.append(tok)
            if len(row) > MAX_SIDE:
                return Decoded(None, f"row {len(rows) + 1} is longer than {MAX_SIDE} at token {pos}")
        elif tok == ROW:
            if not row:
                return Decoded(None, f"empty row {len(rows) + 1} at token {pos}")
            if rows and len(row) != len(rows[0]):
                return Decoded(None, f"ragged: row {len(rows) + 1} has {len(row)} cells, row 1 has {len(rows[0])}")
            rows.append(row)
            row = []
            if len(rows) > MAX_SIDE:
                return Decoded(None, f"more than {MAX_SIDE} rows")
        elif tok == EOO:
            if row:
                return Decoded(None, f"EOO at token {pos} ends an unterminated row")
            if not rows:
                return Decoded(None, "EOO before any row")
            return Decoded(np.array(rows, dtype=np.int64), None)
        else:
            return Decoded(None, f"unexpected {token_name(tok)} at token {pos}")
    return Decoded(None, f"no EOO after {len(rows)} rows" + (f" and a partial row of {len(row)}" if row else ""))


def token_name(tok: int) -> str:
    """'0'..'9' for colours, the structural name otherwise."""
    tok = int(tok)
    if 0 <= tok < N_COLOURS:
        return str(tok)
    return TOKEN_NAMES.get(tok, f"<unknown id {tok}>")


def render(ids: Sequence[int]) -> str:
    """A readable one-line rendering of ids, for docs and debugging."""
    return " ".join(token_name(t) for t in ids)
