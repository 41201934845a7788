"""The official ARC Prize rule, and robustness to any submission."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from arc.data import Pair, Task
from arc.grid import same_grid
from arc.score import (
    RESULTS_SCHEMA,
    build_results,
    grid_to_list,
    load_submission,
    read_grid,
    results_summary,
    score_submission,
    write_results,
    write_submission,
)

A = np.array([[1, 2, 3], [4, 5, 6]])
B = np.array([[7, 8], [9, 0]])
C = np.array([[3]])


def task(task_id: str, outputs: list, demo=(A, B)) -> Task:
    """A task whose test inputs are A and whose test outputs are ``outputs``."""
    return Task(task_id, (Pair(*demo),), tuple(Pair(A, o) for o in outputs), source="test")


TASKS = [task("t1", [B]), task("t2", [A, C]), task("t3", [C])]


def entry(a1, a2) -> dict:
    return {"attempt_1": None if a1 is None else grid_to_list(a1), "attempt_2": None if a2 is None else grid_to_list(a2)}


def perfect() -> dict:
    return {t.id: [entry(p.output, p.output) for p in t.test] for t in TASKS}


def test_perfect_submission_scores_one():
    r = score_submission(perfect(), TASKS)
    assert (r.score, r.pass_at_1) == (1.0, 1.0)
    assert (r.tasks_solved, r.tasks_scored, r.test_inputs_solved, r.test_inputs) == (3, 3, 4, 4)
    assert r.warnings == [] and r.unscored == []


def test_task_score_is_fraction_of_test_inputs_and_total_is_mean_over_tasks():
    sub = perfect()
    sub["t2"][1] = entry(B, B)  # t2: one of two test inputs solved -> 0.5
    sub["t3"] = [entry(B, A)]  # t3: 0
    r = score_submission(sub, TASKS)
    assert r.tasks["t2"].score == 0.5
    assert r.tasks["t3"].score == 0.0
    assert r.score == pytest.approx((1 + 0.5 + 0) / 3)
    assert r.tasks_solved == 1
    assert (r.test_inputs_solved, r.test_inputs) == (2, 4)


def test_second_attempt_counts_for_pass_at_2_but_not_pass_at_1():
    sub = perfect()
    sub["t1"] = [entry(C, B)]
    r = score_submission(sub, TASKS)
    t = r.tasks["t1"].tests[0]
    assert t.correct == (False, True) and t.right_attempt == 2 and t.solved
    assert r.score == 1.0
    assert r.pass_at_1 == pytest.approx(2 / 3)


def test_exact_match_needs_same_shape_and_every_cell():
    wrong_cell = B.copy()
    wrong_cell[1, 1] = 5
    padded = np.zeros((3, 3), dtype=int)
    padded[:2, :2] = B
    sub = perfect()
    sub["t1"] = [entry(wrong_cell, padded)]
    t = score_submission(sub, TASKS).tasks["t1"].tests[0]
    assert t.correct == (False, False)
    assert t.shape_ok == (True, False)


def test_tasks_without_truth_are_listed_unscored_and_left_out_of_the_mean():
    hidden = Task("hidden", (Pair(A, B),), (Pair(A, None),))
    sub = perfect()
    sub["hidden"] = [entry(A, A)]
    r = score_submission(sub, TASKS + [hidden])
    assert r.unscored == ["hidden"]
    assert r.tasks["hidden"].score is None and r.tasks["hidden"].tests[0].correct is None
    assert (r.score, r.tasks_scored, r.test_inputs) == (1.0, 3, 4)


def test_duplicate_task_ids_are_a_caller_error():
    with pytest.raises(ValueError, match="duplicate"):
        score_submission({}, [TASKS[0], TASKS[0]])


BROKEN_ATTEMPTS = {
    "ragged": [[1, 2], [3]],
    "float": [[7.0, 8], [9, 0]],
    "bool": [[True, 8], [9, 0]],
    "string cell": [["7", 8], [9, 0]],
    "out of range": [[7, 8], [9, 10]],
    "negative": [[7, 8], [9, -1]],
    "empty": [],
    "empty row": [[]],
    "flat": [7, 8, 9, 0],
    "string": "7890",
    "null": None,
    "dict": {"a": 1},
    "too tall": [[0]] * 31,
    "too wide": [[0] * 31],
    "huge int": [[7, 8], [9, 10**30]],
}


@pytest.mark.parametrize("name", sorted(BROKEN_ATTEMPTS))
def test_malformed_attempt_counts_as_wrong_with_a_warning(name):
    sub = perfect()
    sub["t1"] = [{"attempt_1": BROKEN_ATTEMPTS[name], "attempt_2": BROKEN_ATTEMPTS[name]}]
    r = score_submission(sub, TASKS)
    t = r.tasks["t1"].tests[0]
    assert t.correct == (False, False)
    assert t.reasons[0] is not None and t.attempts[0] is None
    assert any("'t1' test 0 attempt_1" in w for w in r.warnings)
    assert r.score == pytest.approx(2 / 3)  # the other tasks are unaffected


BROKEN_SUBMISSIONS = {
    "list top level": lambda s: [s],
    "none top level": lambda s: None,
    "string top level": lambda s: "oops",
    "missing task": lambda s: {k: v for k, v in s.items() if k != "t1"},
    "entries not a list": lambda s: {**s, "t1": {"attempt_1": grid_to_list(B)}},
    "no entries": lambda s: {**s, "t1": []},
    "entry not a dict": lambda s: {**s, "t1": [grid_to_list(B)]},
    "missing attempts": lambda s: {**s, "t1": [{}]},
    "unknown keys only": lambda s: {**s, "t1": [{"attempt_3": grid_to_list(B)}]},
}


@pytest.mark.parametrize("name", sorted(BROKEN_SUBMISSIONS))
def test_broken_submission_is_scored_not_crashed(name):
    sub = BROKEN_SUBMISSIONS[name](perfect())
    r = score_submission(sub, TASKS)
    assert r.warnings, "every defect is reported"
    assert not r.tasks["t1"].tests[0].solved
    expected = 0.0 if "top level" in name else 2 / 3
    assert r.score == pytest.approx(expected)
    json.dumps(build_results(r), allow_nan=False)


def test_missing_second_test_entry_and_missing_attempt_2_count_as_wrong():
    sub = perfect()
    sub["t2"] = [entry(A, None)]  # second entry absent, attempt_2 null
    del sub["t1"][0]["attempt_2"]
    r = score_submission(sub, TASKS)
    assert r.tasks["t2"].score == 0.5
    assert r.tasks["t1"].score == 1.0  # attempt_1 was right
    assert any("1 entries for 2 test inputs" in w for w in r.warnings)
    assert any("attempt_2: missing" in w for w in r.warnings)


def test_extra_entries_and_unknown_task_ids_are_ignored_with_warnings():
    sub = perfect()
    sub["t1"] = sub["t1"] + [entry(C, C)]
    sub["not-a-task"] = [entry(C, C)]
    r = score_submission(sub, TASKS)
    assert r.score == 1.0
    assert any("not-a-task" in w for w in r.warnings)
    assert any("2 entries for 1 test inputs" in w for w in r.warnings)
    assert "not-a-task" not in r.tasks


def test_warnings_are_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="arc.score"):
        score_submission({}, TASKS)
    assert "missing from the submission" in caplog.text


def test_numpy_grids_in_memory_are_accepted():
    sub = {t.id: [{"attempt_1": p.output, "attempt_2": p.output} for p in t.test] for t in TASKS}
    assert score_submission(sub, TASKS).score == 1.0


def test_results_are_strict_json_with_attempts_truth_and_reasons():
    sub = perfect()
    sub["t3"] = [entry(None, B)]
    d = build_results(score_submission(sub, TASKS + [Task("h", (Pair(A, B),), (Pair(A, None),))]))
    back = json.loads(json.dumps(d, allow_nan=False))
    assert back["schema"] == RESULTS_SCHEMA
    assert back["tasks"]["t1"]["tests"][0] == {
        "index": 0, "attempt_1": grid_to_list(B), "attempt_2": grid_to_list(B), "reasons": [None, None],
        "correct": [True, True], "solved": True, "right_attempt": 1, "shape_ok": [True, True], "info": {}}
    assert back["tasks"]["h"]["score"] is None and back["tasks"]["h"]["solved"] is None
    t3 = back["tasks"]["t3"]["tests"][0]
    assert t3["reasons"] == ["missing (null)", None] and t3["attempt_1"] is None
    assert t3["correct"] == [False, False] and t3["right_attempt"] is None
    assert (back["score"], back["tasks_solved"], back["unscored"]) == (2 / 3, 2, ["h"])


def test_results_keep_the_solvers_record_whole_and_the_run_as_given():
    """Whatever the solver records per test (votes, test-time training's "adapt", keys added later)
    reaches results.json; numpy values become JSON and non-finite numbers null."""
    adapt = {"steps": 32, "first_loss": np.float32(1.5), "last_loss": float("nan"), "seconds": 2.0}
    info = {"votes": [3, 1], "candidates": 4, "malformed": [], "adapt": adapt, "shape": (2, 2), "new_key": np.int64(7)}
    r = score_submission(perfect(), TASKS)
    d = build_results(r, test_info={"t1": [info]}, task_info={"t1": {"seconds": 1.25}},
                      run={"checkpoint": "runs/x/latest.pt", "sample": {"n": 3, "seed": 0, "ids": ["t1", "t2", "t3"]}})
    back = json.loads(json.dumps(d, allow_nan=False))
    assert back["tasks"]["t1"]["tests"][0]["info"] == {
        "votes": [3, 1], "candidates": 4, "malformed": [], "shape": [2, 2], "new_key": 7,
        "adapt": {"steps": 32, "first_loss": 1.5, "last_loss": None, "seconds": 2.0}}
    assert back["tasks"]["t1"]["info"] == {"seconds": 1.25}
    assert back["tasks"]["t2"]["info"] == {} and back["tasks"]["t2"]["tests"][1]["info"] == {}
    assert back["run"] == {"checkpoint": "runs/x/latest.pt", "sample": {"n": 3, "seed": 0, "ids": ["t1", "t2", "t3"]}}
    with pytest.raises(TypeError, match="object"):
        build_results(r, run={"x": object()})


def test_nothing_scored_is_not_a_score_of_zero():
    """No task at all, or only tasks without known test outputs: score None, "not scored"."""
    hidden = Task("hidden", (Pair(A, B),), (Pair(A, None),))
    for tasks in ([], [hidden]):
        r = score_submission({"hidden": [entry(A, A)]}, tasks)
        assert (r.score, r.pass_at_1, r.tasks_scored, r.test_inputs) == (None, None, 0, 0)
        assert r.summary().startswith("not scored")
        d = json.loads(json.dumps(build_results(r), allow_nan=False))
        assert d["score"] is None and d["pass_at_1"] is None
        assert results_summary(d).startswith("not scored")
    assert results_summary(build_results(score_submission(perfect(), TASKS))).startswith(
        "score 1.0000 (pass@2, official), pass@1 1.0000, 3/3 tasks solved, 4/4 test inputs solved")


# ---- grids and files


@given(hnp.arrays(np.int64, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=30), elements=st.integers(0, 9)))
@settings(max_examples=50, deadline=None)
def test_grid_list_round_trip(grid):
    rows = grid_to_list(grid)
    assert all(type(v) is int for row in rows for v in row)
    back, reason = read_grid(json.loads(json.dumps(rows)))
    assert reason is None and back.dtype == np.int64 and np.array_equal(back, grid)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-20, 20) | st.floats(allow_nan=True) | st.text(max_size=3),
    # keys from "abc" only: never a task id or "attempt_1", so what each submission below scores is known
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text("abc", max_size=3), children, max_size=4),
    max_leaves=30,
)


@given(json_values)
@settings(max_examples=200, deadline=None)
def test_any_json_as_submission_or_attempt_never_crashes(obj):
    # t1's only test output is B; t2 and t3 are missing from these submissions, so score 0
    right = same_grid(read_grid(obj)[0], B)
    for sub, t1_solved in ((obj, None), ({"t1": obj}, False), ({"t1": [obj]}, False),
                           ({"t1": [{"attempt_1": obj, "attempt_2": obj}]}, right)):
        r = score_submission(sub, TASKS)
        if t1_solved is not None:
            assert r.score == r.pass_at_1 == (1 / 3 if t1_solved else 0.0)
            assert r.tasks["t2"].score == r.tasks["t3"].score == 0.0
        else:  # any JSON as a whole submission: no task id in it, so nothing is solved
            assert r.score == r.pass_at_1 == 0.0 and r.tasks_solved == 0
        json.dumps(build_results(r), allow_nan=False)


def test_write_then_load_round_trips_atomically(tmp_path):
    sub = {t.id: [{"attempt_1": p.output, "attempt_2": np.int64(3) * 0 + p.output} for p in t.test] for t in TASKS}
    path = tmp_path / "out" / "submission.json"
    write_submission(path, sub)
    assert [p.name for p in path.parent.iterdir()] == ["submission.json"]  # no temporary left behind
    loaded = load_submission(path)
    assert loaded == perfect()
    assert score_submission(loaded, TASKS).score == 1.0
    write_submission(path, {"t1": []})  # overwrite in place
    assert load_submission(path) == {"t1": []}


def test_a_binary_or_folder_submission_gets_an_error_naming_it(tmp_path):
    binary = tmp_path / "sub.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(ValueError, match=r"sub\.bin: not a JSON text file \(byte 0 is not UTF-8"):
        load_submission(binary)
    with pytest.raises(ValueError, match=f"{tmp_path}: is a directory"):
        load_submission(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_submission(tmp_path / "nope.json")


def test_results_are_written_as_strict_json(tmp_path):
    d = build_results(score_submission(perfect(), TASKS))
    write_results(tmp_path / "results.json", d)
    assert json.loads((tmp_path / "results.json").read_text()) == d
    with pytest.raises(ValueError):  # a NaN that got past build_results is a bug: refuse to write it
        write_results(tmp_path / "results.json", {**d, "score": float("nan")})
    assert json.loads((tmp_path / "results.json").read_text()) == d


def test_load_names_the_file_on_bad_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"t1": [')
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        load_submission(bad)
    listy = tmp_path / "list.json"
    listy.write_text("[]")
    with pytest.raises(ValueError, match="list.json.*top level is a list"):
        load_submission(listy)


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "submission.json"
    write_submission(path, {"t1": []})
    with pytest.raises(TypeError):
        write_submission(path, {"t1": [object()]})
    assert load_submission(path) == {"t1": []}
    assert [p.name for p in tmp_path.iterdir()] == ["submission.json"]
