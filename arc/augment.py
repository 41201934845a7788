"""Augmentations of ARC tasks, recorded and invertible.

This module owns the table of the 8 symmetries of the square (the dihedral group D4: names,
grid functions, inverses, composition), colour permutations and demonstration-order shuffles,
and :class:`Transform`, which bundles one of each and applies them to every grid of a task
alike. A transform is a value: it can be saved (:meth:`Transform.to_dict`), printed
(``rot90+colours(0 3 1 ...)+order(2 0 1)``), inverted and composed, so a prediction made on a
transformed task maps back to the original task with :meth:`Transform.invert_grid`.

Training draws transforms with :func:`random_transform`; test-time voting uses the fixed list
:func:`views` (the 8 dihedrals first, then dihedrals with colour permutations).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from arc.data import Pair, Task
from arc.grid import N_COLOURS


# The 8 symmetries of the square. rot90 is np.rot90 (a quarter turn anticlockwise);
# anti-transpose mirrors across the anti-diagonal (top-right to bottom-left).
DIHEDRAL_NAMES: tuple[str, ...] = (
    "identity", "rot90", "rot180", "rot270", "flip_h", "flip_v", "transpose", "anti_transpose",
)
DIHEDRAL_FUNCS: tuple[Callable[[np.ndarray], np.ndarray], ...] = (
    lambda g: g,
    lambda g: np.rot90(g, 1),
    lambda g: np.rot90(g, 2),
    lambda g: np.rot90(g, 3),
    lambda g: g[:, ::-1],  # mirror left-right
    lambda g: g[::-1, :],  # mirror up-down
    lambda g: g.T,
    lambda g: g[::-1, ::-1].T,
)
# DIHEDRAL_INVERSE[k]: the index that undoes k. Only the two quarter turns are not self-inverse.
DIHEDRAL_INVERSE: tuple[int, ...] = (0, 3, 2, 1, 4, 5, 6, 7)
N_DIHEDRAL = len(DIHEDRAL_NAMES)


def dihedral(grid: np.ndarray, k: int) -> np.ndarray:
    """Apply dihedral transform ``k`` (an index into DIHEDRAL_NAMES) to a grid: (H, W) -> (H, W) or (W, H)."""
    return np.ascontiguousarray(DIHEDRAL_FUNCS[k](np.asarray(grid)))


def dihedral_index(name: str) -> int:
    """The index of a dihedral transform by name, e.g. ``dihedral_index("rot90") == 1``."""
    if name not in DIHEDRAL_NAMES:
        raise ValueError(f"unknown dihedral transform {name!r}; expected one of {DIHEDRAL_NAMES}")
    return DIHEDRAL_NAMES.index(name)


def _compose_table() -> tuple[tuple[int, ...], ...]:
    """DIHEDRAL_COMPOSE[a][b] = c such that applying a then b equals applying c. Derived from the
    functions on a grid whose 6 cells are all different, so the table cannot drift from them."""
    probe = np.arange(6).reshape(2, 3)
    images = [dihedral(probe, k) for k in range(N_DIHEDRAL)]

    def index_of(g: np.ndarray) -> int:
        hits = [k for k, im in enumerate(images) if im.shape == g.shape and np.array_equal(im, g)]
        assert len(hits) == 1, "the dihedral functions are not 8 distinct symmetries"
        return hits[0]

    return tuple(tuple(index_of(dihedral(images[a], b)) for b in range(N_DIHEDRAL)) for a in range(N_DIHEDRAL))


DIHEDRAL_COMPOSE: tuple[tuple[int, ...], ...] = _compose_table()

IDENTITY_COLOURS: tuple[int, ...] = tuple(range(N_COLOURS))


def _is_permutation(seq: tuple[int, ...], n: int) -> bool:
    return len(seq) == n and sorted(seq) == list(range(n))


def _inverse_permutation(perm: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


@dataclass(frozen=True)
class Transform:
    """One augmentation, applied to every grid of a task alike.

    ``dihedral``: index into DIHEDRAL_NAMES. ``colours``: colour c becomes ``colours[c]``.
    ``order``: the new demonstration i is the old demonstration ``order[i]``; None keeps the
    order (and fits any number of demonstrations). Test pairs always keep their order.
    """

    dihedral: int = 0
    colours: tuple[int, ...] = IDENTITY_COLOURS
    order: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        # Accept lists (e.g. from JSON) but store tuples so the value stays hashable.
        object.__setattr__(self, "colours", tuple(int(c) for c in self.colours))
        if self.order is not None:
            object.__setattr__(self, "order", tuple(int(i) for i in self.order))
        if not (isinstance(self.dihedral, (int, np.integer)) and 0 <= self.dihedral < N_DIHEDRAL):
            raise ValueError(f"Transform.dihedral must be an int in 0..{N_DIHEDRAL - 1}, got {self.dihedral!r}")
        object.__setattr__(self, "dihedral", int(self.dihedral))
        if not _is_permutation(self.colours, N_COLOURS):
            raise ValueError(f"Transform.colours must be a permutation of 0..9, got {self.colours}")
        if self.order is not None and not _is_permutation(self.order, len(self.order)):
            raise ValueError(f"Transform.order must be a permutation of 0..n-1, got {self.order}")

    # --- grids -----------------------------------------------------------------------------
    def apply_grid(self, grid: np.ndarray) -> np.ndarray:
        """The transformed grid: colours mapped, then the dihedral applied. (H, W) -> (H, W) or (W, H)."""
        grid = np.asarray(grid, dtype=np.int64)
        if grid.size and (grid.min() < 0 or grid.max() >= N_COLOURS):
            raise ValueError(f"grid values must be colours 0..9, got {grid.min()}..{grid.max()}")
        return dihedral(np.asarray(self.colours, dtype=np.int64)[grid], self.dihedral)

    def invert_grid(self, grid: np.ndarray) -> np.ndarray:
        """Undo this transform on one grid: maps a prediction for the transformed task back to
        the original task, ``t.invert_grid(t.apply_grid(g)) == g``."""
        return self.inverse().apply_grid(grid)

    # --- tasks -----------------------------------------------------------------------------
    def apply_task(self, task: Task) -> Task:
        """The task with every grid transformed (unknown outputs stay None) and the
        demonstrations reordered; id and source are kept."""
        if self.order is not None and len(self.order) != len(task.train):
            raise ValueError(
                f"task {task.id}: transform order {self.order} has {len(self.order)} entries "
                f"but the task has {len(task.train)} demonstrations"
            )

        def pair(p: Pair) -> Pair:
            return Pair(self.apply_grid(p.input), None if p.output is None else self.apply_grid(p.output))

        order = self.order if self.order is not None else range(len(task.train))
        train = tuple(pair(task.train[i]) for i in order)
        return Task(id=task.id, train=train, test=tuple(pair(p) for p in task.test), source=task.source)

    # --- algebra ---------------------------------------------------------------------------
    def inverse(self) -> Transform:
        """The transform that undoes this one (on grids and on demonstration order)."""
        order = None if self.order is None else _inverse_permutation(self.order)
        return Transform(DIHEDRAL_INVERSE[self.dihedral], _inverse_permutation(self.colours), order)

    def then(self, other: Transform) -> Transform:
        """The single transform equal to applying ``self`` first and ``other`` second."""
        if self.order is None:
            order = other.order
        elif other.order is None:
            order = self.order
        else:
            if len(self.order) != len(other.order):
                raise ValueError(f"cannot compose orders of different lengths: {self.order} then {other.order}")
            order = tuple(self.order[j] for j in other.order)
        colours = tuple(other.colours[c] for c in self.colours)
        return Transform(DIHEDRAL_COMPOSE[self.dihedral][other.dihedral], colours, order)

    @property
    def is_identity(self) -> bool:
        """True when applying it changes nothing (an identity order counts as no reordering)."""
        order_identity = self.order is None or self.order == tuple(range(len(self.order)))
        return self.dihedral == 0 and self.colours == IDENTITY_COLOURS and order_identity

    # --- saving and printing -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly record; ``Transform.from_dict(t.to_dict()) == t``."""
        return {
            "dihedral": self.dihedral,
            "name": DIHEDRAL_NAMES[self.dihedral],  # for readers; from_dict checks it agrees
            "colours": list(self.colours),
            "order": None if self.order is None else list(self.order),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Transform:
        """Rebuild a transform saved with :meth:`to_dict`."""
        missing = {"dihedral", "colours"} - set(d)
        if missing:
            raise ValueError(f"transform record lacks {sorted(missing)}: {d}")
        t = cls(dihedral=d["dihedral"], colours=tuple(d["colours"]), order=d.get("order"))
        if "name" in d and d["name"] != DIHEDRAL_NAMES[t.dihedral]:
            raise ValueError(f"transform record says dihedral {d['dihedral']} but name {d['name']!r}")
        return t

    def __str__(self) -> str:
        parts = [] if self.dihedral == 0 else [DIHEDRAL_NAMES[self.dihedral]]
        if self.colours != IDENTITY_COLOURS:
            parts.append("colours(" + " ".join(map(str, self.colours)) + ")")
        if self.order is not None:
            parts.append("order(" + " ".join(map(str, self.order)) + ")")
        return "+".join(parts) or "identity"


IDENTITY = Transform()


def random_colours(rng: np.random.Generator, *, permute_background: bool = False) -> tuple[int, ...]:
    """A random colour permutation; 0 stays 0 (the background) unless ``permute_background``."""
    if permute_background:
        return tuple(int(c) for c in rng.permutation(N_COLOURS))
    return (0,) + tuple(int(c) + 1 for c in rng.permutation(N_COLOURS - 1))


def random_transform(
    rng: np.random.Generator,
    n_demos: int,
    *,
    dihedral: bool = True,
    colours: bool = True,
    permute_background: bool = False,
    order: bool = True,
) -> Transform:
    """A random training augmentation for a task with ``n_demos`` demonstrations; each part can be
    switched off (then it is the identity; with ``order=False`` the order is None)."""
    k = int(rng.integers(N_DIHEDRAL)) if dihedral else 0
    cmap = random_colours(rng, permute_background=permute_background) if colours else IDENTITY_COLOURS
    perm = tuple(int(i) for i in rng.permutation(n_demos)) if order else None
    return Transform(k, cmap, perm)


def views(
    n: int,
    *,
    seed: int = 0,
    colours: bool = True,
    permute_background: bool = False,
    n_demos: int | None = None,
) -> list[Transform]:
    """The deterministic list of ``n`` distinct test-time views used for voting.

    Views 0..7 are the 8 dihedrals with identity colours, so ``views(1)`` is the original task and
    ``views(8)`` all 8 dihedrals. Views 8.. cycle through the dihedrals again, each with a random
    colour permutation drawn from ``seed``. With ``n_demos`` those later views also shuffle the
    order of that many demonstrations (otherwise order stays None: views keep the task's order).
    """
    if n < 1:
        raise ValueError(f"views: n must be at least 1, got {n}")
    if n > N_DIHEDRAL and not colours and not n_demos:
        raise ValueError(f"views: only {N_DIHEDRAL} distinct views exist without colours or n_demos, asked for {n}")
    def key(t: Transform) -> tuple:  # an identity order is no reordering
        order = None if t.order is None or t.order == tuple(range(len(t.order))) else t.order
        return (t.dihedral, t.colours, order)

    out = [Transform(k) for k in range(min(n, N_DIHEDRAL))]
    seen = {key(t) for t in out}
    rng = np.random.default_rng(seed)
    misses = 0
    while len(out) < n:
        k = len(out) % N_DIHEDRAL
        cmap = random_colours(rng, permute_background=permute_background) if colours else IDENTITY_COLOURS
        perm = tuple(int(i) for i in rng.permutation(n_demos)) if n_demos else None
        t = Transform(k, cmap, perm)
        if key(t) in seen:
            misses += 1
            if misses > 1000:
                raise ValueError(f"views: could not find {n} distinct views (found {len(out)})")
            continue
        out.append(t)
        seen.add(key(t))
    return out
