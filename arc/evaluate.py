"""Evaluation: pick the tasks, solve them with a checkpoint (or read a submission), score, write.

``OUTDIR/submission.json`` (Kaggle format), ``OUTDIR/results.json`` (the schema is
:mod:`arc.score`'s, built by :func:`arc.score.build_results`) and ``OUTDIR/report.html`` (rendered
from results.json by :mod:`arc.report`).

Order of work, so that nothing long runs before a mistake is found: the output folder is checked
first (it must be a writable folder), then the checkpoint, then the tasks; then the tasks are solved
(``--group`` at a time, :meth:`arc.solve.SolveConfig.tasks_together`) and each is appended to
``OUTDIR/progress.jsonl`` as soon as its group is done. An interrupted evaluation keeps every
finished task there, and the same command run again continues from it (skipping finished tasks, with
the same submission as an unbroken run; log-probabilities may differ in their last digits, since the
remaining tasks may share decoding batches with others); a finished one is rebuilt from it without
solving. The journal records the checkpoint's content hash and the solve/TTT settings: another
checkpoint or other settings in the same folder are refused unless ``--overwrite true``.

Which tasks: ``--data``/``--split``, any form :mod:`arc.sources` reads (``arc1,arc2``, ``synthetic:200``,
...; the same content kept once; ``--skip_bad`` leaves bad task files out and lists them), then
``--tasks`` (ids, in that order), then ``--sample N`` (a fixed random subset of N, drawn with
``--seed`` from the ids sorted, so it does not depend on the order the source lists them in, and a
smaller sample is the start of a larger one), then ``--limit N`` (the first N). A checkpoint that
records ``train_fingerprints`` (content hashes of its training tasks) makes every evaluated task
with the same content a warning and a mark in results.json and the report.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from tqdm import tqdm

from arc import alloc, candidates, checkpoint, data, kernels, sources
from arc.config import help_field
from arc.dist import pick_device
from arc.files import atomic_write_text
from arc.loss import resolve_dtype
from arc.model import HybridLM, ModelConfig
from arc.report import write_report
from arc.score import (
    build_results,
    jsonable,
    load_submission,
    score_submission,
    write_results,
    write_submission,
)
from arc.solve import SolveConfig, solve_tasks, submission_of
from arc.tokens import VOCAB_SIZE
from arc.ttt import TaskFineTuner, TTTConfig

log = logging.getLogger(__name__)

JOURNAL = "progress.jsonl"
JOURNAL_VERSION = 1


@dataclass(frozen=True)
class EvalConfig:
    """What eval.py evaluates and where it writes; the field names are its flags."""

    ckpt: str | None = help_field(None, "a checkpoint file, or a run directory from train.py")
    submission: str | None = help_field(None, "score this submission.json instead of running a model")
    which: str = help_field(checkpoint.LATEST, "checkpoint inside a run directory: latest.pt or best.pt")
    data: str = help_field("arc1", "arc1, arc2, a task folder, a *_challenges.json, a bundle .json, synthetic[:N], "
                                   "or several of them comma-separated (each content kept once)")
    split: Literal["train", "eval"] = help_field("eval", "which split of --data")
    skip_bad: bool = help_field(False, "leave bad task files out (listed in results.json) instead of stopping")
    tasks: str | None = help_field(None, "comma-separated task ids, evaluated in this order")
    sample: int | None = help_field(None, "a fixed random subset of N tasks, drawn with --seed (after --tasks)")
    limit: int | None = help_field(None, "only the first N tasks (after --tasks and --sample)")
    seed: int = help_field(0, "seed of --sample, of synthetic sources, of the colour-permutation views, of sampling "
                              "and of test-time training")
    device: str = help_field("auto", "auto (CUDA if present, else CPU), cpu, cuda, cuda:N")
    out: str | None = help_field(None, "output directory (required)")
    overwrite: bool = help_field(False, "start afresh when --out holds the progress of another checkpoint or settings")
    report_limit: int | None = help_field(None, "at most this many task sections in report.html")
    progress: bool = help_field(True, "show a progress bar")

    def __post_init__(self) -> None:
        if bool(self.ckpt) == bool(self.submission):
            raise ValueError("give exactly one of --ckpt or --submission")
        if not self.out:
            raise ValueError("--out is required: the directory for submission.json, results.json and report.html")
        for name in ("limit", "report_limit"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"--{name} must be >= 0, got {value}")
        if self.sample is not None and self.sample < 1:
            raise ValueError(f"--sample must be >= 1, got {self.sample}")
        if self.tasks is not None and not self.task_ids:
            raise ValueError(f"--tasks: no task ids in {self.tasks!r}")

    @property
    def task_ids(self) -> list[str] | None:
        return None if self.tasks is None else [t.strip() for t in self.tasks.split(",") if t.strip()]


class IncompatibleCheckpoint(ValueError):
    """A checkpoint this code cannot run on ARC tasks (another vocabulary, other parameters)."""


class OutputError(ValueError):
    """--out cannot take the outputs, or holds the progress of a different evaluation."""


# ----------------------------------------------------------------------------------------------
# model, output folder, tasks


def load_model(path: str | os.PathLike, device: torch.device, which: str = checkpoint.LATEST) -> tuple[HybridLM, dict]:
    """The model of a checkpoint file or run directory, on ``device``, in eval mode, and the
    checkpoint dict (with its ``path``)."""
    ckpt = checkpoint.load(path, which=which, map_location="cpu")
    file = ckpt["path"]
    try:
        cfg = ModelConfig.from_dict(ckpt["model_config"])
    except (TypeError, ValueError) as e:
        raise IncompatibleCheckpoint(f"{file}: its model config does not fit this code ({e})") from e
    if cfg.vocab_size != VOCAB_SIZE:
        raise IncompatibleCheckpoint(
            f"{file}: vocabulary of {cfg.vocab_size} tokens, but ARC grids use {VOCAB_SIZE} "
            f"(a text-trained model cannot solve ARC tasks)"
        )
    model = HybridLM(cfg)
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if missing or unexpected:
        raise IncompatibleCheckpoint(
            f"{file}: parameters do not match its config: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return model.to(device).eval(), ckpt


def prepare_out(out: str | os.PathLike) -> Path:
    """The output folder, created if need be, after proving a file can be written there: a path
    that is a file, under a file, or not writable fails here, before any work."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise OutputError(f"--out {out}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    return path


@dataclass
class Selection:
    """The tasks to evaluate and how they were chosen (recorded in results.json's ``run``)."""

    tasks: list[data.Task]
    source: str  # what --data names, in words
    skipped: list[dict[str, str]]  # bad task files left out with --skip_bad: task_id, file, reason
    duplicates: list[tuple[str, str]]  # (dropped id, kept id): same content in combined sources
    renamed: list[tuple[str, str]]  # (new id, original id): the same id with other content in combined sources
    sample: dict[str, Any] | None  # {n, seed, ids} when --sample drew them


def sample_ids(ids: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` of ``ids`` drawn at random with ``seed``, sorted. They depend only on the set of ids
    (not their order) and the seed, and the sample of n is the start of the sample of n + k."""
    if n > len(ids):
        raise ValueError(f"--sample {n}: only {len(ids)} tasks to draw from")
    pool = sorted(ids)
    order = np.random.default_rng(seed).permutation(len(pool))
    return sorted(pool[i] for i in order[:n])


def select_tasks(tasks: list[data.Task], ids: Sequence[str] | None = None, *, sample: int | None = None,
                 seed: int = 0, limit: int | None = None) -> tuple[list[data.Task], dict[str, Any] | None]:
    """Tasks named by ``ids`` (in that order; unknown ids are an error), then a random ``sample``
    of them (see :func:`sample_ids`), then the first ``limit``; and the sample's record."""
    if limit is not None and limit < 0:
        raise ValueError(f"--limit must be >= 0, got {limit}")
    if ids:
        by_id = {t.id: t for t in tasks}
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise ValueError(f"--tasks: unknown task id(s) {', '.join(unknown)}")
        tasks = [by_id[i] for i in ids]
    record = None
    if sample is not None:
        chosen = set(sample_ids([t.id for t in tasks], sample, seed))
        tasks = sorted((t for t in tasks if t.id in chosen), key=lambda t: t.id)
        record = {"n": sample, "seed": seed, "ids": [t.id for t in tasks]}
    return (tasks[:limit] if limit is not None else tasks), record


def load_selection(cfg: EvalConfig) -> Selection:
    """The tasks of ``cfg``: ``--data`` read by :func:`arc.sources.load_tasks` (bad files, combined
    sources), then ids, sample and limit."""
    loaded = sources.load_tasks(cfg.data, cfg.split, seed=cfg.seed, skip_bad=cfg.skip_bad)
    tasks, sample = select_tasks(loaded.tasks, cfg.task_ids, sample=cfg.sample, seed=cfg.seed, limit=cfg.limit)
    skipped = [{"task_id": b.task_id, "file": b.file, "reason": b.reason} for b in loaded.bad]
    return Selection(tasks, sources.describe(cfg.data, cfg.split, seed=cfg.seed), skipped, loaded.duplicates,
                     loaded.renamed, sample)


def seen_in_training(tasks: Sequence[data.Task], ckpt: dict) -> list[str]:
    """Ids of ``tasks`` whose content (:func:`arc.data.task_fingerprint`) is among the checkpoint's
    ``train_fingerprints``; [] for a checkpoint that does not record them."""
    trained = set(ckpt.get("train_fingerprints") or ())
    return [t.id for t in tasks if data.task_fingerprint(t) in trained] if trained else []


# ----------------------------------------------------------------------------------------------
# the progress journal


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Where two JSON values differ, as ``key: this vs that`` lines."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _differences(a.get(k), b.get(k), f"{where}.{k}" if where else k)
        return out
    return [] if a == b else [f"{where}: {json.dumps(a)} here, {json.dumps(b)} in the journal"]


class Journal:
    """``OUTDIR/progress.jsonl``: a header line with the evaluation's identity (``key``), then one
    line per finished task, appended and flushed to disk as soon as the task is done.

    Opening it keeps the finished tasks of the same evaluation; a torn last line (a kill during
    the write) is dropped. A journal of another evaluation is an error unless ``overwrite``.
    """

    def __init__(self, out: Path, key: dict[str, Any], *, overwrite: bool = False) -> None:
        self.path = out / JOURNAL
        self.key = jsonable(key)
        self.done: dict[str, dict] = {}
        header = {"journal": "arc-eval", "version": JOURNAL_VERSION, "key": self.key}
        if self.path.exists():
            lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
            records, torn = [], 0
            for line in lines:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    torn += 1
            old = records[0] if records and isinstance(records[0], dict) else {}
            if isinstance(old.get("key"), dict) and isinstance(old["key"].get("solve"), dict):
                old["key"]["solve"].setdefault("group", 1)  # journals from before --group solved one task at a time
                old["key"]["solve"].setdefault("draft", 0)  # and from before --draft, one token a step
                old["key"]["solve"].setdefault("compile", False)  # and from before --compile (refused: always False)
            if isinstance(old.get("key"), dict) and isinstance(old["key"].get("ttt"), dict):
                old["key"]["ttt"].setdefault("ttt_compile", False)  # journals from before --ttt_compile ran eager
            if old.get("journal") != "arc-eval" or old.get("version") != JOURNAL_VERSION:
                if not overwrite:
                    raise OutputError(f"{self.path}: not a progress journal of this eval.py; use another --out "
                                      "or pass --overwrite true to replace it")
            elif old.get("key") != self.key and not overwrite:
                diff = "; ".join(_differences(self.key, old.get("key"))[:5])
                raise OutputError(f"{self.path} holds the progress of another evaluation ({diff}); run the same "
                                  "command to continue it, use another --out, or pass --overwrite true to start afresh")
            elif old.get("key") == self.key:
                self.done = {r["task_id"]: r for r in records[1:] if isinstance(r, dict) and "task_id" in r}
                if torn:
                    log.warning("%s: dropped %d torn line(s) (an interrupted write)", self.path, torn)
        # rewrite what is kept (no torn line to append after), then append from here on
        body = [json.dumps(header)] + [json.dumps(r) for r in self.done.values()]
        atomic_write_text(self.path, "\n".join(body) + "\n")

    def finished(self, task: data.Task) -> dict | None:
        """The record of a task finished earlier, if its content has not changed since."""
        record = self.done.get(task.id)
        return record if record is not None and record.get("fingerprint") == data.task_fingerprint(task) else None

    def add(self, record: dict[str, Any]) -> None:
        record = jsonable(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[record["task_id"]] = record


# ----------------------------------------------------------------------------------------------
# evaluation


def write_outputs(out: Path, tasks: Sequence[data.Task], submission: dict, *, run: dict[str, Any],
                  task_info: dict[str, dict] | None = None, test_info: dict[str, list[dict]] | None = None,
                  report_limit: int | None = None) -> dict:
    """Score a submission against tasks and write submission.json, results.json and report.html."""
    report = score_submission(submission, tasks)
    results = build_results(report, task_info=task_info, test_info=test_info, run=run)
    write_submission(out / "submission.json", submission)
    write_results(out / "results.json", results)
    write_report(out / "report.html", results, tasks, limit=report_limit)
    log.info("%s", report.summary())
    return results


def _run_record(cfg: EvalConfig, selection: Selection) -> dict[str, Any]:
    return {"data": cfg.data, "split": cfg.split, "source": selection.source, "sample": selection.sample,
            "skipped": selection.skipped, "duplicates": [list(d) for d in selection.duplicates],
            "renamed": [list(r) for r in selection.renamed]}


def evaluate(cfg: EvalConfig, solve_cfg: SolveConfig, ttt_cfg: TTTConfig | None = None) -> dict:
    """Solve and score the tasks of ``cfg`` with its checkpoint, resuming from ``cfg.out``'s
    journal; returns results.json's dict (also written, with the other two outputs)."""
    if not cfg.ckpt:
        raise ValueError("evaluate needs --ckpt")
    out = prepare_out(cfg.out)
    ttt_cfg = ttt_cfg if ttt_cfg is not None and ttt_cfg.enabled else None
    dev = pick_device(cfg.device)
    allocator = alloc.tune()  # before the first large tensor (arc/alloc.py)
    model, saved = load_model(cfg.ckpt, dev, cfg.which)
    dtype = resolve_dtype(solve_cfg.dtype, dev)  # decoding's; results.json's run records it
    ttt_dtype = None if ttt_cfg is None else resolve_dtype(ttt_cfg.dtype, dev)
    log.info("%s on %s; %s; %s; decoding in %s (--dtype %s)%s", saved["path"], dev, kernels.describe(), allocator,
             dtype, solve_cfg.dtype, "" if ttt_dtype is None else f", test-time training in {ttt_dtype}")
    selection = load_selection(cfg)
    tasks = selection.tasks
    seen = set(seen_in_training(tasks, saved))
    if seen:
        log.warning("%d of the %d evaluated tasks have the content of a task this checkpoint was trained on "
                    "(marked in results.json and the report): %s", len(seen), len(tasks), ", ".join(sorted(seen)[:20]))

    key = {"checkpoint_sha256": file_sha256(saved["path"]), "solve": asdict(solve_cfg),
           "ttt": None if ttt_cfg is None else asdict(ttt_cfg), "device": dev.type, "dtype": dtype, "ttt_dtype": ttt_dtype}
    journal = Journal(out, key, overwrite=cfg.overwrite)
    todo = [t for t in tasks if journal.finished(t) is None]
    if len(todo) < len(tasks):
        log.info("%s: %d of %d tasks already done; solving the other %d", journal.path, len(tasks) - len(todo),
                 len(tasks), len(todo))
    adapter = TaskFineTuner(model, ttt_cfg) if ttt_cfg is not None else None
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc="solve" if adapter is None else "ttt+solve",
               unit="task", dynamic_ncols=True, disable=not cfg.progress)
    try:
        size = solve_cfg.tasks_together(adapting=adapter is not None)  # each group is journaled once solved
        for start in range(0, len(todo), size):
            group = todo[start:start + size]
            for task, pred in zip(group, solve_tasks(model, group, solve_cfg, device=dev, progress=False, adapter=adapter)):
                assert pred.task_id == task.id
                journal.add({
                    "task_id": task.id, "fingerprint": data.task_fingerprint(task),
                    "entries": submission_of([pred])[task.id], "tests": [t.info for t in pred.tests],
                    "seconds": round(pred.seconds, 3), "generated_tokens": pred.generated_tokens, "timings": pred.timings,
                })
            bar.update(len(group))
    except KeyboardInterrupt:
        done = sum(journal.finished(t) is not None for t in tasks)
        log.warning("interrupted: %d of %d tasks done, kept in %s; run the same command to continue",
                    done, len(tasks), journal.path)
        raise
    finally:
        bar.close()

    records = [journal.finished(t) for t in tasks]
    submission = {r["task_id"]: r["entries"] for r in records}
    run = {
        "checkpoint": saved["path"], "checkpoint_step": saved.get("step"), "model_config": saved["model_config"],
        **_run_record(cfg, selection), "device": str(dev), "dtype": dtype, "ttt_dtype": ttt_dtype, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "settings": {"eval": asdict(cfg), "solve": asdict(solve_cfg), "ttt": None if ttt_cfg is None else asdict(ttt_cfg)},
        "seen_in_training": [t.id for t in tasks if t.id in seen],
        "seconds": round(sum(r["seconds"] for r in records), 3),
        "generated_tokens": sum(r["generated_tokens"] for r in records),
        "resumed_tasks": len(tasks) - len(todo),
        "by_select": candidates.by_select([r["tests"] for r in records]),
    }
    if solve_cfg.select != "vote":
        log.info("by selection rule: %s", "; ".join(f"{rule} {v['score']:.3f} ({v['tasks_solved']}/{v['tasks_scored']} tasks)"
                                                    for rule, v in run["by_select"].items() if v["score"] is not None))
    task_info = {r["task_id"]: {"seconds": r["seconds"], "generated_tokens": r["generated_tokens"],
                                "timings": r.get("timings", {}),
                                "seen_in_training": r["task_id"] in seen} for r in records}
    test_info = {r["task_id"]: r["tests"] for r in records}
    return write_outputs(out, tasks, submission, run=run, task_info=task_info, test_info=test_info,
                         report_limit=cfg.report_limit)


def score_file(cfg: EvalConfig) -> dict:
    """Score an existing submission.json (any solver's) and write the same three outputs."""
    if not cfg.submission:
        raise ValueError("score_file needs --submission")
    out = prepare_out(cfg.out)
    submission = load_submission(cfg.submission)
    selection = load_selection(cfg)
    run = {"submission": str(cfg.submission), **_run_record(cfg, selection), "settings": {"eval": asdict(cfg)}}
    return write_outputs(out, selection.tasks, submission, run=run, report_limit=cfg.report_limit)


def run(cfg: EvalConfig, solve_cfg: SolveConfig | None = None, ttt_cfg: TTTConfig | None = None) -> dict:
    """eval.py's work: score ``cfg.submission``, or evaluate ``cfg.ckpt``."""
    if cfg.submission:
        return score_file(cfg)
    return evaluate(cfg, solve_cfg if solve_cfg is not None else SolveConfig(seed=cfg.seed), ttt_cfg)
