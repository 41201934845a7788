"""Test-time training: fit the model briefly to one task's own demonstrations, predict, restore.

For each task: leave-one-out tasks are made from its demonstrations alone (each demonstration in
turn is the test pair, the others its demonstrations; :func:`arc.data.leave_one_out`), and the
model is fine-tuned on random augmentations of them (rotations/reflections, colour permutations,
demonstration order) for ``ttt_steps`` steps. Then the task is solved with the usual voting and the
trained weights are copied back, exactly, before the next task. The task's test outputs are never
read: the fine-tuning data is built from ``task.train`` only, by construction.

What trains (``ttt_params``, :func:`trained_parameters`, :class:`LoRA`):

=========  ==========================================================================================
all        every weight (the original recipe)
lora       low-rank adapters ``W x + (alpha / r) B A x`` on every ``nn.Linear`` of the blocks (attention
           and Mamba2 ``in_proj``/``out_proj``, MLP ``fc1``/``fc2``), of the last ``ttt_layers`` blocks
           (0: all); ``B`` starts at zero, so step 0 is the base model. The adapters are forward hooks
           and tensors held here, never the model's own modules: its ``state_dict`` never sees them.
last       the last ``ttt_layers`` blocks and the final norm (and the output head when it is not tied
           to the embedding: a tied head is the input embedding, whose gradient would run back
           through every block). The backward pass stops at the first trained block.
=========  ==========================================================================================

Weights that do not train have ``requires_grad`` off during ``fit`` (so autograd skips them) and
the optimizer holds only the trained tensors. With ``ttt_check_every k``, every k steps one
teacher-forced pass (:func:`arc.solve.teacher_forced`) asks whether greedy decoding would already
write every un-augmented leave-one-out demonstration output exactly; fine-tuning stops when it would.

One optimizer serves every task; its moments are cleared between tasks, and the weights are
restored in place from one saved copy (no model is rebuilt or re-copied per step). Sequences are
at most the model's own ``max_seq_len`` (demonstrations dropped, longest first, to fit), and each
task draws its augmentations, dropout and adapter init from its own seed, so a task is fine-tuned
the same whatever ran before it. The solver uses a :class:`TaskFineTuner` as its ``adapter``
(:func:`arc.solve.solve_tasks`), which records ``fit``'s result under each test's ``"adapt"``.
"""
from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from arc import augment, data
from arc.compiling import compile_model, compile_seconds
from arc.config import help_field
from arc.loader import ArcDataLoader
from arc.loss import DTYPES, autocast_for, mean_loss
from arc.solve import teacher_forced
from arc.tokens import DoesNotFit, encode_instance, encode_prompt, grid_length

TTT_PARAMS = ("all", "lora", "last")


@dataclass(frozen=True)
class TTTConfig:
    """Test-time training; the field names are eval.py's flags (``--ttt_steps`` ...). ``seed`` is
    eval.py's one ``--seed``, ``dtype`` its one ``--dtype``."""

    ttt_steps: int = help_field(0, "fine-tuning steps on each task's own demonstrations before predicting it (0: off; "
                                   "at most this many with --ttt_check_every)")
    ttt_lr: float = help_field(3e-4, "test-time learning rate (constant after a short warmup); LoRA wants ~1e-3..3e-3")
    ttt_batch: int = help_field(8, "augmented leave-one-out sequences per test-time step")
    ttt_max_tokens: int = help_field(32768, "cap on padded tokens per test-time step (fits memory on long tasks)")
    ttt_warmup: int = help_field(4, "test-time warmup steps")
    ttt_weight_decay: float = help_field(0.0, "test-time AdamW weight decay")
    ttt_grad_clip: float = help_field(1.0, "test-time gradient norm clip (0: none)")
    ttt_block_size: int | None = help_field(None, "longest test-time sequence (none: the model's max_seq_len; "
                                                  "never more than it)")
    ttt_params: Literal["all", "lora", "last"] = help_field(
        "all", "what test-time training changes: all = every weight; lora = low-rank adapters on the blocks' Linear "
               "projections (attention/Mamba2 in_proj, out_proj, MLP fc1, fc2), removed on restore; last = the last "
               "--ttt_layers blocks + the final norm (+ the output head if untied)")
    ttt_layers: int = help_field(0, "--ttt_params last: how many blocks train, counted from the output (>= 1); "
                                    "lora: adapters on the last N blocks only (0: every block)")
    ttt_lora_rank: int = help_field(16, "--ttt_params lora: adapter rank r")
    ttt_lora_alpha: float = help_field(32.0, "--ttt_params lora: adapter scale alpha / r on B A x (B starts at zero, "
                                             "so step 0 is the base model)")
    ttt_check_every: int = help_field(0, "every N steps, stop if greedy decoding already writes every (un-augmented) "
                                         "leave-one-out demonstration output exactly, by one teacher-forced pass "
                                         "(0: never check, always run --ttt_steps)")
    ttt_compile: bool = help_field(False, "torch.compile the fine-tuning forward (every dim dynamic on a CPU); the "
                                          "first tasks pay the compiling (compile_s in each task's adapt record: "
                                          "torch's cumulative count, an upper bound); decoding stays eager")
    seed: int = help_field(0, "seed of the augmentations (each task gets its own stream from it)")
    dtype: Literal["auto", "float32", "bfloat16"] = help_field(
        "auto", "autocast dtype of the fine-tuning steps (arc.loss.autocast_for); eval.py's one --dtype sets it "
                "with decoding's")

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.ttt_params not in TTT_PARAMS:
            raise ValueError(f"--ttt_params must be one of {list(TTT_PARAMS)}, got {self.ttt_params!r}")
        checks = [
            (self.ttt_steps >= 0, "--ttt_steps must be >= 0 (0: no test-time training)", self.ttt_steps),
            (self.ttt_lr > 0 and math.isfinite(self.ttt_lr), "--ttt_lr must be a positive number", self.ttt_lr),
            (self.ttt_batch >= 1, "--ttt_batch must be >= 1", self.ttt_batch),
            (self.ttt_max_tokens >= 1, "--ttt_max_tokens must be >= 1", self.ttt_max_tokens),
            (self.ttt_warmup >= 0, "--ttt_warmup must be >= 0", self.ttt_warmup),
            (self.ttt_weight_decay >= 0, "--ttt_weight_decay must be >= 0", self.ttt_weight_decay),
            (self.ttt_grad_clip >= 0, "--ttt_grad_clip must be >= 0 (0: no clipping)", self.ttt_grad_clip),
            (self.ttt_block_size is None or self.ttt_block_size >= 1, "--ttt_block_size must be >= 1", self.ttt_block_size),
            (self.ttt_layers >= 0, "--ttt_layers must be >= 0", self.ttt_layers),
            (self.ttt_params != "last" or self.ttt_layers >= 1,
             "--ttt_params last needs --ttt_layers >= 1 (how many blocks train)", self.ttt_layers),
            (self.ttt_params != "all" or self.ttt_layers == 0,
             "--ttt_layers applies to --ttt_params last or lora, not all", self.ttt_layers),
            (self.ttt_lora_rank >= 1, "--ttt_lora_rank must be >= 1", self.ttt_lora_rank),
            (self.ttt_lora_alpha > 0 and math.isfinite(self.ttt_lora_alpha), "--ttt_lora_alpha must be a positive number",
             self.ttt_lora_alpha),
            (self.ttt_check_every >= 0, "--ttt_check_every must be >= 0 (0: no early stop)", self.ttt_check_every),
            (not (self.ttt_compile and self.ttt_params == "lora"),
             "--ttt_compile does not support --ttt_params lora (the adapters are forward hooks added and removed for "
             "every task, which the compiled graph would have to be traced again for); use --ttt_params all or last",
             self.ttt_params),
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


def fitting_leave_one_out(task: data.Task, block_size: int) -> list[data.Task]:
    """The task's leave-one-out tasks (demonstrations only) whose instance fits ``block_size`` under every view."""
    return [t for t in data.leave_one_out(task) if _fits_every_view(t, block_size)]


def ttt_loader(task: data.Task, cfg: TTTConfig, block_size: int) -> ArcDataLoader | None:
    """The fine-tuning batches of a task: augmented leave-one-out instances of its demonstrations,
    each at most ``block_size`` tokens (longest demonstrations dropped first).

    Repeats the leave-one-out tasks so every batch holds ``ttt_batch`` sequences, each under its
    own random augmentation. None when the task has fewer than two demonstrations, or when no
    leave-one-out instance fits the block under every view.
    """
    loo = fitting_leave_one_out(task, block_size)
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


def _blocks(model: torch.nn.Module, last: int) -> list[nn.Module]:
    """The last ``last`` blocks of the model (0: all of them)."""
    layers = list(model.layers)
    if last > len(layers):
        raise ValueError(f"--ttt_layers {last} is more than the model's {len(layers)} blocks")
    return layers[len(layers) - last:] if last else layers


class LoRA:
    """Low-rank adapters on some ``nn.Linear`` modules, added by forward hooks while attached:
    ``y = W x + scale * B (A x)``, A (r, in), B (out, r), ``scale = alpha / r``.

    The tensors live here, not in the model, so the model's ``state_dict``, ``parameters()`` and
    checkpoints never contain them. ``reset`` draws A (uniform in +-1/sqrt(in), as peft) from the
    global generator and zeroes B, so a freshly reset adapter leaves every output unchanged."""

    def __init__(self, linears: list[nn.Linear], rank: int, alpha: float) -> None:
        self.linears, self.rank, self.scale = linears, rank, alpha / rank
        self.a = [nn.Parameter(torch.zeros(rank, m.in_features, device=m.weight.device)) for m in linears]
        self.b = [nn.Parameter(torch.zeros(m.out_features, rank, device=m.weight.device)) for m in linears]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def parameters(self) -> list[nn.Parameter]:
        return self.a + self.b

    @torch.no_grad()
    def reset(self) -> None:
        for a, b in zip(self.a, self.b):
            bound = 1.0 / math.sqrt(a.shape[1])
            a.uniform_(-bound, bound)
            b.zero_()

    def attach(self) -> None:
        if self._handles:
            return
        for m, a, b in zip(self.linears, self.a, self.b):
            def hook(module: nn.Module, args: tuple, out: torch.Tensor, a: nn.Parameter = a, b: nn.Parameter = b):
                return out + F.linear(F.linear(args[0], a), b) * self.scale  # (..., out)
            self._handles.append(m.register_forward_hook(hook))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)


def trained_parameters(model: torch.nn.Module, cfg: TTTConfig) -> list[nn.Parameter]:
    """The model's own parameters that ``cfg.ttt_params`` trains (none for lora: its adapters train)."""
    if cfg.ttt_params == "all":
        return list(model.parameters())
    if cfg.ttt_params == "lora":
        _blocks(model, cfg.ttt_layers)  # checks the count
        return []
    chosen = [p for block in _blocks(model, cfg.ttt_layers) for p in block.parameters()] + list(model.norm_f.parameters())
    if model.lm_head.weight is not model.embedding.weight:
        chosen.append(model.lm_head.weight)
    return chosen


class TaskFineTuner:
    """Holds the saved weights and one optimizer over the trained tensors; ``fit`` a task, then ``restore``.

    Sequences are at most ``cfg.block_for(model)`` tokens: the model's own ``max_seq_len`` (or
    less), so a model trained with a short block is never handed a longer sequence."""

    def __init__(self, model: torch.nn.Module, cfg: TTTConfig):
        self.model, self.cfg = model, cfg
        self.block_size = cfg.block_for(model)
        self.saved = [p.detach().clone() for p in model.parameters()]
        self.lora: LoRA | None = None
        if cfg.ttt_params == "lora":
            linears = [m for block in _blocks(model, cfg.ttt_layers) for m in block.modules() if isinstance(m, nn.Linear)]
            self.lora = LoRA(linears, cfg.ttt_lora_rank, cfg.ttt_lora_alpha)
            self.trained = self.lora.parameters()
        else:
            self.trained = trained_parameters(model, cfg)
        self.optimizer = torch.optim.AdamW(self.trained, lr=cfg.ttt_lr, weight_decay=cfg.ttt_weight_decay,
                                           betas=(0.9, 0.95))
        self.forward = model  # what the fine-tuning steps call: the model, or its compiled wrapper (same weights)
        if cfg.ttt_compile:
            self.forward = compile_model(model, next(model.parameters()).device)

    def fit(self, task: data.Task, device: torch.device) -> dict:
        """Fine-tune on the task's demonstrations; returns steps run, why it stopped (``stop``:
        ``"budget"`` after all ``ttt_steps``, ``"solved"`` when a check found every leave-one-out
        demonstration solved), checks made, first and last loss, seconds, and the block. No steps
        (and a ``reason``) for a task with a single demonstration, or whose leave-one-out instances
        cannot fit the block."""
        t0 = time.time()
        loader = ttt_loader(task, self.cfg, self.block_size)
        if loader is None:
            reason = ("a single demonstration: nothing to leave out" if len(task.train) < 2
                      else f"no leave-one-out instance fits the block of {self.block_size} tokens")
            return {"steps": 0, "first_loss": None, "last_loss": None, "seconds": 0.0,
                    "block_size": self.block_size, "reason": reason}
        self.optimizer.state.clear()
        losses, checks, stop = [], 0, "budget"
        # only the trained tensors ask for gradients, so the backward pass skips the rest
        flags = [p.requires_grad for p in self.model.parameters()]
        trained_ids = {id(p) for p in self.trained}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in trained_ids)
        # dropout and the adapters' init draw from the global generator: seed it per task, so a
        # task's fine-tuning does not depend on the tasks before it (resumed evaluation = unbroken)
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(task_seed(task, self.cfg))
                if self.lora is not None:
                    self.lora.reset()
                    self.lora.attach()
                check = self._demonstration_check(task, device) if self.cfg.ttt_check_every else None
                for step in range(self.cfg.ttt_steps):
                    if check is not None and step % self.cfg.ttt_check_every == 0:
                        checks += 1
                        if check():
                            stop = "solved"
                            break
                    self.model.train()
                    for g in self.optimizer.param_groups:
                        g["lr"] = self.cfg.ttt_lr * min(1.0, (step + 1) / max(1, self.cfg.ttt_warmup))
                    x, y, pos = loader.next_batch().to(device)  # (B, T), (B, T), (B, T, N_POS); T <= block_size
                    with autocast_for(self.cfg.dtype, device):
                        logits, _ = self.forward(x, pos=pos)  # (B, T, V)
                    loss = mean_loss(logits, y)
                    loss.backward()
                    if self.cfg.ttt_grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(self.trained, self.cfg.ttt_grad_clip)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    losses.append(float(loss.detach()))
        finally:
            for p, flag in zip(self.model.parameters(), flags):
                p.requires_grad_(flag)
            self.model.eval()
        record = {"steps": len(losses), "stop": stop, "checks": checks, "first_loss": losses[0] if losses else None,
                  "last_loss": losses[-1] if losses else None, "seconds": round(time.time() - t0, 3),
                  "block_size": self.block_size}
        if self.cfg.ttt_compile:  # cumulative over the process: the first tasks compile, later ones reuse
            record["compile_s"] = round(compile_seconds(), 2)
        return record

    def _demonstration_check(self, task: data.Task, device: torch.device):
        """A function telling whether greedy decoding (the solver's prompt, grammar mask and budget)
        would write every leave-one-out demonstration's output exactly, un-augmented: one
        teacher-forced pass. Reads ``task.train`` only."""
        prompts, answers = [], []
        for t in fitting_leave_one_out(task, self.block_size):
            pair = t.test[0]
            answer_tokens = grid_length(pair.output.shape) + 1  # the grid and EOO
            try:
                prompt = encode_prompt(t.demos, pair.input, block_size=self.block_size)
                if len(prompt.ids) + answer_tokens > self.block_size:
                    raise DoesNotFit("no room for the answer")
            except DoesNotFit:
                prompt = encode_instance(t.demos, pair.input, None, block_size=self.block_size, answer_room=answer_tokens)
            prompts.append(prompt)
            answers.append(pair.output)

        def check() -> bool:
            self.model.eval()
            with autocast_for(self.cfg.dtype, device):
                return all(f.exact for f in teacher_forced(self.model, prompts, answers, device))

        return check

    @torch.no_grad()
    def restore(self) -> None:
        """Remove the adapters and copy the saved weights back, bit for bit; drop any gradient a
        failed step left behind (the next task's first step must not add to it)."""
        if self.lora is not None:
            self.lora.detach()
        for p, saved in zip(self.model.parameters(), self.saved):
            p.copy_(saved)
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.state.clear()
