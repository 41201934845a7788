"""The synthetic suite: deterministic, always valid, and each rule does what its name says
(checked against a separate, plain statement of the rule)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from arc.data import Task
from arc.synthetic import RULES, make_task, make_tasks
from arc.tokens import BLOCK_SIZE, encode_instance

ALL_RULES = sorted(RULES)


def tasks_of(rule: str, n: int = 8, max_side: int = 10) -> list[Task]:
    return make_tasks(n, seed=11, rules=[rule], max_side=max_side)


def pairs_of(task: Task) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(p.input, p.output) for p in task.train + task.test]


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components of a boolean mask, by breadth-first search."""
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, comp = [start], []
        while queue:
            r, c = queue.pop()
            comp.append((r, c))
            for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= nr < mask.shape[0] and 0 <= nc < mask.shape[1] and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    queue.append((nr, nc))
        out.append(comp)
    return out


# --- the suite as a whole --------------------------------------------------------------------

def test_at_least_twelve_rules_with_docs():
    assert len(RULES) >= 12
    assert all(r.name == name and r.doc for name, r in RULES.items())


def test_deterministic_by_seed():
    a, b = make_tasks(42, seed=3), make_tasks(42, seed=3)
    c = make_tasks(42, seed=4)
    for x, y in zip(a, b):
        assert x.id == y.id and all(same(g, h) for p, q in zip(pairs_of(x), pairs_of(y)) for g, h in zip(p, q))
    assert any(not same(x.train[0].input, z.train[0].input) for x, z in zip(a, c))
    assert [t.id for t in make_tasks(10, seed=3)] == [t.id for t in a[:10]]  # a longer list extends a shorter one


def test_balanced_and_ids():
    tasks = make_tasks(3 * len(RULES) + 2, seed=0)
    counts = Counter(t.source for t in tasks)
    assert set(counts) == {f"synthetic:{r}" for r in RULES}
    assert max(counts.values()) - min(counts.values()) <= 1
    assert len({t.id for t in tasks}) == len(tasks)
    assert tasks[0].id == f"syn-{next(iter(RULES))}-0-0"
    assert make_task("flip_h", np.random.default_rng(0)).id == "syn-flip_h-0"


@pytest.mark.parametrize("rule", ALL_RULES)
@pytest.mark.parametrize("max_side", [6, 10, 30])
def test_valid_tasks(rule, max_side):
    n = 50 if max_side == 10 else 10
    for task in make_tasks(n, seed=max_side, rules=[rule], max_side=max_side, n_demos=3, n_test=2):
        assert len(task.train) == 3 and len(task.test) == 2 and task.source == f"synthetic:{rule}"
        inputs = set()
        for inp, out in pairs_of(task):
            for g in (inp, out):
                assert g.dtype == np.int64 and g.ndim == 2
                assert 1 <= g.shape[0] <= max_side and 1 <= g.shape[1] <= max_side, (rule, g.shape)
                assert 0 <= g.min() and g.max() <= 9
            assert not same(inp, out)
            inputs.add(bytes(inp.shape) + inp.tobytes())
        assert len(inputs) == 5


@pytest.mark.parametrize("rule", ALL_RULES)
def test_encodes_within_block(rule):
    for task in tasks_of(rule, n=5):
        enc = encode_instance(task.demos, task.test[0].input, task.test[0].output)
        assert len(enc.ids) <= BLOCK_SIZE and enc.demos_dropped == 0
    for task in tasks_of(rule, n=3, max_side=30):  # big grids still fit, maybe with fewer demos
        assert len(encode_instance(task.demos, task.test[0].input, task.test[0].output).ids) <= BLOCK_SIZE


def test_bad_arguments_are_loud():
    with pytest.raises(ValueError, match="no_such_rule"):
        make_task("no_such_rule", np.random.default_rng(0))
    with pytest.raises(ValueError, match="max_side"):
        make_task("flip_h", np.random.default_rng(0), max_side=31)
    with pytest.raises(ValueError, match="nope"):
        make_tasks(3, seed=0, rules=["flip_h", "nope"])


# --- each rule against a plain statement of it -----------------------------------------------

PLAIN = {
    "flip_h": lambda g: g[:, ::-1],
    "flip_v": lambda g: g[::-1],
    "rot90": lambda g: np.array([[g[r][c] for r in range(g.shape[0])] for c in reversed(range(g.shape[1]))]),
    "rot180": lambda g: g[::-1, ::-1],
    "transpose": lambda g: np.array([[g[r][c] for r in range(g.shape[0])] for c in range(g.shape[1])]),
    "swap_two_colours": lambda g: np.vectorize({a: b for a, b in zip(np.unique(g), np.unique(g)[::-1])}.get)(g),
    "majority_colour": lambda g: np.array([[Counter(g[g != 0].tolist()).most_common(1)[0][0]]]),
}


@pytest.mark.parametrize("rule", sorted(PLAIN))
def test_plain_function_rules(rule):
    for task in tasks_of(rule):
        for inp, out in pairs_of(task):
            assert same(out, PLAIN[rule](inp)), rule


def test_tile_and_upscale_and_mirror():
    for task in tasks_of("tile"):
        factors = {(o.shape[0] // i.shape[0], o.shape[1] // i.shape[1]) for i, o in pairs_of(task)}
        assert len(factors) == 1 and factors.pop() in {(2, 2), (1, 2), (2, 1), (1, 3), (3, 1)}
        for inp, out in pairs_of(task):
            h, w = inp.shape
            assert all(out[r, c] == inp[r % h, c % w] for r in range(out.shape[0]) for c in range(out.shape[1]))
    for task in tasks_of("upscale"):
        ks = {o.shape[0] // i.shape[0] for i, o in pairs_of(task)}
        assert len(ks) == 1 and ks <= {2, 3}
        k = ks.pop()
        assert all(same(out, np.kron(inp, np.ones((k, k), dtype=np.int64))) for inp, out in pairs_of(task))
    for task in tasks_of("mirror_extend"):
        right = [same(o, np.hstack([i, i[:, ::-1]])) for i, o in pairs_of(task)]
        below = [same(o, np.vstack([i, i[::-1]])) for i, o in pairs_of(task)]
        assert all(right) or all(below)


def test_shift():
    def shifted(g: np.ndarray, dr: int, dc: int) -> np.ndarray:
        out = np.zeros_like(g)
        for r, c in zip(*np.nonzero(g)):
            if 0 <= r + dr < g.shape[0] and 0 <= c + dc < g.shape[1]:
                out[r + dr, c + dc] = g[r, c]
        return out

    for task in tasks_of("shift"):
        dirs = [d for d in [(-1, 0), (1, 0), (0, -1), (0, 1)]
                if all(same(o, shifted(i, *d)) for i, o in pairs_of(task))]
        assert len(dirs) == 1


def test_colour_map():
    for task in tasks_of("colour_map"):
        mapping: dict[int, int] = {}
        for inp, out in pairs_of(task):
            assert inp.shape == out.shape
            for a, b in zip(inp.reshape(-1).tolist(), out.reshape(-1).tolist()):
                assert mapping.setdefault(a, b) == b  # one consistent map for the whole task
        assert mapping.get(0, 0) == 0
        assert all(a != b for a, b in mapping.items() if a != 0)
        assert len(set(mapping.values())) == len(mapping)
        test_colours = set(np.unique(task.test[0].input).tolist())  # the demos show every colour the test uses
        assert test_colours <= {int(c) for p in task.train for c in np.unique(p.input)}


def test_frame():
    for task in tasks_of("frame"):
        colours = set()
        for inp, out in pairs_of(task):
            border = np.ones(inp.shape, dtype=bool)
            border[1:-1, 1:-1] = False
            colours |= set(out[border].tolist())
            assert same(out[~border], inp[~border])
        assert len(colours) == 1


def test_gravity():
    for task in tasks_of("gravity"):
        for inp, out in pairs_of(task):
            for c in range(inp.shape[1]):
                before, after = inp[:, c], out[:, c]
                assert before[before != 0].tolist() == after[after != 0].tolist()  # same cells, same order
                k = int((after != 0).sum())
                assert (after[len(after) - k:] != 0).all()  # all at the bottom


def test_line_to_edge():
    def draw(g: np.ndarray, direction: str) -> np.ndarray:
        out = g.copy()
        for r, c in zip(*np.nonzero(g)):
            ray = {"up": (slice(0, r + 1), c), "down": (slice(r, None), c),
                   "left": (r, slice(0, c + 1)), "right": (r, slice(c, None))}[direction]
            out[ray] = g[r, c]
        return out

    for task in tasks_of("line_to_edge"):
        dirs = [d for d in ("up", "down", "left", "right") if all(same(o, draw(i, d)) for i, o in pairs_of(task))]
        assert len(dirs) >= 1


def test_count_to_bar():
    for task in tasks_of("count_to_bar"):
        for inp, out in pairs_of(task):
            colours = set(inp[inp != 0].tolist())
            assert len(colours) == 1
            assert sorted(out.shape) == [1, int((inp != 0).sum())] and set(out.reshape(-1).tolist()) == colours


def test_denoise():
    for task in tasks_of("denoise"):
        noise = None
        for inp, out in pairs_of(task):
            removed = set(inp[inp != out].tolist())
            assert len(removed) == 1
            noise = removed.pop() if noise is None else noise
            assert noise not in out and (out[inp != noise] == inp[inp != noise]).all()


def test_crop_object():
    for task in tasks_of("crop_object"):
        for inp, out in pairs_of(task):
            rows, cols = np.nonzero(inp)
            assert same(out, inp[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1])
            assert len(components(inp != 0)) == 1


def test_recolour_largest():
    for task in tasks_of("recolour_largest"):
        new_colours = set()
        for inp, out in pairs_of(task):
            comps = sorted(components(inp != 0), key=len)
            assert len(comps) >= 2 and len(comps[-1]) > len(comps[-2])
            assert len(set(inp[inp != 0].tolist())) == 1
            for comp in comps[:-1]:
                assert all(out[p] == inp[p] for p in comp)
            new_colours |= {int(out[p]) for p in comps[-1]}
            assert same(out == 0, inp == 0)
        assert len(new_colours) == 1


def test_recolour_by_size():
    for task in tasks_of("recolour_by_size"):
        by_size: dict[int, int] = {}
        for inp, out in pairs_of(task):
            assert same(out == 0, inp == 0)
            for comp in components(inp != 0):
                colours = {int(out[p]) for p in comp}
                assert len(colours) == 1
                assert by_size.setdefault(len(comp), colours.pop()) == out[comp[0]]


def test_fill_enclosed():
    def reachable_from_border(free: np.ndarray) -> np.ndarray:
        h, w = free.shape
        seen = np.zeros_like(free)
        queue = [(r, c) for r in range(h) for c in range(w) if (r in (0, h - 1) or c in (0, w - 1)) and free[r, c]]
        for p in queue:
            seen[p] = True
        while queue:
            r, c = queue.pop()
            for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= nr < h and 0 <= nc < w and free[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    queue.append((nr, nc))
        return seen

    for task in tasks_of("fill_enclosed", n=20):
        fills = set()
        for inp, out in pairs_of(task):
            enclosed = (inp == 0) & ~reachable_from_border(inp == 0)
            assert enclosed.any()
            fills |= set(out[enclosed].tolist())
            assert same(out[~enclosed], inp[~enclosed])
        assert len(fills) == 1
