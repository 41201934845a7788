"""Training: the config, the data it names, the leakage guard, and the loop (one process or DDP).

``train(cfg, model_cfg)`` is what ``train.py`` calls; tests call it too. The loop reads top to
bottom: occasional validation / solve check, the optimizer step over accumulated micro-batches
(:func:`accumulate_gradients`), one log line, an occasional checkpoint.

The run directory: an ``--out`` holding a run is refused unless ``--resume`` (the same run: only
the fields in ``RESUME_MAY_CHANGE`` may differ; ``log.jsonl`` is cut back to the checkpoint) or
``--overwrite``; it is created or changed only once the data, model and checkpoint have been read.

Loss normalisation: every micro-batch contributes the *sum* of its target-token losses; after the
last micro-batch the gradients are divided by the number of target tokens of the whole optimizer
step over all ranks. So the update is the same whether a step's batches are split into
micro-batches, spread over ranks, or both.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch

from arc import alloc, checkpoint, data, files, kernels, sources
from arc.compiling import compile_model, compile_seconds
from arc.config import help_field, to_dict
from arc.dist import DistInfo, all_reduce_sum, barrier, destroy_distributed, init_distributed
from arc.loader import ArcDataLoader, Batch
from arc.loss import autocast_for, loss_sum, target_count
from arc.model import GRID_2D, HybridLM, ModelConfig
from arc.text import DEFAULT_ENCODING, TextLoader
from arc.tokens import PAD

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    # data
    data: str = help_field("arc1", "training sources, comma-separated (the same content is kept once): arc1, arc2, a task folder, a *_challenges.json, synthetic[:N tasks]; or text:FILE alone")
    split: str = help_field("train", "split of the ARC sources to train on: train or eval")
    eval_data: str = help_field("arc1", "the evaluation set this run is meant for: its tasks are never trained on (leakage guard)")
    eval_split: str = help_field("eval", "split of --eval_data")
    eval_demos: bool = help_field(False, "also train on the evaluation tasks' demonstration pairs, leave-one-out (never their test outputs)")
    overlap: Literal["drop", "refuse", "allow"] = help_field("drop", "training tasks whose content equals an evaluation task: drop them (listed in a warning), refuse to start, or allow (leaks the evaluation)")
    skip_bad: bool = help_field(False, "leave bad task files out (listed in a warning and in config.json) instead of stopping")
    val_fraction: float = help_field(0.05, "share of the training tasks held out for the validation loss (0: none)")
    targets: Literal["test", "outputs"] = help_field("outputs", "which output grids are trained on: the test output only, or every output after the first")
    augment: bool = help_field(True, "a fresh random rotation/reflection, colour permutation and demonstration order per instance")
    permute_background: bool = help_field(False, "colour permutations also move colour 0 (the usual background)")
    block_size: int = help_field(4096, "maximum sequence length in tokens")
    encoding: str = help_field(DEFAULT_ENCODING, "text path only: an offline tiktoken encoding name or a .tiktoken file")
    # batches and steps
    batch_size: int = help_field(8, "sequences per micro-batch (at most, with --max_tokens)")
    max_tokens: int | None = help_field(None, "cap on padded tokens (B x T) per micro-batch, to fit memory; None: no cap")
    grad_accum: int = help_field(1, "micro-batches per optimizer step (the most, when --tokens_per_step is set)")
    tokens_per_step: int = help_field(0, "accumulate micro-batches until this many real tokens over all ranks (0: use --grad_accum)")
    steps: int = help_field(2000, "optimizer steps")
    # optimizer
    lr: float = help_field(1e-3, "peak learning rate")
    min_lr_ratio: float = help_field(0.1, "final learning rate as a fraction of the peak")
    warmup: int = help_field(100, "linear warmup steps, then --schedule")
    schedule: Literal["cosine", "wsd"] = help_field("cosine", "after warmup: cosine decay to the end, or wsd (warmup-stable-decay): constant, then a linear cooldown over the last --cooldown of the steps")
    cooldown: float = help_field(0.2, "wsd only: share of the steps spent decaying to lr * min_lr_ratio")
    weight_decay: float = help_field(0.1, "AdamW weight decay on matrices (never on norms, biases, A_log, D, dt_bias)")
    beta1: float = help_field(0.9, "AdamW beta1")
    beta2: float = help_field(0.95, "AdamW beta2")
    grad_clip: float = help_field(1.0, "clip the gradient norm to this (0: off)")
    # system
    device: str = help_field("auto", "auto (CUDA if present, else CPU), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16"] = help_field("auto", "autocast dtype: auto is bfloat16 on CUDA; on a CPU, bfloat16 where a start-up probe measures its bf16 matmul clearly faster than float32 (arc/loss.py), else float32")
    compile: bool = help_field(False, "torch.compile the model (CPU too: the C++ Mamba2 ops are custom ops it traces, every dim "
                               "dynamic there; on a 2-core CPU 1.10-1.17x a step on fixed shapes after ~3 compiles of 35-100 s; "
                               "the cumulative compile time is logged as compile_s)")
    seed: int = help_field(1337, "seed of the weights, the held-out split and the data order")
    # run directory, logs, checkpoints
    out: str | None = help_field(None, "run directory (default: runs/<date-time>)")
    resume: bool = help_field(False, "continue the run in --out from its latest checkpoint (with the run's own flags; see RESUME_MAY_CHANGE)")
    overwrite: bool = help_field(False, "start afresh in an --out that already holds a run: its checkpoints and log are removed")
    log_every: int = help_field(10, "steps between log lines")
    val_every: int = help_field(100, "steps between validation losses (0: only at the end)")
    val_batches: int = help_field(16, "batches of held-out data per validation")
    solve_every: int = help_field(0, "steps between quick exact-match solve checks on held-out tasks (0: off)")
    solve_tasks: int = help_field(8, "held-out tasks in each solve check")
    save_every: int = help_field(100, "steps between checkpoints (the latest is always kept, plus the best by validation loss)")
    progress: bool = help_field(True, "show a progress bar")

    def __post_init__(self) -> None:
        checks = [  # (flag, valid, what a valid value is)
            ("steps", self.steps >= 1, ">= 1"), ("batch_size", self.batch_size >= 1, ">= 1"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, ">= 1 or None"),
            ("grad_accum", self.grad_accum >= 1, ">= 1"), ("tokens_per_step", self.tokens_per_step >= 0, ">= 0"),
            ("lr", self.lr > 0, "> 0"), ("warmup", self.warmup >= 0, ">= 0"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"), ("cooldown", 0 <= self.cooldown <= 1, "in [0, 1]"),
            ("schedule", self.schedule in ("cosine", "wsd"), "cosine or wsd"),
            ("val_fraction", 0 <= self.val_fraction < 1, "in [0, 1)"), ("block_size", self.block_size >= 64, ">= 64"),
            ("split", self.split in ("train", "eval"), "train or eval"),
            ("eval_split", self.eval_split in ("train", "eval"), "train or eval"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"), ("beta1", 0 <= self.beta1 < 1, "in [0, 1)"),
            ("beta2", 0 <= self.beta2 < 1, "in [0, 1)"), ("grad_clip", self.grad_clip >= 0, ">= 0"),
            ("log_every", self.log_every >= 1, ">= 1"), ("save_every", self.save_every >= 0, ">= 0"),
            ("val_every", self.val_every >= 0, ">= 0"), ("val_batches", self.val_batches >= 1, ">= 1"),
            ("solve_every", self.solve_every >= 0, ">= 0"), ("solve_tasks", self.solve_tasks >= 1, ">= 1"),
        ]
        for name, ok, valid in checks:
            if not ok:
                raise ValueError(f"--{name} must be {valid}, got {getattr(self, name)!r}")
        if self.resume and not self.out:
            raise ValueError("--resume needs --out, the run directory to continue")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other: continue the run in --out, or start it afresh")


# A resumed run is the first run's command plus --resume: these fields, and only these, may differ
# from the checkpoint's (where and how it runs, how long, the learning rate over that length, how a
# step gathers its micro-batches, what it logs and saves). Every other field (the data, the batches
# the loader's saved position indexes into, the seed, the optimizer settings its saved state
# carries, the validation set behind best.pt) and every model field must be the checkpoint's.
RESUME_MAY_CHANGE = frozenset({
    "out", "resume", "overwrite", "device", "dtype", "compile", "progress",
    "steps", "lr", "min_lr_ratio", "warmup", "schedule", "cooldown", "grad_clip", "grad_accum", "tokens_per_step",
    "log_every", "val_every", "solve_every", "solve_tasks", "save_every",
})
RUN_FILES = ("config.json", "log.jsonl", checkpoint.LATEST, checkpoint.BEST)  # what makes a folder a run


# A preset is a model preset, overrides of its fields, and training settings; flags given on the
# command line win over all three.
PRESETS: dict[str, tuple[str, dict, dict]] = {
    "smoke": ("tiny", dict(max_seq_len=4096, **GRID_2D), dict(steps=12, batch_size=4, max_tokens=8192, warmup=2, lr=3e-3, schedule="wsd", log_every=2, val_every=6,
                           val_batches=2, save_every=6, val_fraction=0.05)),
    "cpu": ("cpu", {}, dict(steps=1000, batch_size=16, max_tokens=8192, tokens_per_step=8192, grad_accum=8,
                        warmup=50, lr=2e-3, schedule="wsd")),
    "gpu": ("gpu", {}, dict(steps=20000, batch_size=16, max_tokens=65536, tokens_per_step=131072, grad_accum=16,
                        warmup=500, lr=6e-4, schedule="wsd", compile=True, val_every=500, save_every=500)),
}


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/inf; the run stops and its last good checkpoint is kept."""


class OverlapError(ValueError):
    """Training tasks equal evaluation tasks."""


class RunExistsError(ValueError):
    """--out already holds a run, and neither --resume nor --overwrite says what to do with it."""


# ---- data ---------------------------------------------------------------------------------------
@dataclass
class Data:
    train: ArcDataLoader | TextLoader
    val: list[Batch]  # fixed validation batches
    held_out: list[data.Task]  # held-out ARC tasks (for the solve check)
    vocab_size: int | None  # None: the ARC vocabulary; the text path sets its own
    train_fingerprints: list[str] = field(default_factory=list)  # sorted content hashes of the tasks trained on
    skipped: list[dict[str, str]] = field(default_factory=list)  # bad task files left out (--skip_bad)


def guard_overlap(train_tasks: list[data.Task], eval_tasks: list[data.Task], mode: str, eval_name: str) -> list[data.Task]:
    """Refuse, drop or allow training tasks whose content equals an evaluation task."""
    pairs = data.find_overlap(train_tasks, eval_tasks)
    if not pairs or mode == "allow":
        return train_tasks
    listing = ", ".join(f"{a} (= {b})" for a, b in pairs[:20]) + (f", ... ({len(pairs)} in all)" if len(pairs) > 20 else "")
    if mode == "refuse":
        raise OverlapError(
            f"{len(pairs)} training task(s) have the same content as tasks of {eval_name}: {listing}. "
            f"Training on them would leak the evaluation. Use --overlap drop to train without them, "
            f"or --overlap allow if you really mean it."
        )
    bad = {a for a, _ in pairs}
    log.warning("dropped %d training task(s) that are also in %s: %s", len(bad), eval_name, listing)
    return [t for t in train_tasks if t.id not in bad]


def split_held_out(tasks: list[data.Task], fraction: float, seed: int) -> tuple[list[data.Task], list[data.Task]]:
    """A deterministic held-out share of tasks (by seed), the rest for training."""
    if fraction <= 0:
        return tasks, []
    order = np.random.default_rng(seed).permutation(len(tasks))
    n = max(1, math.ceil(fraction * len(tasks)))
    held = set(order[:n].tolist())
    return [t for i, t in enumerate(tasks) if i not in held], [t for i, t in enumerate(tasks) if i in held]


def build_data(cfg: TrainConfig, info: DistInfo) -> Data:
    if sources.is_text(cfg.data):
        loader = TextLoader.from_file(sources.text_path(cfg.data), encoding=cfg.encoding, batch_size=cfg.batch_size,
                                      seq_len=cfg.block_size, rank=info.rank, world_size=info.world_size)
        from arc.text import get_encoding

        n_val = int(len(loader.tokens) * cfg.val_fraction)
        val: list[Batch] = []
        if n_val > cfg.block_size + 1:
            val_tokens = loader.tokens[-n_val:]
            loader.tokens = loader.tokens[:-n_val]
            T = cfg.block_size
            for i in range(min(cfg.val_batches, (n_val - 1) // T)):
                chunk = val_tokens[i * T : (i + 1) * T + 1]
                val.append(Batch(chunk[:-1].view(1, T), chunk[1:].view(1, T), None))
        return Data(loader, val, [], get_encoding(cfg.encoding).n_vocab)

    loaded = sources.load_tasks(cfg.data, cfg.split, seed=cfg.seed, skip_bad=cfg.skip_bad)
    eval_name = f"{cfg.eval_data} {cfg.eval_split}"
    eval_loaded = sources.load_tasks(cfg.eval_data, cfg.eval_split, seed=cfg.seed, skip_bad=cfg.skip_bad)
    eval_tasks = eval_loaded.tasks
    skipped = [{"task_id": b.task_id, "file": b.file, "reason": b.reason} for b in loaded.bad + eval_loaded.bad]
    tasks = guard_overlap(loaded.tasks, eval_tasks, cfg.overlap, eval_name)
    if loaded.tasks and not tasks:
        raise ValueError(f"--data {cfg.data} ({cfg.split}): every task is also in {eval_name}, so all were dropped "
                         f"(--overlap {cfg.overlap}); nothing is left to train on")
    train_tasks, held_out = split_held_out(tasks, cfg.val_fraction, cfg.seed)
    fingerprints = sorted(data.task_fingerprint(t) for t in train_tasks)
    if cfg.eval_demos:
        train_tasks = train_tasks + [t for task in eval_tasks for t in data.leave_one_out(task)]
    if held_out and not train_tasks:
        raise ValueError(f"--data {cfg.data} ({cfg.split}): all {len(tasks)} task(s) were held out for the validation "
                         f"loss by --val_fraction {cfg.val_fraction} (which holds out at least one task), so none is "
                         f"left to train on; give more tasks or pass --val_fraction 0")
    loader = ArcDataLoader(train_tasks, batch_size=cfg.batch_size, block_size=cfg.block_size, train=True,
                           augment=cfg.augment, permute_background=cfg.permute_background, targets=cfg.targets,
                           seed=cfg.seed, rank=info.rank, world_size=info.world_size, max_tokens=cfg.max_tokens)
    val = []
    if held_out:
        val_loader = ArcDataLoader(held_out, batch_size=cfg.batch_size, block_size=cfg.block_size, train=False,
                                   targets="test", max_tokens=cfg.max_tokens)
        val = [b for b, _ in zip(val_loader.epoch_batches(), range(cfg.val_batches))]
    return Data(loader, val, held_out, None, fingerprints, skipped)


# ---- optimisation -------------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then down to cfg.lr * cfg.min_lr_ratio at the last step: by a cosine
    (``cosine``), or held constant and decayed linearly over the last ``cooldown`` share of the steps
    (``wsd``, which keeps a run of any length learning at full rate until its end)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_steps = cfg.cooldown * cfg.steps
        into = step - (cfg.steps - decay_steps)  # steps into the cooldown (negative before it)
        return cfg.lr if into < 0 else cfg.lr - (cfg.lr - floor) * min(1.0, (into + 1) / max(decay_steps, 1))
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: HybridLM, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW (fused on CUDA) over the model's own decay / no-decay groups."""
    return torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda")


@torch.no_grad()
def validation_loss(model: HybridLM, batches: list[Batch], cfg: TrainConfig, device: torch.device) -> float:
    """Mean loss per target token over the fixed validation batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        x, y, pos = batch.to(device)
        with autocast_for(cfg.dtype, device):
            logits, _ = model(x, pos=pos)
        total += float(loss_sum(logits, y))
        count += target_count(y)
    model.train(was_training)
    return total / max(count, 1)


@dataclass
class StepTotals:
    """What one optimizer step's micro-batches added up to."""

    loss: float  # mean loss per target token, over the step's micro-batches on all ranks
    micro_batches: int  # on this rank
    real_tokens: float  # non-padding input tokens, all ranks
    padded_tokens: float  # input tokens with padding, all ranks


def accumulate_gradients(model: torch.nn.Module, raw_model: HybridLM, next_batch: Callable[[], Batch],
                         cfg: TrainConfig, info: DistInfo, *, arc_tokens: bool = True) -> StepTotals:
    """Forward and backward over one optimizer step's micro-batches: ``cfg.grad_accum`` of them, or
    fewer once ``cfg.tokens_per_step`` real tokens over all ranks are reached. Each micro-batch adds
    the *sum* of its target-token losses; at the end the gradients of ``raw_model`` are divided by
    the step's target count over all ranks, so they are those of the mean loss per target token of
    the whole step however it was split. ``model`` is ``raw_model`` or its DDP / compiled wrapper;
    ``arc_tokens``: real tokens are the non-PAD ones (False for text, where every token is real)."""
    device = info.device
    local_loss, local_targets, local_real, local_padded = 0.0, 0, 0, 0
    global_real, micro = 0.0, 0
    while True:
        x, y, pos = next_batch().to(device)  # (B, T), (B, T), (B, T, N_POS) or None
        micro += 1
        n_real = int((x != PAD).sum()) if arc_tokens else x.numel()
        if cfg.tokens_per_step:
            global_real += all_reduce_sum(n_real, info)
            last = global_real >= cfg.tokens_per_step or micro >= cfg.grad_accum
        else:
            last = micro >= cfg.grad_accum
        sync = contextlib.nullcontext() if last or not info.is_distributed else model.no_sync()
        with sync:
            with autocast_for(cfg.dtype, device):
                logits, _ = model(x, pos=pos)  # (B, T, V)
            batch_loss = loss_sum(logits, y)
            batch_loss.backward()
        local_loss += float(batch_loss.detach())
        local_targets += target_count(y)
        local_real += n_real
        local_padded += x.numel()
        if last:
            break
    targets = all_reduce_sum(local_targets, info)
    scale = info.world_size / max(targets, 1)  # DDP averaged the gradient sums over ranks
    for p in raw_model.parameters():
        if p.grad is not None:
            p.grad.mul_(scale)
    return StepTotals(all_reduce_sum(local_loss, info) / max(targets, 1), micro,
                      all_reduce_sum(local_real, info), all_reduce_sum(local_padded, info))


def memory_mb(device: torch.device) -> float:
    """Peak accelerator memory, or this process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---- the loop -----------------------------------------------------------------------------------
@dataclass
class TrainResult:
    run_dir: Path
    step: int  # optimizer steps done
    losses: list[float]  # training loss of every step run in this call
    val_loss: float | None
    model: HybridLM


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


# ---- the run directory: refuse to clobber, resume only the same run, a log without repeats ---------
def check_run_dir(run_dir: Path, cfg: TrainConfig) -> None:
    """Refuse an ``--out`` that holds a run unless ``--resume`` or ``--overwrite`` says what to do with it."""
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if found and not (cfg.resume or cfg.overwrite):
        raise RunExistsError(f"--out {run_dir} already holds a run ({', '.join(found)}); pass --resume to continue "
                             f"it or --overwrite to start afresh")


def clear_run(run_dir: Path) -> None:
    """--overwrite: remove a run's checkpoints, log and config (and leftovers of killed writes); other files stay."""
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
        files.clean_stale(run_dir / name)


def saved_train_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``train_config`` in today's fields. Older checkpoints: ``allow_overlap`` (removed;
    true meant ``--overlap allow``) is folded into ``overlap``, and fields added since take their
    defaults. A field this version does not know is an error that names it."""
    saved = dict(saved)
    if saved.pop("allow_overlap", False):
        saved["overlap"] = "allow"
    defaults = to_dict(TrainConfig())
    unknown = sorted(set(saved) - set(defaults))
    if unknown:
        raise ValueError(f"the checkpoint's training config has fields this version does not know: {', '.join(unknown)}")
    return {**defaults, **saved}


def resume_differences(ckpt: dict[str, Any], cfg: TrainConfig, model_cfg: ModelConfig, text: bool) -> list[str]:
    """The flags of this run that differ from the checkpoint's, outside RESUME_MAY_CHANGE, as
    ``--name <checkpoint's> in the checkpoint, <this run's> now``. The text path sets the vocabulary
    from its encoding (compared as --encoding), so --vocab_size is not compared there."""
    out = []
    now = to_dict(cfg)
    for name, old in saved_train_config(ckpt["train_config"]).items():
        if name not in RESUME_MAY_CHANGE and old != now[name]:
            out.append(f"--{name} {old!r} in the checkpoint, {now[name]!r} now")
    now_model = model_cfg.to_dict()
    for name, old in ModelConfig.from_dict(ckpt["model_config"]).to_dict().items():
        if old != now_model[name] and not (text and name == "vocab_size"):
            out.append(f"--{name} {old!r} in the checkpoint, {now_model[name]!r} now")
    return out


def truncate_log(path: Path, step: int) -> list[dict]:
    """Cut ``log.jsonl`` back to a checkpoint of ``step`` steps, so a resumed run logs each step once.

    A row ``{"step": s, ...}`` is step s (0-based) and, with ``val_loss``, the model after s steps.
    Kept: rows of steps before ``step``, and the closing validation at ``step`` (a row without
    ``loss``: the checkpoint's own model, which the resumed run does not validate again). Dropped:
    the rows of steps the resumed run does again, and a torn line (a kill mid-write). Returns the kept rows."""
    if not path.exists():
        return []
    kept, torn = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            torn += 1
            continue
        if row["step"] < step or (row["step"] == step and "loss" not in row):
            kept.append(row)
    files.atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in kept))
    if torn:
        log.warning("%s: dropped %d line(s) that are not log rows (a write cut short by a kill)", path, torn)
    return kept


def train(cfg: TrainConfig, model_cfg: ModelConfig, *, stop_after: int | None = None,
          on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train (or resume) a run; returns after ``cfg.steps`` steps, or early after ``stop_after``."""
    info = init_distributed(cfg.device)
    device = info.device
    run_dir = Path(cfg.out) if cfg.out else default_run_dir()
    check_run_dir(run_dir, cfg)
    barrier(info)  # every rank has looked at --out before the main rank changes it

    ckpt = None
    if cfg.resume:
        ckpt = checkpoint.load(run_dir, map_location="cpu")
        differences = resume_differences(ckpt, cfg, model_cfg, sources.is_text(cfg.data))
        if differences:
            may = ", ".join(f"--{name}" for name in sorted(RESUME_MAY_CHANGE - {"out", "resume", "overwrite"}))
            raise ValueError(f"--resume: {run_dir} was trained with other settings: {'; '.join(differences)}. "
                             f"Repeat the run's own flags; a resumed run may change only {may}")
        model_cfg = ModelConfig.from_dict(ckpt["model_config"])

    if cfg.block_size > model_cfg.max_seq_len:
        raise ValueError(f"--block_size {cfg.block_size} is longer than the model's --max_seq_len {model_cfg.max_seq_len}")
    torch.manual_seed(cfg.seed)
    allocator = alloc.tune()  # before the first large tensor (arc/alloc.py)
    bundle = build_data(cfg, info)
    if bundle.vocab_size is not None and bundle.vocab_size != model_cfg.vocab_size:
        model_cfg = replace(model_cfg, vocab_size=bundle.vocab_size)
    raw_model = HybridLM(model_cfg).to(device)
    optimizer = make_optimizer(raw_model, cfg, device)
    start_step, best_val = 0, math.inf
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        bundle.train.load_state_dict(ckpt["loader"])
        checkpoint.set_rng_state(ckpt["rng"])
        start_step, best_val = int(ckpt["step"]), float(ckpt["best_val"])
    model: torch.nn.Module = raw_model
    if cfg.compile:
        model = compile_model(model, device)
    if info.is_distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def save(name: str, step: int, val: float) -> None:
        if info.is_main:
            checkpoint.save_atomic({
                "model": raw_model.state_dict(), "model_config": model_cfg.to_dict(), "train_config": to_dict(cfg),
                "optimizer": optimizer.state_dict(), "step": step, "loader": bundle.train.state_dict(),
                "rng": checkpoint.rng_state(), "best_val": best_val, "val_loss": val,
                "train_fingerprints": bundle.train_fingerprints,
            }, run_dir / name)

    # The run directory is made (or cleared, or its log cut back) only now that the data, the model
    # and the checkpoint have all been read: a start that fails leaves no empty or half-cleared run.
    validated_at_start = False  # the kept log already holds the validation of the checkpoint's model
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite:
            clear_run(run_dir)
        if ckpt is not None:
            kept = truncate_log(run_dir / "log.jsonl", start_step)
            validated_at_start = any(r["step"] == start_step and "val_loss" in r for r in kept)
        files.atomic_write_text(run_dir / "config.json", json.dumps({
            "train": to_dict(cfg), "model": model_cfg.to_dict(), "params": raw_model.num_params(),
            "world_size": info.world_size, "skipped_bad": bundle.skipped}, indent=2))
        print(f"run {run_dir}: {raw_model.num_params() / 1e6:.2f}M parameters on {device} x{info.world_size}, "
              f"steps {start_step}->{cfg.steps}; {kernels.describe()}; {allocator}", file=sys.stderr)
    validated_at_start = bool(all_reduce_sum(float(validated_at_start), info))  # every rank validates, or none
    log_file = open(run_dir / "log.jsonl", "a") if info.is_main else None
    bar = None
    if info.is_main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc="train", dynamic_ncols=True, file=sys.stderr)

    losses: list[float] = []
    val = float(ckpt.get("val_loss", math.nan)) if ckpt is not None else math.nan
    t_start = time.time()
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    for step in range(start_step, end):
        row: dict = {"step": step}
        # -- occasional: validation loss (and best checkpoint), solve check ---------------------
        if (bundle.val and cfg.val_every and step > 0 and step % cfg.val_every == 0
                and not (step == start_step and validated_at_start)):
            val = validation_loss(raw_model, bundle.val, cfg, device)
            row["val_loss"] = val
            if val < best_val:
                best_val = val
                save(checkpoint.BEST, step, val)
        if cfg.solve_every and bundle.held_out and step > 0 and step % cfg.solve_every == 0 and info.is_main:
            row["solve_rate"] = quick_solve_rate(raw_model, bundle.held_out[: cfg.solve_tasks], device, cfg.dtype)

        # -- the optimizer step over accumulated micro-batches -----------------------------------
        t0 = time.time()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        totals = accumulate_gradients(model, raw_model, bundle.train.next_batch, cfg, info,
                                      arc_tokens=bundle.vocab_size is None)
        loss = totals.loss
        grad_norm = float(torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf))
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            if log_file:
                log_file.close()
            latest = run_dir / checkpoint.LATEST
            raise TrainingDiverged(f"step {step}: loss {loss}, gradient norm {grad_norm}; stopping. "
                                   + (f"The last good checkpoint {latest} is kept." if latest.exists() else "No checkpoint was saved yet."))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        losses.append(loss)
        if on_step:
            on_step(step, loss)

        # -- log line ---------------------------------------------------------------------------
        if info.is_main and (step % cfg.log_every == 0 or step == end - 1 or len(row) > 1):
            row.update(loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=totals.real_tokens / dt,
                       real_share=totals.real_tokens / totals.padded_tokens, micro_batches=totals.micro_batches,
                       memory_mb=memory_mb(device), elapsed=time.time() - t_start, epoch=bundle.train.epoch)
            if cfg.compile:  # cumulative: a new batch shape recompiles until torch marks the dims dynamic
                row["compile_s"] = round(compile_seconds(), 2)
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{totals.real_tokens / dt:,.0f}", **({"val": f"{val:.4f}"} if math.isfinite(val) else {}))
            bar.update(1)

        # -- checkpoint -------------------------------------------------------------------------
        done = step + 1
        if (cfg.save_every and done % cfg.save_every == 0) or done == end:
            save(checkpoint.LATEST, done, val)

    final_step = max(end, start_step)
    if bundle.val and final_step == cfg.steps and final_step > start_step:
        val = validation_loss(raw_model, bundle.val, cfg, device)
        if info.is_main:
            log_file.write(json.dumps({"step": final_step, "val_loss": val}) + "\n")
        if val < best_val:
            best_val = val
            save(checkpoint.BEST, final_step, val)
        save(checkpoint.LATEST, final_step, val)
    if bar is not None:
        bar.close()
    if log_file:
        log_file.close()
    barrier(info)
    return TrainResult(run_dir, final_step, losses, val if math.isfinite(val) else None, raw_model)


def quick_solve_rate(model: HybridLM, tasks: list[data.Task], device: torch.device, dtype: str = "auto") -> float:
    """Exact-match share of test outputs solved greedily on the original view (a cheap progress signal),
    decoded under ``dtype`` (the run's --dtype)."""
    from arc.solve import SolveConfig, solve_tasks

    results = solve_tasks(model, tasks, SolveConfig(views=1, dtype=dtype), device=device, progress=False)
    solved = [ok for r in results for ok in r.correct if ok is not None]
    return sum(solved) / max(len(solved), 1)


def run(cfg: TrainConfig, model_cfg: ModelConfig) -> TrainResult:
    """The entry point's call: train, then leave the process group."""
    try:
        return train(cfg, model_cfg)
    finally:
        destroy_distributed()
