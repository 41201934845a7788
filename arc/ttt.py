"""Test-time training: fit the model briefly to one task's own demonstrations, predict, restore.

For each task: leave-one-out tasks are made from its demonstrations alone (each demonstration in
turn is the test pair, the others its demonstrations; :func:`arc.data.leave_one_out`), and the
model is fine-tuned on random augmentations of them (rotations/reflections, colour permutations,
demonstration order) for ``ttt_steps`` steps. Then the task is solved with the usual voting and the
trained weights are copied back, exactly, before the next task. The task's test outputs are never
read: the fine-tuning data is built from ``task.train`` only, by construction.

One optimizer serves every task; its moments are cleared between tasks, and the weights are
restored in place from one saved copy (no model is rebuilt or re-copied per step). Sequences are
at most the model's own ``max_seq_len`` (demonstrations dropped, longest first, to fit), and each
task draws its augmentations and dropout from its own seed, so a task is fine-tuned the same
whatever ran before it. The solver uses a :class:`TaskFineTuner` as its ``adapter``
(:func:`arc.solve.solve_tasks`), which records ``fit``'s result under each test's ``"adapt"``.
"""
from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass
from typing import Literal

import torch

from arc import augment, data
from arc.config import help_field
from arc.loader import ArcDataLoader
from arc.loss import DTYPES, autocast_for, mean_loss
from arc.tokens import DoesNotFit, encode_instance


@dataclass(frozen=True)
class TTTConfig:
    """Test-time training; the field names are eval.py's flags (``--ttt_steps`` ...). ``seed`` is
    eval.py's one ``--seed``, ``dtype`` its one ``--dtype``."""

    ttt_steps: int = help_field(0, "fine-tuning steps on each task's own demonstrations before predicting it (0: off)")
    ttt_lr: float = help_field(3e-4, "test-time learning rate (constant after a short warmup)")
    ttt_batch: int = help_field(8, "augmented leave-one-out sequences per test-time step")
    ttt_max_tokens: int = help_field(32768, "cap on padded tokens per test-time step (fits memory on long tasks)")
    ttt_warmup: int = help_field(4, "test-time warmup steps")
    ttt_weight_decay: float = help_field(0.0, "test-time AdamW weight decay")
    ttt_grad_clip: float = help_field(1.0, "test-time gradient norm clip (0: none)")
    ttt_block_size: int | None = help_field(None, "longest test-time sequence (none: the model's max_seq_len; "
                                                  "never more than it)")
    seed: int = help_field(0, "seed of the augmentations (each task gets its own stream from it)")
    dtype: Literal["auto", "float32", "bfloat16"] = help_field(
        "auto", "autocast dtype of the fine-tuning steps (arc.loss.autocast_for); eval.py's one --dtype sets it "
                "with decoding's")

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        checks = [
            (self.ttt_steps >= 0, "--ttt_steps must be >= 0 (0: no test-time training)", self.ttt_steps),
            (self.ttt_lr > 0 and math.isfinite(self.ttt_lr), "--ttt_lr must be a positive number", self.ttt_lr),
            (self.ttt_batch >= 1, "--ttt_batch must be >= 1", self.ttt_batch),
            (self.ttt_max_tokens >= 1, "--ttt_max_tokens must be >= 1", self.ttt_max_tokens),
            (self.ttt_warmup >= 0, "--ttt_warmup must be >= 0", self.ttt_warmup),
            (self.ttt_weight_decay >= 0, "--ttt_weight_decay must be >= 0", self.ttt_weight_decay),
            (self.ttt_grad_clip >= 0, "--ttt_grad_clip must be >= 0 (0: no clipping)", self.ttt_grad_clip),
            (self.ttt_block_size is None or self.ttt_block_size >= 1, "--ttt_block_size must be >= 1", self.ttt_block_size),
        ]
        for ok, what, value in checks:
            if not ok:
                raise ValueError(f"{what}, got {value}")

    @property
    def enabled(self) -> bool:
        return self.ttt_steps > 0

    def block_for(self, model: torch.nn.Module) -> int:
        """The longest sequence test-time training builds for ``model``: its ``cfg.max_seq_len``,
        or ``ttt_block_size`` when that is smaller."""
        limit = int(model.cfg.max_seq_len)
        return limit if self.ttt_block_size is None else min(limit, self.ttt_block_size)


def _fits_every_view(task: data.Task, block_size: int) -> bool:
    """Whether the task's test instance fits ``block_size`` (dropping demonstrations if need be) in
    both orientations: a transposing view changes a grid's length (rows + row ends)."""
    for view in (augment.Transform(0), augment.Transform(1)):
        seen = view.apply_task(task)
        try:
            encode_instance(seen.demos, seen.test[0].input, seen.test[0].output, block_size=block_size)
        except DoesNotFit:
            return False
    return True


def ttt_loader(task: data.Task, cfg: TTTConfig, block_size: int) -> ArcDataLoader | None:
    """The fine-tuning batches of a task: augmented leave-one-out instances of its demonstrations,
    each at most ``block_size`` tokens (longest demonstrations dropped first).

    Repeats the leave-one-out tasks so every batch holds ``ttt_batch`` sequences, each under its
    own random augmentation. None when the task has fewer than two demonstrations, or when no
    leave-one-out instance fits the block under every view.
    """
    loo = [t for t in data.leave_one_out(task) if _fits_every_view(t, block_size)]
    if not loo:
        return None
    copies = math.ceil(cfg.ttt_batch / len(loo))
    pool = [data.Task(f"{t.id}-{c}", t.train, t.test, t.source) for c in range(copies) for t in loo]
    return ArcDataLoader(pool, batch_size=cfg.ttt_batch, block_size=block_size, train=True, augment=True,
                         targets="outputs", seed=task_seed(task, cfg), max_tokens=max(cfg.ttt_max_tokens, block_size))


def task_seed(task: data.Task, cfg: TTTConfig) -> int:
    """A different random stream per task, the same on every run and whatever tasks came before
    (so a resumed evaluation fine-tunes exactly as an unbroken one)."""
    return cfg.seed * 1_000_003 + zlib.crc32(task.id.encode())


class TaskFineTuner:
    """Holds the trained weights and one optimizer; ``fit`` a task, then ``restore``.

    Sequences are at most ``cfg.block_for(model)`` tokens: the model's own ``max_seq_len`` (or
    less), so a model trained with a short block is never handed a longer sequence."""

    def __init__(self, model: torch.nn.Module, cfg: TTTConfig):
        self.model, self.cfg = model, cfg
        self.block_size = cfg.block_for(model)
        self.saved = [p.detach().clone() for p in model.parameters()]
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.ttt_lr, weight_decay=cfg.ttt_weight_decay,
                                           betas=(0.9, 0.95))

    def fit(self, task: data.Task, device: torch.device) -> dict:
        """Fine-tune on the task's demonstrations; returns steps run, first and last loss, seconds,
        and the block. No steps (and a ``reason``) for a task with a single demonstration, or
        whose leave-one-out instances cannot fit the block."""
        t0 = time.time()
        loader = ttt_loader(task, self.cfg, self.block_size)
        if loader is None:
            reason = ("a single demonstration: nothing to leave out" if len(task.train) < 2
                      else f"no leave-one-out instance fits the block of {self.block_size} tokens")
            return {"steps": 0, "first_loss": None, "last_loss": None, "seconds": 0.0,
                    "block_size": self.block_size, "reason": reason}
        self.optimizer.state.clear()
        self.model.train()
        losses = []
        # dropout draws from the global generator: seed it per task, so a task's fine-tuning does
        # not depend on the tasks before it (a resumed evaluation equals an unbroken one)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(task_seed(task, self.cfg))
            for step in range(self.cfg.ttt_steps):
                for g in self.optimizer.param_groups:
                    g["lr"] = self.cfg.ttt_lr * min(1.0, (step + 1) / max(1, self.cfg.ttt_warmup))
                x, y, pos = loader.next_batch().to(device)  # (B, T), (B, T), (B, T, N_POS); T <= block_size
                with autocast_for(self.cfg.dtype, device):
                    logits, _ = self.model(x, pos=pos)  # (B, T, V)
                loss = mean_loss(logits, y)
                loss.backward()
                if self.cfg.ttt_grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.ttt_grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
        self.model.eval()
        return {"steps": len(losses), "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None, "seconds": round(time.time() - t0, 3),
                "block_size": self.block_size}

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the trained weights back, bit for bit."""
        for p, saved in zip(self.model.parameters(), self.saved):
            p.copy_(saved)
        self.optimizer.state.clear()
