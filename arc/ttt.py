"""Test-time training: fit the model briefly to one task's own demonstrations, predict, restore.

For each task: leave-one-out tasks are made from its demonstrations alone (each demonstration in
turn is the test pair, the others its demonstrations; :func:`arc.data.leave_one_out`), and the
model is fine-tuned on random augmentations of them (rotations/reflections, colour permutations,
demonstration order) for ``steps`` steps. Then the task is solved with the usual voting and the
trained weights are copied back, exactly, before the next task. The task's test outputs are never
read: the fine-tuning data is built from ``task.train`` only, by construction.

One optimizer serves every task; its moments are cleared between tasks, and the weights are
restored in place from one saved copy (no model is rebuilt or re-copied per step).
"""
from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass
from typing import Sequence

import torch

from arc import data
from arc.loader import ArcDataLoader
from arc.solve import SolveConfig, TaskPrediction, solve_tasks
from arc.tokens import BLOCK_SIZE
from arc.loss import autocast_for, mean_loss


@dataclass(frozen=True)
class TTTConfig:
    steps: int = 32  # optimizer steps per task
    lr: float = 3e-4  # constant learning rate (after a short warmup)
    batch_size: int = 8  # augmented leave-one-out sequences per step
    max_tokens: int = 32768  # cap on padded tokens per step (fits memory on long tasks)
    warmup: int = 4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.batch_size < 1:
            raise ValueError(f"--ttt_steps, --ttt_lr and --ttt_batch must be positive, got {self.steps}, {self.lr}, {self.batch_size}")


def ttt_loader(task: data.Task, cfg: TTTConfig, block_size: int = BLOCK_SIZE) -> ArcDataLoader | None:
    """The fine-tuning batches of a task: augmented leave-one-out instances of its demonstrations.

    Repeats the leave-one-out tasks so every batch holds ``batch_size`` sequences, each under its
    own random augmentation. None when the task has fewer than two demonstrations.
    """
    loo = data.leave_one_out(task)
    if not loo:
        return None
    copies = math.ceil(cfg.batch_size / len(loo))
    pool = [data.Task(f"{t.id}-{c}", t.train, t.test, t.source) for c in range(copies) for t in loo]
    seed = cfg.seed * 1_000_003 + zlib.crc32(task.id.encode())  # a different stream per task, stable across runs
    return ArcDataLoader(pool, batch_size=cfg.batch_size, block_size=block_size, train=True, augment=True,
                         targets="outputs", seed=seed, max_tokens=max(cfg.max_tokens, block_size))


class TaskFineTuner:
    """Holds the trained weights and one optimizer; ``fit`` a task, then ``restore``."""

    def __init__(self, model: torch.nn.Module, cfg: TTTConfig):
        self.model, self.cfg = model, cfg
        self.saved = [p.detach().clone() for p in model.parameters()]
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           betas=(0.9, 0.95))

    def fit(self, task: data.Task, device: torch.device) -> dict:
        """Fine-tune on the task's demonstrations; returns steps run, first and last loss, seconds
        (no steps for a task with a single demonstration)."""
        t0 = time.time()
        loader = ttt_loader(task, self.cfg)
        if loader is None:
            return {"steps": 0, "first_loss": None, "last_loss": None, "seconds": 0.0}
        self.optimizer.state.clear()
        self.model.train()
        losses = []
        for step in range(self.cfg.steps):
            for g in self.optimizer.param_groups:
                g["lr"] = self.cfg.lr * min(1.0, (step + 1) / max(1, self.cfg.warmup))
            x, y, pos = loader.next_batch().to(device)  # (B, T), (B, T), (B, T, N_POS)
            with autocast_for("auto", device):
                logits, _ = self.model(x, pos=pos)  # (B, T, V)
            loss = mean_loss(logits, y)
            loss.backward()
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        self.model.eval()
        return {"steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1],
                "seconds": round(time.time() - t0, 3)}

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the trained weights back, bit for bit."""
        for p, saved in zip(self.model.parameters(), self.saved):
            p.copy_(saved)
        self.optimizer.state.clear()


def solve_tasks_with_ttt(model: torch.nn.Module, tasks: Sequence[data.Task], solve_cfg: SolveConfig, cfg: TTTConfig,
                         *, device: torch.device, progress: bool = True) -> list[TaskPrediction]:
    """For each task: fine-tune on its demonstrations, predict its test outputs, restore the weights.
    Each test's info records the fine-tuning under ``"adapt"``."""
    return solve_tasks(model, tasks, solve_cfg, device=device, progress=progress, adapter=TaskFineTuner(model, cfg))
