"""Candidates beyond greedy and their scoring under every view (arc.candidates), on small real models.

The search is checked against brute force: on a model whose answer budget admits only tiny grids,
every well-formed answer is enumerated and read by teacher forcing, and the search must return
exactly those above the threshold.
"""
import itertools
import math

import numpy as np
import pytest
import torch

from arc import augment, candidates
from arc.data import Pair, Task
from arc.model import GRID_2D, HybridLM, preset
from arc.solve import SolveConfig, decode, solve_task, teacher_forced
from arc.tokens import encode_prompt
from arc.vote import Ballot

CPU = torch.device("cpu")


def small_task(seed: int = 0, side: int = 2) -> Task:
    rng = np.random.default_rng(seed)
    pairs = [Pair(g, np.fliplr(g)) for g in (rng.integers(0, 10, size=(side, side)) for _ in range(3))]
    return Task(f"small{seed}", tuple(pairs[:2]), (pairs[2],))


def peaked_model(max_seq_len: int, seed: int = 0, sharpness: float = 6.0, **options) -> HybridLM:
    """A random tiny model whose output distribution is sharp enough that a few grids stand out."""
    torch.manual_seed(seed)
    model = HybridLM(preset("tiny", max_seq_len=max_seq_len, **options)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)
    return model


def every_grid(budget: int):
    """Every grid the decoder's grammar admits in ``budget`` tokens (rows, row ends, EOO)."""
    for h in range(1, budget):
        for w in range(1, budget):
            if h * (w + 1) + 1 > budget:
                continue
            for cells in itertools.product(range(10), repeat=h * w):
                yield np.array(cells, dtype=np.int64).reshape(h, w)


@pytest.mark.parametrize("options", [{}, GRID_2D])
@pytest.mark.parametrize("seed", [0, 1])
def test_search_finds_exactly_the_grids_above_the_threshold(options, seed):
    task = small_task(seed)
    prompt = encode_prompt(task.demos, task.test[0].input)
    budget = 5  # 1x1, 1x2, 1x3 and 2x1 grids: 1,210 answers to enumerate
    model = peaked_model(len(prompt.ids) + budget, seed=seed, **options)
    grids = list(every_grid(budget))
    truth = np.array([f.logprob for f in teacher_forced(model, [prompt] * len(grids), grids, CPU, batch=256)])
    assert np.isclose(math.fsum(np.exp(truth)), 1.0, atol=1e-4)  # the grammar's answers are all the answers
    ranked = np.sort(truth)[::-1]
    # a threshold in the widest gap among the top answers, so float noise cannot move a grid across it
    k = 1 + int(np.argmax(ranked[:6] - ranked[1:7]))
    threshold = math.exp((ranked[k - 1] + ranked[k]) / 2)
    (found,), (record,) = candidates.search(model, [prompt], CPU, threshold=threshold, max_candidates=50,
                                            max_rows=50, keep_greedy=False)
    expected = {grids[i].tobytes() + bytes(grids[i].shape) for i in np.nonzero(truth >= math.log(threshold))[0]}
    from arc.tokens import decode_grid

    got = [decode_grid(list(f.ids)).grid for f in found]
    assert len(got) == k and not record["truncated"]
    assert {g.tobytes() + bytes(g.shape) for g in got} == expected
    for f, g in zip(found, got):  # each answer's log-probability is teacher forcing's
        assert f.logprob == pytest.approx(truth[[i for i, x in enumerate(grids) if x.shape == g.shape and (x == g).all()][0]], abs=1e-4)
    assert [f.logprob for f in found] == sorted((f.logprob for f in found), reverse=True)


@pytest.mark.parametrize("options", [{}, GRID_2D])
def test_search_with_nothing_above_the_threshold_is_greedy_decoding(options):
    torch.manual_seed(0)
    model = HybridLM(preset("tiny", **options)).eval()
    tasks = [small_task(s, side=3) for s in range(4)]
    prompts = [encode_prompt(t.demos, t.test[0].input, block_size=model.cfg.max_seq_len) for t in tasks]
    found, records = candidates.search(model, prompts, CPU, threshold=1.0)
    greedy = decode(model, prompts, CPU)
    for answers, (ids, mean_lp), record in zip(found, greedy, records):
        assert [list(f.ids) for f in answers] == [ids] and answers[0].greedy
        assert answers[0].mean_logprob == pytest.approx(mean_lp, abs=1e-5)  # the vote's tie-break reads the same figure
        assert record["peak_rows"] == 1 and record["tokens"] == len(ids) - 1


def test_search_caps_keep_the_greedy_answer_and_say_they_truncated():
    task = small_task(3)
    prompt = encode_prompt(task.demos, task.test[0].input)
    model = peaked_model(len(prompt.ids) + 7, sharpness=1.0)  # flat: many grids above a low threshold
    (found,), (record,) = candidates.search(model, [prompt], CPU, threshold=1e-4, max_candidates=3, max_rows=4)
    assert record["truncated"] and len(found) == 3 and record["peak_rows"] <= 4
    assert any(f.greedy for f in found)
    with pytest.raises(ValueError, match="threshold"):
        candidates.search(model, [prompt], CPU, threshold=0.0)


def test_view_scores_do_not_depend_on_the_order_of_the_views():
    task = small_task(5, side=3)
    model = peaked_model(512, sharpness=2.0, **GRID_2D)
    views = []
    for view in augment.views(8):
        seen = view.apply_task(task)
        views.append((view, encode_prompt(seen.demos, seen.test[0].input, block_size=512)))
    grids = [task.test[0].output, np.rot90(task.test[0].output), np.zeros((2, 3), dtype=np.int64)]
    table = candidates.view_scores(model, views, grids, CPU, batch=5)
    perm = [3, 7, 0, 5, 1, 6, 2, 4]
    shuffled = candidates.view_scores(model, [views[i] for i in perm], grids, CPU, batch=3)
    np.testing.assert_allclose(shuffled, table[:, perm], atol=1e-4)
    assert all(np.isfinite(table).ravel()) and (table < 0).all()
    # the sum is exact: the same floats in any order give the same total, bit for bit
    for row in table:
        assert candidates.product_score(row) == candidates.product_score(row[perm]) == candidates.product_score(row[::-1])
    # a grid mapped into each view is what that view's prompt is read with: identity view, original grid
    forced = teacher_forced(model, [views[0][1]], [grids[0]], CPU)[0]
    assert table[0, 0] == pytest.approx(forced.logprob, abs=1e-5)


def _ballot(v: int, fill: int) -> Ballot:
    return Ballot(np.full((1, 1), fill), v, 0.0, ("identity",) * v)


def test_selection_rules():
    ballots = [_ballot(4, 1), _ballot(3, 2), _ballot(1, 3)]  # vote order
    assert candidates.selections(ballots, None) == {"vote": [0, 1]}
    picks = candidates.selections(ballots, [-9.0, -2.0, -5.0])
    assert picks == {"vote": [0, 1], "product": [1, 2], "both": [1, 0]}
    picks = candidates.selections(ballots, [-1.0, -2.0, -5.0])  # vote and product agree on the best
    assert picks["both"] == [0, 1] and picks["product"] == [0, 1]
    assert candidates.selections(ballots[:1], [-1.0]) == {"vote": [0, 0], "product": [0, 0], "both": [0, 0]}
    assert candidates.selections([], None) == {}
    # equal scores fall back to votes, then the vote order
    assert candidates.product_rank(ballots, [-1.0, -1.0, -1.0]) == [0, 1, 2]


def test_the_choice_never_reads_the_test_output():
    """The same task with its truth, without it, and with a wrong one: the same attempts and scores."""
    task = small_task(7, side=3)
    test = task.test[0]
    model = peaked_model(len(encode_prompt(task.demos, test.input).ids) + 24, sharpness=2.0, **GRID_2D)
    variants = [task, Task(task.id, task.train, (Pair(test.input, None),)),
                Task(task.id, task.train, (Pair(test.input, np.zeros((5, 5), dtype=np.int64)),))]
    cfg = SolveConfig(views=4, select="both", search=0.02, dtype="float32")
    preds = [solve_task(model, t, cfg, CPU).tests[0] for t in variants]
    first = preds[0]
    assert first.info["picks"] and "product" in first.info["picks"]
    for b in first.info["ballots"][: cfg.score_max]:  # no score only where a view cannot hold the grid (too long)
        assert len(b["view_logprobs"]) == 4 and (b["score"] is None) == (None in b["view_logprobs"])
    assert first.info["search"]["tokens"] > 0
    for p in preds[1:]:
        assert (p.attempt_1 == first.attempt_1).all() and (p.attempt_2 == first.attempt_2).all()
        assert p.info["picks"] == first.info["picks"] and p.info["ballots"] == first.info["ballots"]
    assert "correct_by" not in preds[1].info and preds[1].correct is None
    assert preds[2].info["correct_by"]["product"] == [False, False] and preds[2].info["truth_rank"] is None


def test_product_selection_records_every_rule_and_where_the_truth_ranked():
    """An oracle candidate: the true grid among the candidates is found in the ballots and the
    info says which rules would have submitted it."""
    task = small_task(9, side=2)
    model = peaked_model(len(encode_prompt(task.demos, task.test[0].input).ids) + 24, sharpness=2.0, **GRID_2D)
    cfg = SolveConfig(views=8, select="product", search=0.01, search_max=4, dtype="float32")
    info = solve_task(model, task, cfg, CPU).tests[0].info
    assert set(info["picks"]) == {"vote", "product", "both"}
    assert set(info["correct_by"]) == {"vote", "product", "both"}
    order = info["order"]
    assert sorted(order) == list(range(len(info["ballots"])))
    scores = [info["ballots"][i]["score"] for i in order if info["ballots"][i].get("score") is not None]
    assert scores == sorted(scores, reverse=True)
    assert all("grid" in info["ballots"][i] for i in order[:6])
    if info["truth_rank"] is not None:
        assert info["correct_by"]["product"][0] == (info["truth_rank"] == 0)


@pytest.mark.parametrize("bad, match", [(dict(select="best"), "--select"), (dict(search=1.5), "--search"),
                                        (dict(search=0.1, temperature=0.5), "exclude"), (dict(search_max=0), "--search_max")])
def test_bad_settings_are_refused_naming_the_flag(bad, match):
    with pytest.raises(ValueError, match=match):
        SolveConfig(**bad)


def test_the_search_adds_candidates_but_not_votes():
    """With the search on, the vote rule picks what greedy voting picks: extra grids bring no vote."""
    task = small_task(0)
    model = peaked_model(len(encode_prompt(task.demos, task.test[0].input).ids) + 7, sharpness=6.0)  # room for a 2x2 grid
    greedy = solve_task(model, task, SolveConfig(views=2, select="both", dtype="float32"), CPU).tests[0].info
    searched = solve_task(model, task, SolveConfig(views=2, select="both", search=0.01, dtype="float32"), CPU).tests[0].info
    assert len(searched["ballots"]) > len(greedy["ballots"])  # the search found more grids
    assert sorted(searched["votes"], reverse=True) == sorted(greedy["votes"], reverse=True) + [0] * (len(searched["votes"]) - len(greedy["votes"]))
    assert searched["picks"]["vote"] == greedy["picks"]["vote"]
    assert [searched["ballots"][k]["views"] for k in searched["picks"]["vote"]] == [greedy["ballots"][k]["views"] for k in greedy["picks"]["vote"]]
