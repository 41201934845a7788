"""Voting over predictions mapped back from augmented views.

The view tests make each prediction the way the solver does: from the task *as a view presents
it* (arc.augment's transforms applied to the task), by a stand-in that infers the rule from that
view's demonstrations; the prediction is mapped back by the production inverse
(``Transform.invert_grid``, inside ``arc.solve.solve_task`` or called as it calls it) and voted by
``arc.vote``. Nothing cancels before production code runs: skip the inversion and the vote is lost.
"""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arc import augment
from arc.data import Pair, Task
from arc.solve import SolveConfig, solve_task
from arc.tokens import EOO, IN, OUT, VOCAB_SIZE, decode_grid, grid_tokens
from arc.vote import Candidate, rank, two_attempts

TRUTH = np.array([[1, 2, 3], [4, 5, 6]])  # no symmetry: every dihedral image is different
CPU = torch.device("cpu")
RECOLOUR = np.array([0, 2, 3, 1, 5, 6, 4, 8, 9, 7])  # the rule: colour c becomes RECOLOUR[c]


def recolour_task() -> Task:
    """Demonstrations of RECOLOUR that show every colour; asymmetric grids throughout."""
    rng = np.random.default_rng(0)
    grids = [rng.permutation(np.arange(12) % 10).reshape(3, 4), rng.permutation(np.arange(12) % 10).reshape(4, 3),
             np.arange(10).reshape(2, 5)]
    test_in = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 0], [9, 9, 1]])
    return Task("recolour", tuple(Pair(g, RECOLOUR[g]) for g in grids), (Pair(test_in, RECOLOUR[test_in]),))


def infer_recolouring(demos, test_input: np.ndarray) -> np.ndarray:
    """An in-context solver for cell-wise recolouring: reads the colour map off the demonstrations
    it is shown (in whatever frame and colours the view gives them) and applies it."""
    mapping = {}
    for inp, out in demos:
        assert inp.shape == out.shape, "a recolouring keeps the shape"
        mapping.update(zip(inp.ravel().tolist(), out.ravel().tolist()))
    return np.vectorize(lambda c: mapping.get(c, c))(test_input)


def parse_prompt(ids: np.ndarray) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """(demonstrations, test input) back from a prompt's token ids, by the layout's markers."""
    grids, current = [], []
    for tok in ids.tolist()[1:]:  # after BOS
        if tok in (IN, OUT, EOO):
            if current:
                grids.append(decode_grid(current + [EOO]).grid)
            current = []
        else:
            current.append(tok)
    *pairs, test_input = grids
    return list(zip(pairs[0::2], pairs[1::2])), test_input


class InContextModel:
    """The solver's model interface (cfg.max_seq_len, prefill / step / cache.select) over an
    in-context solver: for each prompt it writes ``answer(demos, test_input)``'s tokens, then EOO."""

    def __init__(self, answer):
        self.answer = answer
        self.cfg = SimpleNamespace(max_seq_len=4096)

    class Cache:
        def __init__(self, scripts):
            self.scripts, self.pos = scripts, [0] * len(scripts)

        def select(self, index):
            self.scripts = [self.scripts[i] for i in index.tolist()]
            self.pos = [self.pos[i] for i in index.tolist()]

    def _logits(self, cache):
        out = torch.zeros(len(cache.scripts), VOCAB_SIZE)
        for r, (script, pos) in enumerate(zip(cache.scripts, cache.pos)):
            out[r, script[min(pos, len(script) - 1)]] = 10.0
        return out

    def prefill(self, prompts, max_new_tokens, positions=None):
        scripts = [list(np.append(grid_tokens(self.answer(*parse_prompt(p.numpy()))), EOO)) for p in prompts]
        cache = self.Cache(scripts)
        return cache, self._logits(cache)

    def step(self, tokens, cache, pos=None):
        cache.pos = [p + 1 for p in cache.pos]
        return self._logits(cache)


def test_the_stand_in_solves_the_task_in_every_view_frame():
    task = recolour_task()
    for view in augment.views(16):
        seen = view.apply_task(task)
        assert np.array_equal(infer_recolouring(seen.demos, seen.test[0].input), seen.test[0].output), str(view)


def test_predictions_made_under_16_views_and_inverted_by_the_solver_all_vote_for_the_truth():
    task = recolour_task()
    pred = solve_task(InContextModel(infer_recolouring), task, SolveConfig(views=16, batch=5), CPU)
    (test,) = pred.tests
    np.testing.assert_array_equal(test.attempt_1, task.test[0].output)
    assert test.info["votes"] == [16] and test.correct == [True, True] and test.info["repeated"]
    assert sorted(test.info["ballots"][0]["views"]) == sorted(str(v) for v in augment.views(16))


def test_views_where_the_model_errs_lose_the_vote():
    """Under the colour-permuted views (8..15) the stand-in gets one cell wrong in its own frame;
    mapped back those are 8 different grids, one vote each, against 8 for the truth."""
    first = recolour_task().train[0].input

    def sloppy(demos, test_input):
        out = infer_recolouring(demos, test_input)
        in_task_colours = any(np.array_equal(augment.dihedral(first, k), demos[0][0]) for k in range(8))
        if not in_task_colours:
            out[0, 0] = (out[0, 0] + 1) % 10
        return out

    views = augment.views(16)
    task = recolour_task()
    pred = solve_task(InContextModel(sloppy), task, SolveConfig(views=16), CPU)
    (test,) = pred.tests
    np.testing.assert_array_equal(test.attempt_1, task.test[0].output)
    assert test.info["votes"][0] == 8 and sum(test.info["votes"]) == 16
    assert sorted(test.info["ballots"][0]["views"]) == sorted(str(v) for v in views[:8])
    assert not np.array_equal(test.attempt_2, task.test[0].output) and test.correct == [True, False]


def test_the_production_inverse_maps_each_views_prediction_back():
    """As solve.py does it: predict from the view's task, ``view.invert_grid`` the prediction, vote."""
    task = recolour_task()
    candidates, raw = [], []
    for view in augment.views(16, seed=3):
        seen = view.apply_task(task)
        predicted = infer_recolouring(seen.demos, seen.test[0].input)  # in the view's frame and colours
        candidates.append(Candidate(view.invert_grid(predicted), -0.3, str(view)))
        raw.append(Candidate(predicted, -0.3, str(view)))
    a1, _, info = two_attempts(candidates)
    np.testing.assert_array_equal(a1, task.test[0].output)
    assert info["votes"] == [16]
    # without the inversion the views disagree: the same predictions give no majority at all
    assert max(two_attempts(raw)[2]["votes"]) < 16 // 2


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


def test_candidates_without_a_vote_never_change_what_the_votes_choose():
    """Extra candidates (votes=0, from a search) join their grid's ballot but move neither its vote
    count nor its tie-break; a grid only they propose ranks after every voted grid."""
    a, b, c = np.full((1, 1), 1), np.full((1, 1), 2), np.full((1, 1), 3)
    voted = [Candidate(a, -1.0, "v1"), Candidate(b, -0.5, "v2")]
    extras = [Candidate(a, -9.0, "v2", votes=0), Candidate(c, -0.1, "v1", votes=0)]
    plain, mixed = rank(voted), rank(voted + extras)
    assert [x.grid.tolist() for x in plain] == [x.grid.tolist() for x in mixed[:2]] == [[[2]], [[1]]]
    assert [x.votes for x in mixed] == [1, 1, 0] and mixed[2].grid.tolist() == [[3]]
    assert [x.mean_logprob for x in mixed[:2]] == [x.mean_logprob for x in plain]
    with pytest.raises(ValueError, match="votes"):
        Candidate(a, votes=-1)
