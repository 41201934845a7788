"""Voting over predictions mapped back from augmented views."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arc.vote import Candidate, rank, two_attempts

TRUTH = np.array([[1, 2, 3], [4, 5, 6]])  # no symmetry: every dihedral image is different

# The 8 symmetries of the square and their inverses, written here with numpy so this core
# property does not depend on arc.augment.
DIHEDRAL = {
    "identity": (lambda g: g, lambda g: g),
    "rot90": (lambda g: np.rot90(g, 1), lambda g: np.rot90(g, -1)),
    "rot180": (lambda g: np.rot90(g, 2), lambda g: np.rot90(g, -2)),
    "rot270": (lambda g: np.rot90(g, 3), lambda g: np.rot90(g, -3)),
    "flip_lr": (np.fliplr, np.fliplr),
    "flip_ud": (np.flipud, np.flipud),
    "transpose": (np.transpose, np.transpose),
    "anti_transpose": (lambda g: np.rot90(g, 2).T, lambda g: np.rot90(g.T, 2)),
}


def test_local_transform_table_is_sound():
    images = {name: f(TRUTH).tobytes() + bytes(f(TRUTH).shape) for name, (f, _) in DIHEDRAL.items()}
    assert len(set(images.values())) == 8, "8 distinct symmetries"
    for name, (f, inv) in DIHEDRAL.items():
        assert np.array_equal(inv(f(TRUTH)), TRUTH), name


def test_voting_recovers_the_truth_through_every_transform_and_its_inverse():
    rng = np.random.default_rng(0)
    candidates = []
    for name, (forward, inverse) in DIHEDRAL.items():
        predicted = forward(TRUTH)  # a model that solved the transformed task
        candidates.append(Candidate(inverse(predicted), -0.3, name))
        noise = rng.integers(0, 10, size=predicted.shape)  # and one confident wrong sample per view
        candidates.append(Candidate(inverse(noise), -0.01, f"{name} sample 2"))
    a1, a2, info = two_attempts(candidates)
    assert np.array_equal(a1, TRUTH)
    assert not np.array_equal(a2, TRUTH)
    assert info["votes"][0] == 8
    assert sorted(info["ballots"][0]["views"]) == sorted(DIHEDRAL)


def test_voting_with_arc_augment_views():
    augment = pytest.importorskip("arc.augment")  # the local table above is the core test
    rng = np.random.default_rng(1)
    candidates = []
    for t in augment.views(16):  # 8 dihedrals, then dihedrals with colour permutations
        predicted = t.apply_grid(TRUTH)
        candidates.append(Candidate(t.invert_grid(predicted), -0.5, str(t)))
        noise = rng.integers(0, 10, size=predicted.shape)
        candidates.append(Candidate(t.invert_grid(noise), -0.1, f"{t} wrong"))
    a1, _, info = two_attempts(candidates)
    assert np.array_equal(a1, TRUTH)
    assert info["votes"][0] == 16


def test_majority_beats_higher_logprob():
    good, bad = TRUTH, TRUTH[::-1]
    cands = [Candidate(good, -2.0, "a"), Candidate(good, -2.5, "b"), Candidate(bad, -0.001, "c")]
    a1, a2, info = two_attempts(cands)
    assert np.array_equal(a1, good) and np.array_equal(a2, bad)
    assert info["votes"] == [2, 1]
    assert not info["repeated"] and not info["placeholder"]


def test_logprob_breaks_ties_using_the_group_average():
    x, y = TRUTH, TRUTH + 1
    # x: members -0.1 and -0.9 (average -0.5, max -0.1); y: -0.4 and -0.4 (average -0.4)
    cands = [Candidate(x, -0.1, "x1"), Candidate(y, -0.4, "y1"), Candidate(x, -0.9, "x2"), Candidate(y, -0.4, "y2")]
    ballots = rank(cands)
    assert [b.votes for b in ballots] == [2, 2]
    assert np.array_equal(ballots[0].grid, y)
    assert ballots[0].mean_logprob == pytest.approx(-0.4)
    assert ballots[1].mean_logprob == pytest.approx(-0.5)
    assert ballots[1].views == ("x1", "x2")


def test_identity_means_shape_and_every_cell():
    flat = np.array([[1, 2, 3, 4, 5, 6]])  # same cells as TRUTH, other shape
    ballots = rank([Candidate(TRUTH, -1, "a"), Candidate(flat, -1, "b"), Candidate(TRUTH.astype(np.int32), -1, "c")])
    assert [b.votes for b in ballots] == [2, 1]


def test_single_candidate_grid_is_repeated():
    a1, a2, info = two_attempts([Candidate(TRUTH, -1, "a"), Candidate(TRUTH, -2, "b"), Candidate(None, 0, "c", "ragged")])
    assert np.array_equal(a1, TRUTH) and np.array_equal(a2, TRUTH)
    assert info["repeated"] and info["votes"] == [2]
    assert info["malformed"] == [{"view": "c", "reason": "ragged"}]


def test_all_malformed_gives_the_placeholder_and_says_why():
    cands = [Candidate(None, -1.0, "v0", "no EOO after 30 rows"), Candidate(None, -2.0, "v1")]
    a1, a2, info = two_attempts(cands)
    assert a1.tolist() == [[0]] and a2.tolist() == [[0]]
    assert info["placeholder"] and info["votes"] == [] and info["candidates"] == 2
    assert [m["reason"] for m in info["malformed"]] == ["no EOO after 30 rows", "no grid"]
    a1[0, 0] = 5  # the placeholder handed out is a copy
    assert two_attempts(cands)[0].tolist() == [[0]]


def test_no_candidates_at_all():
    a1, a2, info = two_attempts([])
    assert a1.tolist() == [[0]] and info["placeholder"] and info["candidates"] == 0


def test_info_is_strict_json_even_with_non_finite_logprobs():
    cands = [Candidate(TRUTH, -math.inf, "a"), Candidate(TRUTH + 1, math.nan, "b"), Candidate(TRUTH + 2, -1.0, "c")]
    a1, a2, info = two_attempts(cands)
    json.dumps(info, allow_nan=False)
    assert np.array_equal(a1, TRUTH + 2)  # finite beats -inf beats NaN (NaN counts as -inf, then grid order)
    assert [b["mean_logprob"] for b in info["ballots"]] == [-1.0, None, None]


def test_bad_candidate_grid_is_rejected_loudly():
    with pytest.raises(ValueError, match="view7"):
        Candidate(np.zeros((2, 2, 2), dtype=int), 0.0, "view7")
    with pytest.raises(ValueError):
        Candidate(np.zeros((2, 2)), 0.0, "floats")


def test_attempts_are_copies():
    g = TRUTH.copy()
    a1, _, _ = two_attempts([Candidate(g, 0.0)])
    a1[0, 0] = 9
    assert g[0, 0] == 1


small_grids = st.sampled_from([TRUTH, TRUTH + 1, TRUTH.T, TRUTH[:1], np.zeros((2, 3), dtype=int)])
candidate_lists = st.lists(
    st.one_of(
        st.builds(Candidate, small_grids, st.floats(-5, 0), st.text(max_size=3)),
        st.builds(Candidate, st.none(), st.floats(-5, 0), st.text(max_size=3), st.just("bad")),
    ),
    max_size=12,
)


@given(candidate_lists, st.randoms(use_true_random=False))
@settings(max_examples=150, deadline=None)
def test_ranking_does_not_depend_on_candidate_order(cands, rnd):
    shuffled = list(cands)
    rnd.shuffle(shuffled)

    def summary(ballots):
        return [(b.grid.shape, b.grid.tobytes(), b.votes, b.mean_logprob, sorted(b.views)) for b in ballots]

    assert summary(rank(cands)) == summary(rank(shuffled))
    ballots = rank(cands)
    assert sum(b.votes for b in ballots) == sum(c.ok for c in cands)
    assert all(a.votes >= b.votes for a, b in zip(ballots, ballots[1:]))
