"""Transforms are invertible, the dihedral table is the group D4, and views are what voting expects."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arc.augment import (
    DIHEDRAL_COMPOSE,
    DIHEDRAL_INVERSE,
    DIHEDRAL_NAMES,
    IDENTITY,
    N_DIHEDRAL,
    Transform,
    dihedral,
    dihedral_index,
    random_transform,
    views,
)
from arc.data import Pair, Task

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def grids(draw, max_side: int = 30) -> np.ndarray:
    h = draw(st.integers(1, max_side))
    w = draw(st.integers(1, max_side))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).integers(0, 10, size=(h, w))


@st.composite
def transforms(draw, n_demos: int | None = None) -> Transform:
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    return random_transform(
        rng,
        n_demos if n_demos is not None else 1,
        colours=draw(st.booleans()),
        permute_background=draw(st.booleans()),
        order=n_demos is not None,
    )


@st.composite
def tasks(draw) -> Task:
    seed = draw(st.integers(0, 2**32 - 1))
    n_train = draw(st.integers(1, 5))
    n_test = draw(st.integers(1, 2))
    hidden = draw(st.booleans())
    rng = np.random.default_rng(seed)

    def grid() -> np.ndarray:
        return rng.integers(0, 10, size=tuple(rng.integers(1, 31, size=2)))

    train = tuple(Pair(grid(), grid()) for _ in range(n_train))
    test = tuple(Pair(grid(), None if hidden else grid()) for _ in range(n_test))
    return Task(id=f"t{seed}", train=train, test=test, source="hypothesis")


# --- the dihedral table ----------------------------------------------------------------------

def test_dihedral_names_and_known_images():
    g = np.array([[1, 2, 3], [4, 5, 6]])
    expect = {
        "identity": g,
        "rot90": np.array([[3, 6], [2, 5], [1, 4]]),
        "rot180": np.array([[6, 5, 4], [3, 2, 1]]),
        "rot270": np.array([[4, 1], [5, 2], [6, 3]]),
        "flip_h": np.array([[3, 2, 1], [6, 5, 4]]),
        "flip_v": np.array([[4, 5, 6], [1, 2, 3]]),
        "transpose": np.array([[1, 4], [2, 5], [3, 6]]),
        "anti_transpose": np.array([[6, 3], [5, 2], [4, 1]]),
    }
    assert set(expect) == set(DIHEDRAL_NAMES) and N_DIHEDRAL == 8
    for name, image in expect.items():
        np.testing.assert_array_equal(dihedral(g, dihedral_index(name)), image, err_msg=name)


def test_dihedrals_distinct_on_generic_grid():
    g = np.arange(12).reshape(3, 4)
    images = [dihedral(g, k).tobytes() + bytes(dihedral(g, k).shape) for k in range(N_DIHEDRAL)]
    assert len(set(images)) == N_DIHEDRAL


def test_inverse_table():
    g = np.arange(12).reshape(3, 4)
    for k in range(N_DIHEDRAL):
        np.testing.assert_array_equal(dihedral(dihedral(g, k), DIHEDRAL_INVERSE[k]), g)
        assert DIHEDRAL_COMPOSE[k][DIHEDRAL_INVERSE[k]] == 0


@SETTINGS
@given(grids())
def test_composition_table_matches_sequence(g):
    for a in range(N_DIHEDRAL):
        for b in range(N_DIHEDRAL):
            np.testing.assert_array_equal(dihedral(dihedral(g, a), b), dihedral(g, DIHEDRAL_COMPOSE[a][b]))


def test_composition_closed_and_a_group():
    table = np.array(DIHEDRAL_COMPOSE)
    for row in table:  # each row and column is a permutation: a Latin square, so closed with inverses
        assert sorted(row) == list(range(N_DIHEDRAL))
    for col in table.T:
        assert sorted(col) == list(range(N_DIHEDRAL))
    for a in range(N_DIHEDRAL):  # associativity
        for b in range(N_DIHEDRAL):
            for c in range(N_DIHEDRAL):
                assert table[table[a, b], c] == table[a, table[b, c]]


def test_unknown_dihedral_name_is_loud():
    with pytest.raises(ValueError, match="rot45"):
        dihedral_index("rot45")


# --- transforms on grids ---------------------------------------------------------------------

@SETTINGS
@given(grids(), transforms())
def test_invert_undoes_apply(g, t):
    out = t.apply_grid(g)
    assert out.dtype == np.int64 and out.shape in (g.shape, g.shape[::-1])
    np.testing.assert_array_equal(t.invert_grid(out), g)
    np.testing.assert_array_equal(t.inverse().apply_grid(out), g)
    np.testing.assert_array_equal(t.apply_grid(t.invert_grid(g)), g)


@SETTINGS
@given(grids(), transforms(), transforms())
def test_then_is_applying_in_sequence(g, t, u):
    np.testing.assert_array_equal(t.then(u).apply_grid(g), u.apply_grid(t.apply_grid(g)))
    assert t.then(t.inverse()).is_identity


@SETTINGS
@given(st.integers(0, 2**32 - 1))
def test_colour_map_keeps_background_by_default(seed):
    t = random_transform(np.random.default_rng(seed), 3)
    assert t.colours[0] == 0
    g = np.zeros((2, 3), dtype=np.int64)
    assert (t.apply_grid(g) == 0).all()


def test_permute_background_moves_zero_sometimes():
    rng = np.random.default_rng(0)
    zeros = [random_transform(rng, 2, permute_background=True).colours[0] for _ in range(50)]
    assert any(z != 0 for z in zeros)


def test_switches_off_parts():
    t = random_transform(np.random.default_rng(1), 4, dihedral=False, colours=False, order=False)
    assert t == IDENTITY and str(t) == "identity"


def test_random_transform_deterministic():
    a = [random_transform(np.random.default_rng(7), 4) for _ in range(2)]
    assert a[0] == a[1]
    others = {random_transform(np.random.default_rng(s), 4) for s in range(20)}
    assert len(others) > 1


# --- transforms on tasks ---------------------------------------------------------------------

@SETTINGS
@given(tasks(), st.integers(0, 2**32 - 1))
def test_transformed_task_is_valid_and_invertible(task, seed):
    t = random_transform(np.random.default_rng(seed), len(task.train), permute_background=seed % 2 == 0)
    out = t.apply_task(task)
    assert out.id == task.id and out.source == task.source
    assert len(out.train) == len(task.train) and len(out.test) == len(task.test)
    for p in out.train + out.test:
        for g in (p.input, p.output):
            if g is None:
                continue
            assert g.ndim == 2 and 1 <= g.shape[0] <= 30 and 1 <= g.shape[1] <= 30
            assert g.min() >= 0 and g.max() <= 9
    for p_new, p_old in zip(out.test, task.test):  # tests keep their order; hidden outputs stay hidden
        assert (p_new.output is None) == (p_old.output is None)
        np.testing.assert_array_equal(t.invert_grid(p_new.input), p_old.input)
        if p_old.output is not None:
            np.testing.assert_array_equal(t.invert_grid(p_new.output), p_old.output)
    for i, p_new in enumerate(out.train):  # demo i is old demo order[i]
        np.testing.assert_array_equal(t.invert_grid(p_new.output), task.train[t.order[i]].output)
    back = t.inverse().apply_task(out)
    for p_back, p_old in zip(back.train + back.test, task.train + task.test):
        np.testing.assert_array_equal(p_back.input, p_old.input)


def test_order_length_must_match():
    task = Task("x", (Pair(np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64)),) * 2, ())
    with pytest.raises(ValueError, match="task x"):
        Transform(order=(2, 0, 1)).apply_task(task)


def test_invalid_transforms_are_loud():
    with pytest.raises(ValueError, match="dihedral"):
        Transform(dihedral=8)
    with pytest.raises(ValueError, match="colours"):
        Transform(colours=(0, 0, 2, 3, 4, 5, 6, 7, 8, 9))
    with pytest.raises(ValueError, match="order"):
        Transform(order=(0, 2))


# --- saving and printing ---------------------------------------------------------------------

@SETTINGS
@given(transforms(n_demos=3))
def test_to_dict_round_trip(t):
    d = json.loads(json.dumps(t.to_dict()))
    assert Transform.from_dict(d) == t
    assert Transform.from_dict(IDENTITY.to_dict()) == IDENTITY


def test_str():
    t = Transform(1, (0, 3, 1, 2, 4, 5, 6, 7, 8, 9), (2, 0, 1))
    assert str(t) == "rot90+colours(0 3 1 2 4 5 6 7 8 9)+order(2 0 1)"
    assert str(Transform(4)) == "flip_h"
    assert str(IDENTITY) == "identity"


# --- views -----------------------------------------------------------------------------------

def test_views_start_with_the_dihedrals():
    assert views(1) == [IDENTITY]
    eight = views(8)
    assert [t.dihedral for t in eight] == list(range(8))
    assert all(t.colours == tuple(range(10)) and t.order is None for t in eight)
    g = np.arange(12).reshape(3, 4) % 10  # non-square, no symmetry
    assert len({t.apply_grid(g).tobytes() + bytes(t.apply_grid(g).shape) for t in eight}) == 8


def test_views_beyond_eight():
    v = views(20, seed=3)
    assert v[:8] == views(8) and v == views(20, seed=3)
    assert len(set(v)) == 20
    assert all(t.colours[0] == 0 and t.order is None for t in v)
    assert v[8:] != views(20, seed=4)[8:]
    assert any(t.colours[0] != 0 for t in views(16, permute_background=True)[8:])
    shuffled = views(12, colours=False, n_demos=4)
    assert all(t.order is not None and len(t.order) == 4 for t in shuffled[8:])
    with pytest.raises(ValueError):
        views(9, colours=False)
    with pytest.raises(ValueError):
        views(0)
