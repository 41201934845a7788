"""ArcDataLoader: tasks in, padded (x, y) LongTensor batches out, forever.

Each epoch is a plan computed from ``(seed, epoch)`` alone: which instances (one per test pair
with a known output), in which order, under which augmentation, grouped into which batches, and
which rank gets which batch. Because the plan is a pure function of those numbers, the loader's
state is just ``(epoch, position)``: saving and restoring it replays exactly the batches an
unbroken run would see, on any number of ranks.

Batches are padded to their longest sequence rounded up to ``pad_multiple`` (never past the
block), and sequences of similar length are batched together, so most of each batch is real data.
The two baselines the benchmark compares against are options: ``bucket=False`` (random batches
padded to their longest) and ``pad_to_block=True`` (every sequence padded to the block, the seed).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch

from arc import augment
from arc.data import Task
from arc.tokens import BLOCK_SIZE, IGNORE_INDEX, N_POS, NO_GRID_POS, PAD, DoesNotFit, Encoded, Targets, encode_instance

log = logging.getLogger(__name__)


class Batch(NamedTuple):
    """One batch: inputs, targets and the inputs' 2D position channels (arc.tokens)."""

    x: torch.Tensor  # (B, T) ids, PAD-filled
    y: torch.Tensor  # (B, T) next ids on target positions, IGNORE_INDEX elsewhere
    pos: torch.Tensor | None  # (B, T, N_POS) each x token's 2D channels (arc.tokens: row, column, kind, offsets back to input cells); None for text

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.x.to(device), self.y.to(device), None if self.pos is None else self.pos.to(device))


@dataclass(frozen=True)
class Instance:
    """A test pair of a task, to be flattened with the task's demonstrations."""

    task: Task
    test_index: int


def instances_of(tasks: Sequence[Task]) -> list[Instance]:
    """One instance per test pair whose output is known (the only ones a model can train on)."""
    return [Instance(t, i) for t in tasks for i, p in enumerate(t.test) if p.output is not None]


class ArcDataLoader:
    """Yields :class:`Batch` ``(x, y, pos)``: (B, T), T <= block_size, x PAD-filled, y IGNORE_INDEX off
    target, pos the 2D position channels of x (B, T, N_POS).

    ``train=True``: shuffled every epoch, a fresh random augmentation per instance (``augment``),
    length-bucketed batches in random order. ``train=False``: fixed order (sorted by length, then
    by task id), no augmentation. The iterator never ends: an exhausted epoch is followed by the
    next one (new order, new augmentations) and ``epoch`` advances.

    With ``max_tokens`` set, a batch holds as many sequences as fit ``B * T <= max_tokens``
    (at most ``batch_size``), so short tasks come in large batches and long ones in small.
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        *,
        batch_size: int = 8,
        block_size: int = BLOCK_SIZE,
        train: bool = True,
        augment: bool | None = None,
        permute_background: bool = False,
        targets: Targets = "outputs",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_tokens: int | None = None,
        pad_multiple: int = 64,
        bucket: bool = True,
        pad_to_block: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if max_tokens is not None and max_tokens < block_size:
            raise ValueError(f"max_tokens ({max_tokens}) must be at least block_size ({block_size}) so every instance fits a batch")
        self.instances = instances_of(tasks)
        if not self.instances:
            raise ValueError("no instances: none of the tasks has a test pair with a known output")
        self.batch_size = batch_size
        self.block_size = block_size
        self.train = train
        self.augment = train if augment is None else augment
        self.permute_background = permute_background
        self.targets = targets
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.max_tokens = max_tokens
        self.pad_multiple = pad_multiple
        self.bucket = bucket
        self.pad_to_block = pad_to_block
        self.epoch = 0
        self.position = 0  # index of the next batch in this rank's share of the epoch
        self.skipped: list[tuple[str, str]] = []  # (task id, reason) of instances that cannot fit
        self._plan_epoch: int | None = None
        self._plan: list[list[Encoded]] = []

    # ---- the plan of one epoch -------------------------------------------------------------
    def _encode_epoch(self, rng: np.random.Generator) -> list[Encoded]:
        encoded = []
        skipped = []
        for inst in self.instances:
            task = inst.task
            if self.augment:
                t = augment.random_transform(rng, len(task.train), permute_background=self.permute_background)
                task = t.apply_task(task)
            test = task.test[inst.test_index]
            try:
                encoded.append(
                    encode_instance(task.demos, test.input, test.output, targets=self.targets, block_size=self.block_size)
                )
            except DoesNotFit as e:
                skipped.append((inst.task.id, str(e)))
        if skipped and not self.skipped:
            log.warning("%d instance(s) cannot fit block_size=%d and are skipped, e.g. %s: %s",
                        len(skipped), self.block_size, *skipped[0])
        self.skipped = skipped
        return encoded

    def _batches(self, encoded: list[Encoded], rng: np.random.Generator) -> list[list[Encoded]]:
        order = np.arange(len(encoded))
        if self.train:
            rng.shuffle(order)
        if self.bucket:
            # a stable sort keeps the shuffled order among equal lengths
            order = order[np.argsort([len(encoded[i].ids) for i in order], kind="stable")]
        batches: list[list[int]] = []
        current: list[int] = []
        for i in order:
            candidate = current + [i]
            too_many = len(candidate) > self.batch_size
            if self.max_tokens is not None and not too_many:
                too_many = len(candidate) * self._padded_length([encoded[j] for j in candidate]) > self.max_tokens
            if too_many:
                batches.append(current)
                candidate = [i]
            current = candidate
        if current:
            batches.append(current)
        if self.train:
            rng.shuffle(batches)  # type: ignore[arg-type]
        # every rank must take the same number of batches (DDP steps in lockstep): drop the tail
        usable = len(batches) - len(batches) % self.world_size
        if usable == 0:
            raise ValueError(f"{len(batches)} batch(es) per epoch cannot be shared by {self.world_size} ranks")
        return [[encoded[j] for j in b] for b in batches[self.rank:usable:self.world_size]]

    def _ensure_plan(self) -> None:
        if self._plan_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._plan = self._batches(self._encode_epoch(rng), rng)
            self._plan_epoch = self.epoch

    def _padded_length(self, batch: Sequence[Encoded]) -> int:
        """T of a batch: x is ids[:-1]."""
        if self.pad_to_block:
            return self.block_size
        longest = max(len(e.ids) for e in batch) - 1
        return min(-(-longest // self.pad_multiple) * self.pad_multiple, self.block_size)

    # ---- iteration -------------------------------------------------------------------------
    def batches_per_epoch(self) -> int:
        """Batches this rank sees in the current epoch."""
        self._ensure_plan()
        return len(self._plan)

    def next_batch(self) -> Batch:
        """The next batch; moves to a new epoch when this one is exhausted."""
        self._ensure_plan()
        if self.position >= len(self._plan):
            self.epoch += 1
            self.position = 0
            self._ensure_plan()
        batch = self._plan[self.position]
        self.position += 1
        return collate(batch, self._padded_length(batch))

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def epoch_batches(self) -> Iterator[Batch]:
        """The remaining batches of the current epoch, or all of the next one if the current one is
        used up: one full pass, for a validation set or a benchmark."""
        self._ensure_plan()
        if self.position >= len(self._plan):
            self.epoch += 1
            self.position = 0
            self._ensure_plan()
        while self.position < len(self._plan):
            yield self.next_batch()

    # ---- resumability ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(f"loader state was saved with seed {state.get('seed')}, this loader has seed {self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def collate(batch: Sequence[Encoded], length: int) -> Batch:
    """Stack encoded instances into a PAD/IGNORE-padded :class:`Batch` of length ``length``."""
    x = np.full((len(batch), length), PAD, dtype=np.int64)
    y = np.full((len(batch), length), IGNORE_INDEX, dtype=np.int64)
    pos = np.zeros((len(batch), length, N_POS), dtype=np.int64)
    pos[:] = NO_GRID_POS  # padding: no row, no column, no kind, nothing aligned
    for b, enc in enumerate(batch):
        xb, yb = enc.xy()
        x[b, : len(xb)] = xb
        y[b, : len(yb)] = yb
        pos[b, : len(xb)] = enc.x_pos()
    return Batch(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(pos))
