"""The official ARC Prize score of a submission, whoever made it, and results.json: the one
record of an evaluation (:func:`build_results`), which eval.py writes and arc/report.py renders.

A submission is the Kaggle format::

    {task_id: [{"attempt_1": grid, "attempt_2": grid}, ...]}   # one entry per test input, in order

where a grid is a list of rows of ints 0..9 (1..30 rows and columns). A test input is solved if
either attempt equals its true output exactly (shape and every cell); a task scores the fraction of
its test inputs solved; the score is the mean over tasks. Only tasks whose test outputs are all known
are scored; the others are listed as unscored. When no task is scored the score is None ("not
scored"), never 0.0.

This module never crashes on a bad submission: anything that is not a well-formed grid where one is
expected (missing task, missing entry, missing attempt, ragged rows, floats, colours outside 0..9,
empty grids, unknown task ids, a top level that is not a dict) counts as wrong and is described in
``ScoreReport.warnings`` (and logged). The tasks themselves are trusted: they come from
:mod:`arc.data`, which validates them.

results.json (schema 2), built only by :func:`build_results` from a :class:`ScoreReport` plus what
the caller knows about how the submission was made; strict JSON (no NaN: non-finite numbers are null)::

    {
      "schema": 2,
      "score": float | null,        # official score (pass@2), mean over scored tasks; null: nothing scored
      "pass_at_1": float | null,    # the same with attempt_1 only
      "tasks_solved": int,          # scored tasks with every test input solved
      "tasks_scored": int,
      "test_inputs_solved": int,
      "test_inputs": int,           # over scored tasks
      "unscored": [task_id, ...],   # tasks with some test output unknown
      "warnings": [str, ...],       # everything that was wrong with the submission
      "run": {...},                 # how the submission was made, as the caller records it; eval.py:
                                    #   checkpoint, checkpoint_step, model_config | submission,
                                    #   data, split, source, device, machine, settings {eval, solve,
                                    #   ttt}, sample {n, seed, ids} | null, skipped [{task_id, file,
                                    #   reason}], duplicates [[dropped, kept]], renamed [[new, original]],
                                    #   seen_in_training [task_id],
                                    #   seconds, generated_tokens, resumed_tasks,
                                    #   by_select {rule: {score, tasks_solved, tasks_scored}}
                                    #   (arc.candidates.by_select: what vote/product/both scored)
      "tasks": {                    # every task given, in the order given
        task_id: {
          "score": float | null,    # null: unscored
          "pass_at_1": float | null,
          "solved": bool | null,
          "info": {...},            # the caller's per-task record; eval.py: seconds, generated_tokens,
                                    #   timings {decode, score} (seconds; decode is the task's share, by
                                    #   tokens, of its --group's decoding), seen_in_training (bool)
          "tests": [                # one per test input, in order
            {
              "index": int,
              "attempt_1": grid | null,          # as submitted; null when it is not a grid
              "attempt_2": grid | null,
              "reasons": [str | null, str | null],  # why an attempt is not a grid
              "correct": [bool, bool] | null,    # per attempt; null without the truth
              "solved": bool | null,
              "right_attempt": 1 | 2 | null,
              "shape_ok": [bool, bool] | null,   # per attempt: has the truth's shape
              "info": {...}                      # the solver's record of this test input, whole:
                                                 #   eval.py: arc.vote.two_attempts' candidates,
                                                 #   malformed, votes, ballots, repeated, placeholder;
                                                 #   arc.solve's select, picks, order, search,
                                                 #   score_views, each ballot's score, view_logprobs
                                                 #   and (the best few) grid, correct_by, truth_rank;
                                                 #   and "adapt" (test-time training: steps,
                                                 #   first_loss, last_loss, seconds) when it ran
            }, ...
          ]
        }, ...
      }
    }
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from arc.data import Task
from arc.files import atomic_write_text
from arc.grid import GridError, parse_grid, same_grid

log = logging.getLogger(__name__)

ATTEMPT_KEYS = ("attempt_1", "attempt_2")
MAX_LOGGED_WARNINGS = 20  # the report keeps every warning; the log shows this many and a count

Attempts = tuple["np.ndarray | None", "np.ndarray | None"]


# ----------------------------------------------------------------------------------------------
# grids


def grid_to_list(grid: np.ndarray) -> list[list[int]]:
    """A grid as JSON-friendly rows of Python ints."""
    arr = np.asarray(grid)
    if arr.ndim != 2:
        raise ValueError(f"a grid has 2 dimensions, got shape {arr.shape}")
    return [[int(v) for v in row] for row in arr]


def read_grid(obj: Any) -> tuple[np.ndarray | None, str | None]:
    """A submitted grid: ``(array, None)`` if :func:`arc.grid.parse_grid` accepts it, else
    ``(None, reason)``; a missing (null) grid is a reason too. Never raises."""
    if obj is None:
        return None, "missing (null)"
    try:
        return parse_grid(obj, "grid"), None
    except GridError as e:
        return None, str(e)


# ----------------------------------------------------------------------------------------------
# reading a submission


@dataclass
class _Entry:
    """One test input's attempts as read from a submission."""

    attempts: Attempts = (None, None)
    reasons: tuple[str | None, str | None] = ("no entry", "no entry")


def _read_entry(where: str, entry: Any, warnings: list[str]) -> _Entry:
    if not isinstance(entry, Mapping):
        warnings.append(f"{where}: entry is a {type(entry).__name__}, not a dict with {' and '.join(ATTEMPT_KEYS)}")
        reason = "entry is not a dict"
        return _Entry((None, None), (reason, reason))
    extra = sorted(str(k) for k in entry if k not in ATTEMPT_KEYS)
    if extra:
        warnings.append(f"{where}: unexpected keys {extra} ignored")
    grids: list[np.ndarray | None] = []
    reasons: list[str | None] = []
    for key in ATTEMPT_KEYS:
        if key not in entry:
            grid, reason = None, "missing"
        else:
            grid, reason = read_grid(entry[key])
        if reason is not None:
            warnings.append(f"{where} {key}: {reason}")
        grids.append(grid)
        reasons.append(reason)
    return _Entry((grids[0], grids[1]), (reasons[0], reasons[1]))


def _read_submission(obj: Any, expected: Mapping[str, int]) -> tuple[dict[str, list[_Entry]], list[str]]:
    """Parse every entry of a submission, collecting a warning for everything that is off.

    ``expected`` maps task ids to their number of test inputs: missing and unknown task ids and
    wrong entry counts are reported too. Returns only the tasks it could read.
    """
    warnings: list[str] = []
    if not isinstance(obj, Mapping):
        warnings.append(f"submission is a {type(obj).__name__}, not a dict of task id -> list of entries")
        obj = {}
    parsed: dict[str, list[_Entry]] = {}
    for task_id, entries in obj.items():
        if not isinstance(task_id, str):
            warnings.append(f"task id {task_id!r} is a {type(task_id).__name__}, not a string; ignored")
            continue
        if task_id not in expected:
            warnings.append(f"task {task_id!r}: not among the tasks scored; ignored")
            continue
        if not isinstance(entries, (list, tuple)):
            warnings.append(f"task {task_id!r}: entries are a {type(entries).__name__}, not a list")
            parsed[task_id] = []
            continue
        if len(entries) != expected[task_id]:
            n = expected[task_id]
            what = "the extra ignored" if len(entries) > n else "the missing count as wrong"
            warnings.append(f"task {task_id!r}: {len(entries)} entries for {n} test inputs; {what}")
        keep = entries[: expected[task_id]]
        parsed[task_id] = [_read_entry(f"task {task_id!r} test {i}", e, warnings) for i, e in enumerate(keep)]
    for task_id in expected:
        if task_id not in obj:
            warnings.append(f"task {task_id!r}: missing from the submission (counts as wrong)")
    return parsed, warnings


# ----------------------------------------------------------------------------------------------
# scoring


@dataclass
class TestScore:
    """One test input. ``correct``/``shape_ok`` are per attempt, None when the truth is unknown."""

    index: int
    correct: tuple[bool, bool] | None
    shape_ok: tuple[bool, bool] | None  # the attempt has the true output's shape
    reasons: tuple[str | None, str | None]  # why an attempt is not a grid (None when it is)
    attempts: Attempts = field(default=(None, None), repr=False)

    @property
    def solved(self) -> bool:
        return self.correct is not None and any(self.correct)

    @property
    def right_attempt(self) -> int | None:
        """1 or 2: the first attempt that is right; None if neither is (or no truth)."""
        if self.correct is None:
            return None
        for k, ok in enumerate(self.correct, start=1):
            if ok:
                return k
        return None

    def to_dict(self) -> dict[str, Any]:
        """This test input's part of results.json (see the module docstring), without ``info``."""
        return {
            "index": self.index,
            "attempt_1": None if self.attempts[0] is None else grid_to_list(self.attempts[0]),
            "attempt_2": None if self.attempts[1] is None else grid_to_list(self.attempts[1]),
            "reasons": list(self.reasons),
            "correct": None if self.correct is None else list(self.correct),
            "solved": self.solved if self.correct is not None else None,
            "right_attempt": self.right_attempt,
            "shape_ok": None if self.shape_ok is None else list(self.shape_ok),
        }


@dataclass
class TaskScore:
    """One task: ``score`` (pass@2) and ``pass_at_1`` are fractions of its test inputs, None if unscored."""

    task_id: str
    score: float | None
    pass_at_1: float | None
    tests: list[TestScore]

    @property
    def scored(self) -> bool:
        return self.score is not None

    @property
    def solved(self) -> bool:
        return self.score == 1.0

    def to_dict(self) -> dict[str, Any]:
        """This task's part of results.json (see the module docstring), without ``info``."""
        return {
            "score": self.score,
            "pass_at_1": self.pass_at_1,
            "solved": self.solved if self.scored else None,
            "tests": [t.to_dict() for t in self.tests],
        }


@dataclass
class ScoreReport:
    """The official score (``score``, i.e. pass@2) and everything behind it."""

    score: float | None  # mean over scored tasks of the fraction of test inputs solved; None: none scored
    pass_at_1: float | None  # the same with attempt_1 only
    tasks_solved: int  # scored tasks with every test input solved
    tasks_scored: int
    test_inputs_solved: int
    test_inputs: int  # over scored tasks
    tasks: dict[str, TaskScore]  # every task given, scored or not, in the order given
    unscored: list[str]  # ids of tasks with some test output unknown
    warnings: list[str]

    def summary(self) -> str:
        """One line for a log."""
        return summary_line(self.score, self.pass_at_1, self.tasks_solved, self.tasks_scored, self.test_inputs_solved,
                            self.test_inputs, unscored=len(self.unscored), warnings=len(self.warnings))


def summary_line(score: float | None, pass_at_1: float | None, tasks_solved: int, tasks_scored: int,
                 test_inputs_solved: int, test_inputs: int, *, unscored: int = 0, warnings: int = 0) -> str:
    """The one-line summary of a score (also of a results.json, by its keys); "not scored" when
    no task had known test outputs."""
    if score is None:
        head = "not scored (no task with known test outputs)"
    else:
        head = (f"score {score:.4f} (pass@2, official), pass@1 {pass_at_1:.4f}, {tasks_solved}/{tasks_scored} tasks "
                f"solved, {test_inputs_solved}/{test_inputs} test inputs solved")
    return head + (f", {unscored} unscored" if unscored else "") + (f", {warnings} warnings" if warnings else "")


def score_submission(submission: Any, tasks: Iterable[Task]) -> ScoreReport:
    """Score a submission against tasks by the ARC Prize rule (see the module docstring).

    Raises ValueError only for a caller error: two tasks with the same id.
    """
    tasks = list(tasks)
    ids = [t.id for t in tasks]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"tasks to score have duplicate ids: {dupes[:10]}")
    parsed, warnings = _read_submission(submission, {t.id: len(t.test) for t in tasks})

    per_task: dict[str, TaskScore] = {}
    unscored: list[str] = []
    for task in tasks:
        entries = parsed.get(task.id, [])
        known = len(task.test) > 0 and all(p.output is not None for p in task.test)
        if not task.test:
            warnings.append(f"task {task.id!r}: has no test inputs; unscored")
        tests: list[TestScore] = []
        for i, pair in enumerate(task.test):
            entry = entries[i] if i < len(entries) else _Entry()
            if known:
                truth = pair.output
                correct = (same_grid(entry.attempts[0], truth), same_grid(entry.attempts[1], truth))
                shape_ok = tuple(a is not None and a.shape == truth.shape for a in entry.attempts)
            else:
                correct = shape_ok = None
            tests.append(TestScore(i, correct, shape_ok, entry.reasons, entry.attempts))  # type: ignore[arg-type]
        if known:  # a known task has test inputs: the means are defined
            score = fmean(t.solved for t in tests)
            pass1 = fmean(t.correct[0] for t in tests)  # type: ignore[index]
        else:
            score = pass1 = None
            unscored.append(task.id)
        per_task[task.id] = TaskScore(task.id, score, pass1, tests)

    scored = [t for t in per_task.values() if t.scored]
    report = ScoreReport(
        score=fmean(t.score for t in scored) if scored else None,  # type: ignore[misc]
        pass_at_1=fmean(t.pass_at_1 for t in scored) if scored else None,  # type: ignore[misc]
        tasks_solved=sum(t.solved for t in scored),
        tasks_scored=len(scored),
        test_inputs_solved=sum(x.solved for t in scored for x in t.tests),
        test_inputs=sum(len(t.tests) for t in scored),
        tasks=per_task,
        unscored=unscored,
        warnings=warnings,
    )
    for w in warnings[:MAX_LOGGED_WARNINGS]:
        log.warning("submission: %s", w)
    if len(warnings) > MAX_LOGGED_WARNINGS:
        log.warning("submission: ... and %d more warnings (all in the report)", len(warnings) - MAX_LOGGED_WARNINGS)
    return report


# ----------------------------------------------------------------------------------------------
# results.json


RESULTS_SCHEMA = 2  # 1: eval.py before results.json had "run" and per-test "info"


def jsonable(obj: Any) -> Any:
    """``obj`` as strict JSON values: numpy arrays, ints and floats become lists and Python
    numbers, tuples lists, and non-finite floats None (results.json is strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if obj is None or isinstance(obj, str):
        return obj
    raise TypeError(f"{type(obj).__name__} has no place in results.json")


def build_results(
    report: ScoreReport,
    *,
    task_info: Mapping[str, Mapping[str, Any]] | None = None,
    test_info: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    run: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """results.json (schema in the module docstring): the score report, with each task's
    ``task_info[task_id]`` and each test input's ``test_info[task_id][i]`` kept whole under
    ``"info"`` (whatever the solver recorded reaches results.json), and ``run`` as it is given."""
    task_info, test_info = task_info or {}, test_info or {}
    tasks: dict[str, Any] = {}
    for task_id, ts in report.tasks.items():
        entry = ts.to_dict()
        infos = test_info.get(task_id, ())
        for test, d in zip(ts.tests, entry["tests"]):
            d["info"] = jsonable(infos[test.index]) if test.index < len(infos) else {}
        tasks[task_id] = {**{k: v for k, v in entry.items() if k != "tests"},
                          "info": jsonable(task_info.get(task_id, {})), "tests": entry["tests"]}
    return {
        "schema": RESULTS_SCHEMA,
        "score": report.score,
        "pass_at_1": report.pass_at_1,
        "tasks_solved": report.tasks_solved,
        "tasks_scored": report.tasks_scored,
        "test_inputs_solved": report.test_inputs_solved,
        "test_inputs": report.test_inputs,
        "unscored": list(report.unscored),
        "warnings": list(report.warnings),
        "run": jsonable(run or {}),
        "tasks": tasks,
    }


def results_summary(results: Mapping[str, Any]) -> str:
    """The one-line summary of a results.json."""
    return summary_line(results["score"], results["pass_at_1"], results["tasks_solved"], results["tasks_scored"],
                        results["test_inputs_solved"], results["test_inputs"], unscored=len(results["unscored"]),
                        warnings=len(results["warnings"]))


# ----------------------------------------------------------------------------------------------
# files


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_submission(path: str | os.PathLike, submission: Mapping[str, Any]) -> None:
    """Write a submission as JSON, atomically; numpy grids and ints become lists and ints."""
    atomic_write_text(path, json.dumps(submission, default=_json_default))


def write_results(path: str | os.PathLike, results: Mapping[str, Any]) -> None:
    """Write results.json atomically, as strict JSON (a NaN anywhere is a bug, and raises)."""
    atomic_write_text(path, json.dumps(results, indent=1, allow_nan=False) + "\n")


def load_submission(path: str | os.PathLike) -> dict:
    """Read a submission file. Raises ValueError naming the file if it is not UTF-8 JSON text or
    not a dict at the top level (FileNotFoundError if it is missing); what is inside is checked by
    :func:`score_submission`."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not a submission file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a JSON text file (byte {e.start} is not UTF-8: {raw[e.start:e.start + 1]!r})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: top level is a {type(obj).__name__}, expected {{task_id: [entries]}}")
    return obj
