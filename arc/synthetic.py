"""A synthetic suite of ARC-style tasks with known rules, to prove the pipeline learns.

Each rule is a :class:`Rule`: a name, a one-line statement, and a sampler ``(rng, max_side)``
that draws the task's own parameters once (a colour map, a tiling factor, a direction) and
returns a pair generator ``(rng) -> (input, output) | None`` sharing them; ``None`` means "that
draw did not work out, try again". :func:`make_task` asks for pairs until it has enough valid,
non-degenerate ones (output differs from input, no repeated input); :func:`make_tasks` builds a
balanced, seed-deterministic list over the rules.

Grids are small by default (sides up to ``max_side=10``) so a CPU model can learn the rules and
sequences stay short; ``max_side`` may go up to 30. Colour 0 is the background throughout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from arc.data import Pair, Task
from arc.grid import MAX_SIDE

MIN_MAX_SIDE = 6  # the smallest max_side every rule can work with
_ATTEMPTS_PER_PAIR = 200

PairGen = Callable[[np.random.Generator], Optional[tuple[np.ndarray, np.ndarray]]]


@dataclass(frozen=True)
class Rule:
    """A task family: ``sampler(rng, max_side)`` fixes one task's parameters and returns its pair generator."""

    name: str
    doc: str
    sampler: Callable[[np.random.Generator, int], PairGen]


RULES: dict[str, Rule] = {}


def _rule(name: str) -> Callable:
    def register(sampler: Callable[[np.random.Generator, int], PairGen]) -> Callable:
        RULES[name] = Rule(name, (sampler.__doc__ or "").strip(), sampler)
        return sampler

    return register


# --- drawing helpers -------------------------------------------------------------------------

def _side(rng: np.random.Generator, lo: int, hi: int) -> int:
    """A side length in lo..hi inclusive (lo is lowered to hi when the range is empty)."""
    return int(rng.integers(min(lo, hi), hi + 1))


def _colours(rng: np.random.Generator, k: int, exclude: tuple[int, ...] = ()) -> list[int]:
    """k distinct non-background colours, none in ``exclude``."""
    pool = [c for c in range(1, 10) if c not in exclude]
    return [int(c) for c in rng.choice(pool, size=k, replace=False)]


def _noise(rng: np.random.Generator, h: int, w: int, palette: list[int], density: float) -> np.ndarray:
    """An (h, w) grid: each cell is a random palette colour with probability ``density``, else 0."""
    colours = rng.choice(palette, size=(h, w))
    return np.where(rng.random((h, w)) < density, colours, 0).astype(np.int64)


def _random_grid(rng: np.random.Generator, lo: int, hi_h: int, hi_w: int | None = None) -> np.ndarray:
    """A random grid with sides lo..hi, 1-4 colours and a random amount of background."""
    h, w = _side(rng, lo, hi_h), _side(rng, lo, hi_h if hi_w is None else hi_w)
    palette = _colours(rng, int(rng.integers(1, 5)))
    return _noise(rng, h, w, palette, float(rng.uniform(0.3, 1.0)))


def _dilate(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one cell in all 8 directions."""
    h, w = mask.shape
    padded = np.pad(mask, 1)
    out = np.zeros_like(mask)
    for dr in (0, 1, 2):
        for dc in (0, 1, 2):
            out |= padded[dr:dr + h, dc:dc + w]
    return out


def _blob(rng: np.random.Generator, n: int, max_h: int, max_w: int) -> np.ndarray:
    """A random 4-connected shape of n cells (fewer if the box is too small), cropped to its bounding box."""
    mask = np.zeros((max_h, max_w), dtype=bool)
    mask[rng.integers(max_h), rng.integers(max_w)] = True
    for _ in range(n - 1):
        padded = np.pad(mask, 1)
        near = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
        candidates = np.argwhere(near & ~mask)
        if len(candidates) == 0:
            break
        r, c = candidates[rng.integers(len(candidates))]
        mask[r, c] = True
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _place(rng: np.random.Generator, h: int, w: int, masks: list[np.ndarray]) -> list[tuple[int, int]] | None:
    """Top-left corners putting each mask in an (h, w) grid so no two touch, even diagonally;
    None if random tries fail."""
    blocked = np.zeros((h, w), dtype=bool)
    corners = []
    for m in masks:
        mh, mw = m.shape
        if mh > h or mw > w:
            return None
        for _ in range(30):
            r, c = int(rng.integers(h - mh + 1)), int(rng.integers(w - mw + 1))
            if not (blocked[r:r + mh, c:c + mw] & m).any():
                break
        else:
            return None
        placed = np.zeros((h, w), dtype=bool)
        placed[r:r + mh, c:c + mw] = m
        blocked |= _dilate(placed)
        corners.append((r, c))
    return corners


def _paint(grid: np.ndarray, mask: np.ndarray, corner: tuple[int, int], colour: int | np.ndarray) -> None:
    """Set the cells of ``mask`` placed at ``corner`` to ``colour`` (a colour, or an array shaped like mask)."""
    r, c = corner
    mh, mw = mask.shape
    window = grid[r:r + mh, c:c + mw]
    window[mask] = colour[mask] if isinstance(colour, np.ndarray) else colour


# --- geometry --------------------------------------------------------------------------------

def _map_rule(name: str, doc: str, fn: Callable[[np.ndarray], np.ndarray]) -> None:
    """Register a rule whose output is a fixed function of a random input grid."""

    def sampler(rng: np.random.Generator, max_side: int) -> PairGen:
        def pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
            g = _random_grid(rng, 3, max_side)
            return g, fn(g)

        return pair

    RULES[name] = Rule(name, doc, sampler)


_map_rule("flip_h", "Mirror the grid left-right.", lambda g: g[:, ::-1])
_map_rule("flip_v", "Mirror the grid up-down.", lambda g: g[::-1, :])
_map_rule("rot90", "Turn the grid a quarter turn anticlockwise.", lambda g: np.rot90(g, 1))
_map_rule("rot180", "Turn the grid half way round.", lambda g: np.rot90(g, 2))
_map_rule("transpose", "Mirror the grid across its main diagonal.", lambda g: g.T)


@_rule("tile")
def _tile(rng: np.random.Generator, max_side: int) -> PairGen:
    """Repeat the grid a x b times; (a, b) is fixed per task: 2x2, 1x2, 2x1, 1x3 or 3x1."""
    a, b = [(2, 2), (1, 2), (2, 1), (1, 3), (3, 1)][rng.integers(5)]

    def pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        g = _random_grid(rng, 2, min(max_side // a, 6), min(max_side // b, 6))
        return g, np.tile(g, (a, b))

    return pair


@_rule("upscale")
def _upscale(rng: np.random.Generator, max_side: int) -> PairGen:
    """Blow each cell up to a k x k block; k (2 or 3) is fixed per task."""
    k = int(rng.integers(2, 4))

    def pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        g = _random_grid(rng, 2, min(max_side // k, 5))
        return g, np.kron(g, np.ones((k, k), dtype=np.int64))

    return pair


@_rule("mirror_extend")
def _mirror_extend(rng: np.random.Generator, max_side: int) -> PairGen:
    """Append the grid's mirror image to its right (or, per task, below it)."""
    below = bool(rng.integers(2))

    def pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if below:
            g = _random_grid(rng, 2, max_side // 2, max_side)
            return g, np.vstack([g, g[::-1]])
        g = _random_grid(rng, 2, max_side, max_side // 2)
        return g, np.hstack([g, g[:, ::-1]])

    return pair


@_rule("shift")
def _shift(rng: np.random.Generator, max_side: int) -> PairGen:
    """Move everything one cell in a direction fixed per task; what leaves the grid is lost, 0 comes in."""
    dr, dc = [(-1, 0), (1, 0), (0, -1), (0, 1)][rng.integers(4)]

    def pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        h, w = _side(rng, 3, max_side), _side(rng, 3, max_side)
        g = _noise(rng, h, w, _colours(rng, int(rng.integers(1, 4))), float(rng.uniform(0.2, 0.6)))
        out = np.zeros_like(g)
        rows_to, cols_to = slice(max(dr, 0), h + min(dr, 0)), slice(max(dc, 0), w + min(dc, 0))
        rows_from, cols_from = slice(max(-dr, 0), h - max(dr, 0)), slice(max(-dc, 0), w - max(dc, 0))
        out[rows_to, cols_to] = g[rows_from, cols_from]
        return g, out

    return pair


# --- colours ---------------------------------------------------------------------------------

@_rule("colour_map")
def _colour_map(rng: np.random.Generator, max_side: int) -> PairGen:
    """Replace each colour by its image under a permutation of 1..9 fixed per task (0 stays)."""
    while True:  # no colour maps to itself, so every coloured cell changes
        perm = rng.permutation(9) + 1
        if not (perm == np.arange(1, 10)).any():
            break
    cmap = np.concatenate([[0], perm]).astype(np.int64)
    palette = _colours(rng, int(rng.integers(2, 5)))  # shared by all pairs so the demos show the whole map

    def pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        h, w = _side(rng, 2, max_side), _side(rng, 2, max_side)
        g = _noise(rng, h, w, palette, float(rng.uniform(0.5, 1.0)))
        cells = rng.choice(h * w, size=len(palette), replace=False)  # every palette colour appears
        g.reshape(-1)[cells] = palette
        return g, cmap[g]

    return pair


@_rule("swap_two_colours")
def _swap_two_colours(rng: np.random.Generator, max_side: int) -> PairGen:
    """The grid has exactly two colours; swap them."""

    def pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
        a, b = _colours(rng, 2, ()) if rng.random() < 0.7 else [0] + _colours(rng, 1)
        h, w = _side(rng, 2, max_side), _side(rng, 2, max_side)
        g = np.where(rng.random((h, w)) < rng.uniform(0.2, 0.8), a, b).astype(np.int64)
        if len(np.unique(g)) != 2:
            return None
        return g, np.where(g == a, b, a).astype(np.int64)

    return pair


@_rule("majority_colour")
def _majority_colour(rng: np.random.Generator, max_side: int) -> PairGen:
    """Output a 1x1 grid of the most frequent non-background colour."""

    def pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
        h, w = _side(rng, 3, max_side), _side(rng, 3, max_side)
        g = _noise(rng, h, w, _colours(rng, int(rng.integers(2, 5))), float(rng.uniform(0.3, 0.9)))
        counts = np.bincount(g.reshape(-1), minlength=10)[1:]
        top = np.sort(counts)[::-1]
        if top[0] == top[1]:
            return None
        return g, np.array([[int(np.argmax(counts)) + 1]], dtype=np.int64)

    return pair


@_rule("frame")
def _frame(rng: np.random.Generator, max_side: int) -> PairGen:
    """Paint the outermost ring of cells in a colour fixed per task."""
    colour = _colours(rng, 1)[0]

    def pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        g = _random_grid(rng, 3, max_side)
        out = g.copy()
        out[[0, -1], :] = colour
        out[:, [0, -1]] = colour
        return g, out

    return pair


# --- physics and drawing ---------------------------------------------------------------------

@_rule("gravity")
def _gravity(rng: np.random.Generator, max_side: int) -> PairGen:
    """Coloured cells fall to the bottom of their column, keeping their order."""

    def pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        h, w = _side(rng, 3, max_side), _side(rng, 3, max_side)
        g = _noise(rng, h, w, _colours(rng, int(rng.integers(1, 4))), float(rng.uniform(0.15, 0.5)))
        out = np.zeros_like(g)
        for c in range(w):
            fallen = g[:, c][g[:, c] != 0]
            out[h - len(fallen):, c] = fallen
        return g, out

    return pair


@_rule("line_to_edge")
def _line_to_edge(rng: np.random.Generator, max_side: int) -> PairGen:
    """From each dot draw a line in its colour to the edge, in a direction fixed per task."""
    dr, dc = [(-1, 0), (1, 0), (0, -1), (0, 1)][rng.integers(4)]

    def pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        h, w = _side(rng, 3, max_side), _side(rng, 3, max_side)
        k = int(rng.integers(1, min(3, h, w) + 1))
        rows, cols = rng.choice(h, k, replace=False), rng.choice(w, k, replace=False)  # lines never cross dots
        g = np.zeros((h, w), dtype=np.int64)
        g[rows, cols] = rng.choice(np.arange(1, 10), size=k)
        out = g.copy()
        for r, c in zip(rows, cols):
            colour = g[r, c]
            while 0 <= r < h and 0 <= c < w:
                out[r, c] = colour
                r, c = r + dr, c + dc
        return g, out

    return pair


@_rule("count_to_bar")
def _count_to_bar(rng: np.random.Generator, max_side: int) -> PairGen:
    """Count the coloured cells; output a bar that long in their colour (a row, or per task a column)."""
    column = bool(rng.integers(2))

    def pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        h, w = _side(rng, 3, max_side), _side(rng, 3, max_side)
        k = int(rng.integers(1, min(max_side, h * w // 2, 9) + 1))
        colour = _colours(rng, 1)[0]
        g = np.zeros((h, w), dtype=np.int64)
        g.reshape(-1)[rng.choice(h * w, size=k, replace=False)] = colour
        return g, np.full((k, 1) if column else (1, k), colour, dtype=np.int64)

    return pair


@_rule("denoise")
def _denoise(rng: np.random.Generator, max_side: int) -> PairGen:
    """Remove the scattered pixels of a noise colour fixed per task, restoring what lies beneath."""
    noise = _colours(rng, 1)[0]

    def pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        h, w = _side(rng, 5, max_side), _side(rng, 5, max_side)
        clean = np.zeros((h, w), dtype=np.int64)
        for colour in _colours(rng, int(rng.integers(1, 4)), (noise,)):
            r0, c0 = int(rng.integers(h - 1)), int(rng.integers(w - 1))
            clean[r0:r0 + _side(rng, 2, h - r0), c0:c0 + _side(rng, 2, w - c0)] = colour
        g = clean.copy()
        g.reshape(-1)[rng.choice(h * w, size=int(rng.integers(1, max(2, h * w // 8) + 1)), replace=False)] = noise
        return g, clean

    return pair


# --- objects ---------------------------------------------------------------------------------

@_rule("crop_object")
def _crop_object(rng: np.random.Generator, max_side: int) -> PairGen:
    """Cut out the bounding box of the single object on the background."""

    def pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        h, w = _side(rng, 4, max_side), _side(rng, 4, max_side)
        bh, bw = _side(rng, 1, min(h - 1, 6)), _side(rng, 1, min(w - 1, 6))
        mask = _blob(rng, int(rng.integers(2, bh * bw + 2)), bh, bw)
        colours = rng.choice(_colours(rng, int(rng.integers(1, 4))), size=mask.shape)
        g = np.zeros((h, w), dtype=np.int64)
        r, c = int(rng.integers(h - mask.shape[0] + 1)), int(rng.integers(w - mask.shape[1] + 1))
        _paint(g, mask, (r, c), colours)
        return g, g[r:r + mask.shape[0], c:c + mask.shape[1]].copy()

    return pair


@_rule("recolour_largest")
def _recolour_largest(rng: np.random.Generator, max_side: int) -> PairGen:
    """Objects share one colour; the largest is recoloured to a second colour (both fixed per task)."""
    colour, largest_colour = _colours(rng, 2)

    def pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
        h, w = _side(rng, 5, max_side), _side(rng, 5, max_side)
        big = int(rng.integers(3, 9))
        sizes = [big] + [int(s) for s in rng.integers(1, big, size=int(rng.integers(1, 4)))]
        masks = [_blob(rng, s, 4, 4) for s in sizes]
        corners = _place(rng, h, w, masks)
        if corners is None:
            return None
        g = np.zeros((h, w), dtype=np.int64)
        for m, at in zip(masks, corners):
            _paint(g, m, at, colour)
        out = g.copy()
        _paint(out, masks[0], corners[0], largest_colour)
        return g, out

    return pair


@_rule("recolour_by_size")
def _recolour_by_size(rng: np.random.Generator, max_side: int) -> PairGen:
    """Objects of one colour are recoloured by their size (1-4 cells), with a size -> colour map fixed per task."""
    colour, *by_size = _colours(rng, 5)

    def pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
        h, w = _side(rng, 5, max_side), _side(rng, 5, max_side)
        sizes = [int(s) for s in rng.integers(1, 5, size=int(rng.integers(2, 6)))]
        masks = [_blob(rng, s, 3, 3) for s in sizes]
        corners = _place(rng, h, w, masks)
        if corners is None:
            return None
        g = np.zeros((h, w), dtype=np.int64)
        out = g.copy()
        for m, at in zip(masks, corners):
            _paint(g, m, at, colour)
            _paint(out, m, at, by_size[int(m.sum()) - 1])
        return g, out

    return pair


@_rule("fill_enclosed")
def _fill_enclosed(rng: np.random.Generator, max_side: int) -> PairGen:
    """Fill the inside of every closed outline with a colour fixed per task; outlines with a gap stay empty."""
    outline, fill = _colours(rng, 2)

    def pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
        h, w = _side(rng, 5, max_side), _side(rng, 5, max_side)
        rings, insides = [], []
        for _ in range(int(rng.integers(1, 4))):
            rh, rw = _side(rng, 3, min(h, 6)), _side(rng, 3, min(w, 6))
            ring = np.ones((rh, rw), dtype=bool)
            ring[1:-1, 1:-1] = False
            closed = len(rings) == 0 or rng.random() < 0.7  # at least one outline per pair is closed
            if not closed:  # open a gap at a side cell (a corner gap would still enclose)
                side_cells = [(r, c) for r, c in np.argwhere(ring) if (r in (0, rh - 1)) != (c in (0, rw - 1))]
                ring[tuple(side_cells[rng.integers(len(side_cells))])] = False
            rings.append(ring)
            inside = np.pad(np.ones((rh - 2, rw - 2), dtype=bool), 1)
            insides.append(inside if closed else np.zeros_like(inside))
        boxes = [np.ones(r.shape, dtype=bool) for r in rings]  # place whole boxes so nothing sits inside a ring
        corners = _place(rng, h, w, boxes)
        if corners is None:
            return None
        g = np.zeros((h, w), dtype=np.int64)
        for ring, at in zip(rings, corners):
            _paint(g, ring, at, outline)
        out = g.copy()
        for inside, at in zip(insides, corners):
            _paint(out, inside, at, fill)
        return g, out

    return pair


# --- tasks -----------------------------------------------------------------------------------

def _valid(grid: np.ndarray) -> bool:
    return (
        grid.ndim == 2
        and 1 <= grid.shape[0] <= MAX_SIDE
        and 1 <= grid.shape[1] <= MAX_SIDE
        and int(grid.min()) >= 0
        and int(grid.max()) <= 9
    )


def make_task(
    rule: str,
    rng: np.random.Generator,
    *,
    n_demos: int = 3,
    n_test: int = 1,
    max_side: int = 10,
    task_id: str | None = None,
) -> Task:
    """One task of ``rule``: ``n_demos`` demonstrations and ``n_test`` test pairs (outputs known),
    all drawn with the same task parameters. Every output differs from its input and no input
    repeats. ``task_id`` defaults to ``f"syn-{rule}-0"``; source is ``f"synthetic:{rule}"``."""
    if rule not in RULES:
        raise ValueError(f"unknown synthetic rule {rule!r}; known: {sorted(RULES)}")
    if not MIN_MAX_SIDE <= max_side <= MAX_SIDE:
        raise ValueError(f"max_side must be in {MIN_MAX_SIDE}..{MAX_SIDE}, got {max_side}")
    if n_demos < 1 or n_test < 0:
        raise ValueError(f"need n_demos >= 1 and n_test >= 0, got n_demos={n_demos}, n_test={n_test}")
    generate = RULES[rule].sampler(rng, max_side)
    pairs: list[Pair] = []
    seen: set[bytes] = set()
    attempts = 0
    while len(pairs) < n_demos + n_test:
        attempts += 1
        if attempts > _ATTEMPTS_PER_PAIR * (n_demos + n_test):
            raise RuntimeError(
                f"synthetic rule {rule}: could not draw {n_demos + n_test} distinct pairs (max_side={max_side})"
            )
        drawn = generate(rng)
        if drawn is None:
            continue
        inp, out = (np.ascontiguousarray(g, dtype=np.int64) for g in drawn)
        if not (_valid(inp) and _valid(out)):
            raise RuntimeError(f"synthetic rule {rule} made an invalid grid: shapes {inp.shape} -> {out.shape}")
        key = bytes(inp.shape) + inp.tobytes()
        if key in seen or (inp.shape == out.shape and np.array_equal(inp, out)):
            continue
        seen.add(key)
        pairs.append(Pair(inp, out))
    return Task(
        id=task_id if task_id is not None else f"syn-{rule}-0",
        train=tuple(pairs[:n_demos]),
        test=tuple(pairs[n_demos:]),
        source=f"synthetic:{rule}",
    )


def make_tasks(
    n: int,
    *,
    seed: int,
    rules: list[str] | None = None,
    n_demos: int = 3,
    n_test: int = 1,
    max_side: int = 10,
) -> list[Task]:
    """``n`` tasks cycling through ``rules`` (default: all, in RULES order), so each rule gets
    n / len(rules) tasks, give or take one. Task k depends only on (seed, k, its rule), so a longer
    list extends a shorter one. Ids are ``f"syn-{rule}-{seed}-{k}"``: unique across seeds."""
    names = list(RULES) if rules is None else list(rules)
    if not names:
        raise ValueError("make_tasks: rules is empty")
    unknown = [r for r in names if r not in RULES]
    if unknown:
        raise ValueError(f"unknown synthetic rules {unknown}; known: {sorted(RULES)}")
    tasks = []
    for k in range(n):
        rule = names[k % len(names)]
        rng = np.random.default_rng([seed, k])
        task_id = f"syn-{rule}-{seed}-{k}"
        tasks.append(make_task(rule, rng, n_demos=n_demos, n_test=n_test, max_side=max_side, task_id=task_id))
    return tasks
