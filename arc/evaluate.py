"""Evaluation: load a checkpoint, solve a split, score it, and write the three outputs.

``OUTDIR/submission.json`` (Kaggle format), ``OUTDIR/results.json`` (score, counts, per-task
attempts, correctness, votes, malformed reasons, timings, checkpoint, config, settings) and
``OUTDIR/report.html`` (the visual report). ``score_file`` does the same for any existing
submission, without a model.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch

from arc import checkpoint, data, kernels
from arc.dist import pick_device
from arc.model import HybridLM, ModelConfig
from arc.report import build_results, write_report
from arc.score import atomic_write_text, load_submission, score_submission, write_submission
from arc.solve import SolveConfig, solve_tasks, submission_of
from arc.tokens import VOCAB_SIZE

log = logging.getLogger(__name__)


class IncompatibleCheckpoint(ValueError):
    """A checkpoint this code cannot run on ARC tasks (another vocabulary, other parameters)."""


def load_model(path: str | os.PathLike, device: torch.device, which: str = checkpoint.LATEST) -> tuple[HybridLM, dict]:
    """The model of a checkpoint file or run directory, on ``device``, in eval mode."""
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


def select_tasks(tasks: list[data.Task], ids: Sequence[str] | None, limit: int | None) -> list[data.Task]:
    """Tasks named by ``ids`` (in that order; unknown ids are an error), then the first ``limit``."""
    if ids:
        by_id = {t.id: t for t in tasks}
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise ValueError(f"--tasks: unknown task id(s) {', '.join(unknown)}")
        tasks = [by_id[i] for i in ids]
    return tasks[:limit] if limit is not None else tasks


def write_outputs(out: str | os.PathLike, tasks: Sequence[data.Task], submission: dict, votes: dict | None,
                  *, checkpoint_path: str, settings: dict, report_limit: int | None = None, **extra: Any) -> dict:
    """Score a submission against tasks and write submission.json, results.json and report.html."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = score_submission(submission, tasks)
    results = build_results(report, votes, checkpoint=checkpoint_path, settings=settings, **extra)
    write_submission(out / "submission.json", submission)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    write_report(out / "report.html", results, tasks, limit=report_limit)
    log.info("%s", report.summary())
    return results


def evaluate(
    ckpt: str,
    data_spec: str,
    split: str,
    out: str,
    solve_cfg: SolveConfig,
    *,
    device: str = "auto",
    limit: int | None = None,
    task_ids: Sequence[str] | None = None,
    which: str = checkpoint.LATEST,
    progress: bool = True,
    report_limit: int | None = None,
    ttt: Any = None,
) -> dict:
    """Solve and score a split with a checkpoint; returns the results dict (also written to ``out``)."""
    dev = pick_device(device)
    model, saved = load_model(ckpt, dev, which)
    log.info("%s on %s; %s", saved["path"], dev, kernels.describe())
    tasks = select_tasks(data.load_tasks(data_spec, split), task_ids, limit)
    t0 = time.time()
    if ttt is not None:
        from arc.ttt import solve_tasks_with_ttt

        preds = solve_tasks_with_ttt(model, tasks, solve_cfg, ttt, device=dev, progress=progress)
    else:
        preds = solve_tasks(model, tasks, solve_cfg, device=dev, progress=progress)
    seconds = time.time() - t0
    submission = submission_of(preds)
    votes = {p.task_id: [t.info for t in p.tests] for p in preds}
    settings = {"data": data_spec, "split": split, "device": str(dev), **asdict(solve_cfg),
                **({"ttt": asdict(ttt)} if ttt is not None else {})}
    return write_outputs(
        out, tasks, submission, votes, checkpoint_path=saved["path"], settings=settings, report_limit=report_limit,
        model_config=saved["model_config"], checkpoint_step=saved.get("step"), seconds=seconds,
        seconds_per_task={p.task_id: round(p.seconds, 3) for p in preds},
        generated_tokens=sum(p.generated_tokens for p in preds), machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
    )


def score_file(submission_path: str, data_spec: str, split: str, out: str, *,
               limit: int | None = None, task_ids: Sequence[str] | None = None) -> dict:
    """Score an existing submission.json (any solver's) and write the same three outputs."""
    submission = load_submission(submission_path)
    tasks = select_tasks(data.load_tasks(data_spec, split), task_ids, limit)
    return write_outputs(out, tasks, submission, None, checkpoint_path="", settings={
        "data": data_spec, "split": split, "submission": str(submission_path)})

