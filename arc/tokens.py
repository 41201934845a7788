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

2D positions: every token also gets ``N_POS`` position channels, so a model can see a grid as a
grid (``Encoded.pos``, :func:`layout_positions`, and :class:`LayoutTracker` while decoding)::

    POS_ROW    row of the token in its grid (0..29); NO_POS for BOS, IN, OUT, EOO, PAD
    POS_COL    column (0..29; a ROW token sits in column = the grid's width); NO_POS for markers
    POS_KIND   KIND_NONE (BOS, PAD), KIND_INPUT (IN and an input grid), KIND_OUTPUT (OUT, an output grid, EOO)
    POS_ALIGN  output tokens (OUT, cells, ROW): how many tokens back lies the cell of the same pair's
               input grid under the slot this token's successor fills ("the cursor": after OUT the
               cell (0, 0), after cell (r, c) the cell (r, c+1), after the ROW ending row r the cell
               (r+1, 0)); 0 when that cell is outside the input grid, and for every other token
    POS_MROW   input-grid cells and ROWs: the row counted from the bottom edge (H-1-r); output-grid
               tokens: their row, as POS_ROW; NO_POS for markers
    POS_MCOL   input-grid cells: the column counted from the right edge (W-1-c; NO_POS for ROW);
               output-grid tokens: their column, as POS_COL; NO_POS for markers
    POS_MAPS   N_MAPS channels, one per rotation/reflection of :data:`MAPS`: as POS_ALIGN, but back
               to the input cell that would fill the cursor's slot if the output were that map of
               the input (flip_h: the cursor (r, c) reads the input at (r, W-1-c)); 0 when outside

The mirrored channels place an input grid's cells as if reflected, so that "the mirrored cell of
the input" is a fixed relative offset for an output token (an input grid is given whole before any
output token is predicted, so counting from its far edges reveals nothing to be predicted).

The cursor looks only at tokens up to this one, never at the token being predicted, so a model
may use every channel while it generates. The grammar of a generated grid (the constrained
decoder's mask) also lives here, in :class:`LayoutTracker`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

from arc.grid import MAX_SIDE, N_COLOURS

PAD, ROW, IN, OUT, EOO, BOS = 10, 11, 12, 13, 14, 15
VOCAB_SIZE = 16
IGNORE_INDEX = -100  # cross-entropy's ignore_index: y on every non-target position
BLOCK_SIZE = 4096  # default maximum sequence length
MAX_GRID_TOKENS = MAX_SIDE * (MAX_SIDE + 1) + 1  # a 30x30 grid's rows, row ends, and EOO

TOKEN_NAMES = {PAD: "PAD", ROW: "ROW", IN: "IN", OUT: "OUT", EOO: "EOO", BOS: "BOS"}
# 2D position channels (see the module docstring)
POS_ROW, POS_COL, POS_KIND, POS_ALIGN, POS_MROW, POS_MCOL, POS_MAPS = 0, 1, 2, 3, 4, 5, 6
# The rotations and reflections other than the identity, as maps of an input grid (np.rot90 turns
# counter-clockwise); map_cells gives, for each, the input cell an output cell (r, c) reads.
MAPS = ("flip_h", "flip_v", "rot180", "transpose", "antitranspose", "rot90", "rot270")
N_MAPS = len(MAPS)
N_POS = POS_MAPS + N_MAPS
NO_POS = MAX_SIDE + 1  # row/column of a token outside any grid; rows use 0..29, columns 0..30
POS_SIZE = NO_POS + 1  # row and column ids are < POS_SIZE
KIND_NONE, KIND_INPUT, KIND_OUTPUT = 0, 1, 2
N_KINDS = 3
NO_GRID_POS = (NO_POS, NO_POS, KIND_NONE, 0, NO_POS, NO_POS) + (0,) * N_MAPS  # the channels of BOS and PAD
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
    pos: np.ndarray  # (L, N_POS) int64: each token's 2D position channels

    def xy(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of length L-1: y is x shifted by one, IGNORE_INDEX off target."""
        x = self.ids[:-1]
        y = np.where(self.target[1:], self.ids[1:], IGNORE_INDEX)
        return x, y

    def x_pos(self) -> np.ndarray:
        """The position channels of x: (L-1, N_POS)."""
        return self.pos[:-1]


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


def _input_positions(shape: tuple[int, int]) -> np.ndarray:
    """Positions of ``IN <rows>`` for an input grid of this shape: (1 + H*(W+1), N_POS)."""
    h, w = shape
    pos = np.empty((1 + h * (w + 1), N_POS), dtype=np.int64)
    pos[0] = (NO_POS, NO_POS, KIND_INPUT, 0, NO_POS, NO_POS) + (0,) * N_MAPS
    rows, cols = np.repeat(np.arange(h), w + 1), np.tile(np.arange(w + 1), h)
    pos[1:, POS_ROW], pos[1:, POS_COL], pos[1:, POS_KIND], pos[1:, POS_ALIGN] = rows, cols, KIND_INPUT, 0
    pos[1:, POS_MAPS:] = 0
    pos[1:, POS_MROW] = h - 1 - rows
    pos[1:, POS_MCOL] = np.where(cols < w, w - 1 - cols, NO_POS)
    return pos


def map_cells(r, c, h, w) -> list[tuple]:
    """For each of :data:`MAPS`, the input cell (row, col) that output cell (r, c) reads when the
    output is that map of an h x w input. Elementwise: numbers, numpy arrays or torch tensors."""
    return [(r, w - 1 - c), (h - 1 - r, c), (h - 1 - r, w - 1 - c), (c, r), (h - 1 - c, w - 1 - r),
            (c, w - 1 - r), (h - 1 - c, r)]


# The cell the cursor (r, c) itself reads (POS_ALIGN), then map_cells, as integer coefficients:
# (r', c') of column k = (r, c, h-1, w-1) @ _CELL_COEF[:, k], so an array of cursors maps at once.
_BASIS = np.eye(4, dtype=np.int64)
_CELL_COEF = np.array([[(b[0], b[1])] + map_cells(b[0], b[1], b[2] + 1, b[3] + 1) for b in _BASIS],
                      dtype=np.int64)  # (4, 1 + N_MAPS, 2): basis, identity then the maps, (row, col)
_CURSOR_COLS = MAX_SIDE + 2  # a cursor's column runs 0..MAX_SIDE (after a full row), its row 0..MAX_SIDE
_CURSORS = (MAX_SIDE + 1) * _CURSOR_COLS


def _source_cells(cursor_row: np.ndarray, cursor_col: np.ndarray, in_start: int, h: int, w: int) -> np.ndarray:
    """For cursors (n,) each: the sequence index of the input cell its slot reads as it is
    (POS_ALIGN) and under every map (POS_MAPS, :func:`map_cells`), the input's IN marker at
    ``in_start``, shape h x w; -1 where that cell is outside the input grid. Returns (n, 1 + N_MAPS)."""
    basis = np.stack([cursor_row, cursor_col, np.full_like(cursor_row, h - 1), np.full_like(cursor_row, w - 1)], axis=1)
    cells = np.einsum("nb,bkx->nkx", basis, _CELL_COEF)  # (n, 1 + N_MAPS, 2)
    r, c = cells[..., 0], cells[..., 1]
    inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
    return np.where(inside, in_start + 1 + r * (w + 1) + c, -1)


def _output_positions(shape: tuple[int, int] | None, start: int, in_start: int, in_shape: tuple[int, int]) -> np.ndarray:
    """Positions of ``OUT <rows> EOO`` whose OUT marker is at sequence index ``start``, for an
    output grid of ``shape``; ``shape=None``: the OUT marker alone, as a prompt ends."""
    h, w = shape if shape is not None else (0, 0)
    rows, cols = np.repeat(np.arange(h), w + 1), np.tile(np.arange(w + 1), h)  # (H*(W+1),) each
    n = 1 + len(rows) + (shape is not None)  # OUT, the grid's tokens, EOO
    pos = np.empty((n, N_POS), dtype=np.int64)
    pos[:] = (NO_POS, NO_POS, KIND_OUTPUT, 0, NO_POS, NO_POS) + (0,) * N_MAPS
    pos[1:1 + len(rows), POS_ROW], pos[1:1 + len(rows), POS_COL] = rows, cols
    pos[1:1 + len(rows), POS_MROW], pos[1:1 + len(rows), POS_MCOL] = rows, cols
    row_end = cols == w
    cursor_row = np.concatenate([[0], np.where(row_end, rows + 1, rows)])  # OUT's cursor is (0, 0)
    cursor_col = np.concatenate([[0], np.where(row_end, 0, cols + 1)])
    at = start + np.arange(len(cursor_row))
    source = _source_cells(cursor_row, cursor_col, in_start, *in_shape)  # (n, 1 + N_MAPS)
    back = np.where(source >= 0, at[:, None] - source, 0)
    pos[: len(cursor_row), POS_ALIGN], pos[: len(cursor_row), POS_MAPS:] = back[:, 0], back[:, 1:]
    return pos


def encode_instance(
    demos: Sequence[tuple[np.ndarray, np.ndarray]],
    test_input: np.ndarray,
    test_output: np.ndarray | None = None,
    *,
    targets: Targets = "outputs",
    block_size: int = BLOCK_SIZE,
    answer_room: int = MAX_GRID_TOKENS,
) -> Encoded:
    """Flatten demonstrations plus a test pair into one sequence of at most ``block_size`` ids.

    With ``test_output`` the sequence is a training instance that ends in the test output and
    EOO; without it, it is a prompt that ends with the test's OUT marker and keeps room for
    ``answer_room`` generated tokens (default: the largest possible output grid). Demonstrations
    are dropped (longest first) until it fits; raises :class:`DoesNotFit` if even one demonstration
    does not. ``targets``: ``"test"`` counts only the test output, ``"outputs"`` also every
    demonstration output after the first (the first has nothing to learn the rule from).
    """
    if targets not in TARGET_CHOICES:
        raise ValueError(f"targets must be one of {TARGET_CHOICES}, got {targets!r}")
    if not demos:
        raise ValueError("an instance needs at least one demonstration")
    demo_lengths = [pair_length(np.shape(i), np.shape(o)) for i, o in demos]
    tail = grid_length(np.shape(test_input)) + 2  # IN rows OUT
    tail += grid_length(np.shape(test_output)) + 1 if test_output is not None else answer_room
    keep = _choose_demos(demo_lengths, block_size - 1 - tail)

    pieces: list[np.ndarray] = [np.array([BOS], dtype=np.int64)]
    masks: list[np.ndarray] = [np.zeros(1, dtype=bool)]
    positions: list[np.ndarray] = [np.array([NO_GRID_POS], dtype=np.int64)]
    length = 1

    def add(ids: np.ndarray, is_target: bool, pos: np.ndarray) -> None:
        nonlocal length
        pieces.append(ids)
        masks.append(np.full(len(ids), is_target, dtype=bool))
        positions.append(pos)
        length += len(ids)

    def add_pair(inp: np.ndarray, out: np.ndarray | None, is_target: bool) -> None:
        in_start = length
        add(np.concatenate([[IN], grid_tokens(inp)]), False, _input_positions(np.shape(inp)))
        out_pos = _output_positions(None if out is None else np.shape(out), length, in_start, np.shape(inp))
        add(np.array([OUT], dtype=np.int64), False, out_pos[:1])
        if out is not None:
            add(np.append(grid_tokens(out), EOO), is_target, out_pos[1:])

    for n, i in enumerate(keep):
        inp, out = demos[i]
        add_pair(inp, out, targets == "outputs" and n > 0)
    add_pair(test_input, test_output, True)
    ids = np.concatenate(pieces)
    pos = np.concatenate(positions)
    return Encoded(ids=ids, target=np.concatenate(masks), demos_used=tuple(keep), demos_dropped=len(demos) - len(keep),
                   pos=pos)


MIN_ANSWER_TOKENS = 3  # the smallest grid, 1x1: a colour, ROW, EOO


def expected_answer_tokens(demos: Sequence[tuple[np.ndarray, np.ndarray]], test_input: np.ndarray) -> int:
    """Tokens (rows, ROW ends and EOO) of the largest answer a task suggests: its largest demonstration
    output, or the test input scaled by the demonstrations' largest output/input side ratios
    (sides capped at 30), whichever is larger."""
    h, w = np.shape(test_input)
    rh = max(np.shape(o)[0] / np.shape(i)[0] for i, o in demos)
    rw = max(np.shape(o)[1] / np.shape(i)[1] for i, o in demos)
    scaled = (min(MAX_SIDE, max(1, int(np.ceil(h * rh)))), min(MAX_SIDE, max(1, int(np.ceil(w * rw)))))
    return max([grid_length(np.shape(o)) for _, o in demos] + [grid_length(scaled)]) + 1


def encode_prompt(
    demos: Sequence[tuple[np.ndarray, np.ndarray]], test_input: np.ndarray, *, block_size: int = BLOCK_SIZE
) -> Encoded:
    """The prompt a model completes: everything up to and including the test's OUT marker.

    Keeps as many demonstrations as fit (dropping the longest first) beside room for the answer the
    task suggests (:func:`expected_answer_tokens`); the answer's budget is then everything the block
    has left, ``block_size - len(prompt)``, which the constrained decoder respects
    (:class:`LayoutTracker`). Raises :class:`DoesNotFit` when not even one demonstration and a 1x1
    answer fit.
    """
    room = min(expected_answer_tokens(demos, test_input), MAX_GRID_TOKENS)
    try:
        return encode_instance(demos, test_input, None, block_size=block_size, answer_room=room)
    except DoesNotFit:
        pass
    try:
        return encode_instance(demos, test_input, None, block_size=block_size, answer_room=MIN_ANSWER_TOKENS)
    except DoesNotFit as e:
        raise DoesNotFit(f"{e} and a 1x1 answer") from None


@dataclass
class _Parse:
    """Where a left-to-right reading of a sequence stands (the reference layout parser's state)."""

    kind: int = KIND_NONE
    row: int = 0
    col: int = 0
    width: int = 0  # the current grid's width once its first row has ended, else 0
    in_start: int = -1  # index of the IN marker of the last input grid
    in_shape: tuple[int, int] = (0, 0)  # that input grid's shape, known once its OUT follows


def _align(state: _Parse, cursor_row: int, cursor_col: int, at: int) -> int:
    h, w = state.in_shape
    if state.kind != KIND_OUTPUT or not (cursor_row < h and cursor_col < w):
        return 0
    return at - (state.in_start + 1 + cursor_row * (w + 1) + cursor_col)


def _align_maps(state: _Parse, cursor_row: int, cursor_col: int, at: int) -> list[int]:
    """The POS_MAPS channels of one token (the reference parser's, scalar by scalar)."""
    h, w = state.in_shape
    out = []
    for r, c in map_cells(cursor_row, cursor_col, h, w):
        inside = state.kind == KIND_OUTPUT and 0 <= r < h and 0 <= c < w
        out.append(at - (state.in_start + 1 + r * (w + 1) + c) if inside else 0)
    return out


def layout_positions(ids: Sequence[int]) -> tuple[np.ndarray, _Parse]:
    """The 2D position channels of every token, read from the ids alone, token by token (an input
    grid's mirrored channels are filled in when its OUT gives its shape): the reference twin of the
    positions :func:`encode_instance` builds grid by grid and of :class:`LayoutTracker`'s. Returns
    (L, N_POS) int64 and the final state (to continue from). Raises ValueError on an id outside the
    vocabulary."""
    state = _Parse()
    out = np.empty((len(ids), N_POS), dtype=np.int64)
    out[:, POS_MROW:POS_MAPS] = NO_POS
    out[:, POS_MAPS:] = 0
    grid_tokens_at: list[int] = []  # indices of the current input grid's cells and ROWs

    def mirror_input_grid() -> None:
        h, w = state.row, state.width
        for i in grid_tokens_at:
            r, c = out[i, POS_ROW], out[i, POS_COL]
            out[i, POS_MROW], out[i, POS_MCOL] = h - 1 - r, (w - 1 - c if c < w else NO_POS)
        grid_tokens_at.clear()

    for i, tok in enumerate(int(t) for t in ids):
        if 0 <= tok < N_COLOURS or tok == ROW:
            cursor = (state.row, state.col + 1) if tok != ROW else (state.row + 1, 0)
            out[i, :POS_MROW] = (state.row, state.col, state.kind, _align(state, *cursor, i))
            if state.kind == KIND_OUTPUT:
                out[i, POS_MROW:POS_MAPS] = (state.row, state.col)
                out[i, POS_MAPS:] = _align_maps(state, *cursor, i)
            elif state.kind == KIND_INPUT:
                grid_tokens_at.append(i)
            if tok == ROW:
                state.width = state.width or state.col
                state.row, state.col = state.row + 1, 0
            else:
                state.col += 1
        elif tok == IN:
            state = _Parse(KIND_INPUT, in_start=i)
            out[i, :POS_MROW] = (NO_POS, NO_POS, KIND_INPUT, 0)
        elif tok == OUT:
            in_shape = (0, 0)
            if state.kind == KIND_INPUT:
                in_shape = (state.row, state.width)
                mirror_input_grid()
            state = _Parse(KIND_OUTPUT, in_start=state.in_start, in_shape=in_shape)
            out[i, :POS_MROW] = (NO_POS, NO_POS, KIND_OUTPUT, _align(state, 0, 0, i))
            out[i, POS_MAPS:] = _align_maps(state, 0, 0, i)
        elif tok == EOO:
            out[i, :POS_MROW] = (NO_POS, NO_POS, state.kind, 0)
        elif tok in (BOS, PAD):
            out[i] = NO_GRID_POS
        else:
            raise ValueError(f"layout_positions: id {tok} at {i} is not in the vocabulary")
    if state.kind == KIND_INPUT:  # the ids end inside an input grid: mirror what was read of it
        mirror_input_grid()
    return out, state


def column_order(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each token goes when every input grid is read column by column (a Mamba2 layer's
    ``mamba_scan`` "c"): position channels (B, T, N_POS) -> (order, place), both (B, T) long, with
    ``order[b, s]`` the token read at step s and ``place[b, t]`` the step token t is read at (the
    inverse permutation). An input grid's cells and ROW tokens, ``IN`` excluded, are read column by
    column from the top, its ROWs as the last column (they sit in column W); every other token keeps
    its place, and so does an input grid whose channels say it runs past the sequence's end (one cut
    off by :func:`layout_positions` instead has its whole rows read as a grid of their own, and a row
    not whole keeps its place). Read from the channels alone: H = POS_ROW + POS_MROW + 1,
    W = POS_COL + POS_MCOL + 1 (for a ROW, its POS_COL)."""
    length = pos.shape[1]
    t = torch.arange(length, device=pos.device).expand(pos.shape[:2])  # (B, T)
    r, c, mrow, mcol = pos[..., POS_ROW], pos[..., POS_COL], pos[..., POS_MROW], pos[..., POS_MCOL]
    h = r + mrow + 1
    w = torch.where(mcol == NO_POS, c, c + mcol + 1)
    first = t - r * (w + 1) - c  # the grid's first cell
    moves = (pos[..., POS_KIND] == KIND_INPUT) & (r != NO_POS) & (mrow >= 0) & (first + h * (w + 1) <= length)
    place = torch.where(moves, first + c * h + r, t)
    order = torch.empty_like(place).scatter_(1, place, t)
    return order, place


class LayoutTracker:
    """Output grids being written, one per sequence of a batch: the grammar of a grid (which next
    tokens keep it well formed and let it end within the tokens left) and the 2D positions of each
    token written. The constrained decoder's only source of the grammar.

    Well formed (as :func:`decode_grid` reads it): colours and ROW, every row ends with ROW, all rows
    as wide as the first, 1..30 rows and columns, then EOO. With ``budget[i]`` tokens left for
    sequence i (EOO included), a colour is allowed only if its row, a ROW and EOO still fit, so the
    grid always ends in time. Finished sequences may only repeat EOO (until the decoder drops them).
    """

    def __init__(self, prompts: Sequence[np.ndarray], budget: Sequence[int], device: torch.device | str = "cpu") -> None:
        """``prompts``: ids ending with the test's OUT marker; ``budget``: tokens each may write."""
        states = [layout_positions(p)[1] for p in prompts]
        for i, (p, st) in enumerate(zip(prompts, states)):
            if len(p) == 0 or int(p[-1]) != OUT or st.in_shape == (0, 0):
                raise ValueError(f"LayoutTracker: prompt {i} does not end with an input grid and OUT")
        def col(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)
        self.at = col([len(p) for p in prompts])  # (n,) sequence index of the next token
        self.left = col(list(budget))  # (n,) tokens that may still be written
        self.in_start = col([st.in_start for st in states])
        self.in_h, self.in_w = col([st.in_shape[0] for st in states]), col([st.in_shape[1] for st in states])
        # (n, cursors, 1 + N_MAPS): for every cursor a grid can have, the input cells it reads (POS_ALIGN, POS_MAPS)
        every_row, every_col = np.divmod(np.arange(_CURSORS), _CURSOR_COLS)
        self.source = torch.as_tensor(np.stack([_source_cells(every_row, every_col, st.in_start, *st.in_shape)
                                                for st in states]), device=device)
        self.width = torch.zeros_like(self.at)  # 0 until the first ROW
        self.col = torch.zeros_like(self.at)  # cells in the current row
        self.rows = torch.zeros_like(self.at)  # finished rows
        self.done = torch.zeros_like(self.at, dtype=torch.bool)

    def allowed(self, vocab: int) -> torch.Tensor:
        """(n, vocab) bool: the tokens that keep each grid well formed and able to end in its budget."""
        n = self.at.numel()
        mask = torch.zeros(n, vocab, dtype=torch.bool, device=self.at.device)
        known = self.width > 0
        limit = torch.where(known, self.width, torch.full_like(self.width, MAX_SIDE))
        row_cost = torch.where(known, self.width - self.col, torch.ones_like(self.col))  # cells still needed in this row
        mask[:, :N_COLOURS] = ((self.col < limit) & (self.rows < MAX_SIDE) & (self.left >= row_cost + 2)).unsqueeze(1)
        mask[:, ROW] = (self.col > 0) & (~known | (self.col == self.width)) & (self.left >= 2)
        mask[:, EOO] = (self.col == 0) & (self.rows > 0) & (self.left >= 1)
        mask[self.done] = False
        mask[self.done, EOO] = True
        return mask

    def advance(self, tok: torch.Tensor) -> torch.Tensor:
        """Write tokens tok (n,): returns their position channels (n, N_POS), then moves on."""
        is_colour, is_row, is_eoo = tok < N_COLOURS, tok == ROW, tok == EOO
        cursor_row = torch.where(is_row, self.rows + 1, self.rows)
        cursor_col = torch.where(is_row, torch.zeros_like(self.col), self.col + 1)
        no_pos = torch.full_like(self.col, NO_POS)
        row, col = torch.where(is_eoo, no_pos, self.rows), torch.where(is_eoo, no_pos, self.col)
        cursor = cursor_row.clamp(max=MAX_SIDE) * _CURSOR_COLS + cursor_col.clamp(max=_CURSOR_COLS - 1)  # (n,)
        read = self.source.gather(1, cursor[:, None, None].expand(-1, 1, self.source.shape[2]))[:, 0]  # (n, 1 + N_MAPS)
        back = torch.where((read >= 0) & ~is_eoo[:, None], self.at[:, None] - read, torch.zeros_like(read))
        pos = torch.cat([torch.stack([row, col, torch.full_like(self.col, KIND_OUTPUT), back[:, 0], row, col], dim=1),
                         back[:, 1:]], dim=1)  # (n, N_POS)
        self.width = torch.where(is_row & (self.width == 0), self.col, self.width)  # the first row sets the width
        self.col = torch.where(is_colour, self.col + 1, torch.where(is_row, torch.zeros_like(self.col), self.col))
        self.rows = self.rows + is_row.long()
        self.done = self.done | is_eoo
        self.at = self.at + 1
        self.left = self.left - 1
        return pos

    _MOVING = ("at", "left", "width", "col", "rows", "done")  # what advance changes

    def state(self) -> dict[str, torch.Tensor]:
        """The fields :meth:`advance` changes (it replaces them, never writes into them, so a state
        taken here stays valid)."""
        return {name: getattr(self, name) for name in self._MOVING}

    def take(self, states: Sequence[dict[str, torch.Tensor]], which: torch.Tensor) -> None:
        """Sequence i moves to ``states[which[i]]`` (states of this batch from :meth:`state`): after a
        speculative decoder's verification, each sequence keeps its own number of drafted tokens."""
        for name in self._MOVING:
            stacked = torch.stack([st[name] for st in states])  # (S, n)
            setattr(self, name, stacked.gather(0, which[None, :])[0])

    def guess(self, ids: torch.Tensor) -> torch.Tensor:
        """A draft of each sequence's next token for speculative decoding (n,), -1 where there is none.
        ``ids`` (n, >= at) holds every id of each sequence so far (prompt and output).

        ARC outputs often repeat their input cell for cell, or the row above: the guess is the input
        grid's token under the cursor (cell, ROW at the input's width, EOO after its last row), a ROW
        where the output's width says so, else the token one output row up. A guess is only ever
        checked against the model, so a wrong one costs time, never a different answer."""
        r, c = self.rows, self.col
        limit = ids.shape[1] - 1
        in_rows = r < self.in_h
        cell = ids.gather(1, (self.in_start + 1 + r * (self.in_w + 1) + c).clamp(max=limit)[:, None])[:, 0]
        above = ids.gather(1, (self.at - self.width - 1).clamp(min=0, max=limit)[:, None])[:, 0]
        none = torch.full_like(r, -1)
        guess = torch.where(in_rows & (c < self.in_w), cell, none)
        guess = torch.where(in_rows & (c == self.in_w), torch.full_like(r, ROW), guess)
        guess = torch.where((r == self.in_h) & (c == 0), torch.full_like(r, EOO), guess)
        known = self.width > 0
        guess = torch.where((guess < 0) & known & (r > 0), above, guess)
        guess = torch.where(known & (c == self.width), torch.full_like(r, ROW), guess)
        return torch.where(self.done, none, guess)

    def select(self, index: torch.Tensor) -> None:
        """Keep only the sequences ``index`` (in that order)."""
        for name in ("at", "left", "in_start", "in_h", "in_w", "source", "width", "col", "rows", "done"):
            setattr(self, name, getattr(self, name)[index])


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
