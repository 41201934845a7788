"""bench/bench_learn.py's own logic: its arguments, and that a staged curriculum (``--first``)
trains on the first rules alone, then on the whole curriculum."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_learn  # noqa: E402  (bench/bench_learn.py)

from arc.model import ModelConfig, preset  # noqa: E402
from arc.synthetic import make_tasks  # noqa: E402
from arc.trainer import TrainConfig  # noqa: E402

RULES = ["flip_h", "flip_v", "rot90"]


def test_first_parses_rules_and_millions_and_refuses_what_is_not_in_the_curriculum():
    assert bench_learn.parse_first(None, RULES) is None
    assert bench_learn.parse_first("flip_h,flip_v@2.5", RULES) == (["flip_h", "flip_v"], 2.5)
    for bad in ("flip_h", "gravity@2", "flip_h@x", "flip_h@0", "@2"):
        with pytest.raises(SystemExit, match="--first"):
            bench_learn.parse_first(bad, RULES)


def test_arm_field_values_are_parsed_into_their_configs():
    name, model, train = bench_learn.parse_arm("d:rope=dihedral,n_head=8,augment=false,lr=0.001")
    assert (name, model, train) == ("d", {"rope": "dihedral", "n_head": 8}, {"augment": False, "lr": 0.001})
    with pytest.raises(SystemExit, match="not a ModelConfig or TrainConfig field"):
        bench_learn.parse_arm("d:nonsense=1")


def test_a_staged_curriculum_draws_the_first_rules_alone_until_its_budget(monkeypatch):
    """Every batch before the switch comes from flip_h tasks alone; after it, from all the rules (the
    probe batches that size the steps are drawn first, from all the rules, and are not counted)."""
    seen: list[tuple[int, set[str]]] = []  # (tokens so far, rules of the batch's loader)
    tokens = [0]
    train = TrainConfig(**{**bench_learn.BASE_TRAIN, "dtype": "float32", "augment": False, "batch_size": 4})

    class Recording(bench_learn.ArcDataLoader):  # knows the rules of the tasks it draws from
        def __init__(self, tasks, **kwargs):
            super().__init__(tasks, **kwargs)
            self.rules = {t.source.split(":", 1)[1] for t in tasks}

        def next_batch(self):
            batch = super().next_batch()
            if self.seed != train.seed:  # the probe that sizes the steps
                return batch
            seen.append((tokens[0], self.rules))
            tokens[0] += int((batch.x != bench_learn.PAD).sum())
            return batch

    monkeypatch.setattr(bench_learn, "ArcDataLoader", Recording)
    tasks = make_tasks(60, seed=3, rules=RULES)
    held = make_tasks(3, seed=4, rules=RULES)
    cfg = ModelConfig(**{**preset("tiny").to_dict(), "max_seq_len": 1024})
    pairs = bench_learn.held_out_pairs(held, cfg.max_seq_len)
    rows, _ = bench_learn.run_arm("t", cfg, train, tasks, pairs, [0.02], torch.device("cpu"), lambda m: None,
                                  (["flip_h"], 0.01))
    assert rows and rows[-1]["tokens"] >= 0.02e6
    before = [r for t, r in seen if t < 0.01e6]
    after = [r for t, r in seen if t >= 0.01e6]
    assert before and after
    assert set().union(*before) == {"flip_h"}
    assert set().union(*after) - {"flip_h"}


def test_plan_sets_the_schedule_without_training_past_the_last_budget(monkeypatch):
    """--plan M: the learning-rate schedule is planned for M million tokens (four times the steps here),
    while training stops at the largest budget, at the learning rate the longer run has there."""
    tasks = make_tasks(40, seed=3, rules=RULES)
    pairs = bench_learn.held_out_pairs(make_tasks(2, seed=4, rules=RULES), 1024)
    cfg = ModelConfig(**{**preset("tiny").to_dict(), "max_seq_len": 1024})
    train = TrainConfig(**{**bench_learn.BASE_TRAIN, "dtype": "float32", "augment": False, "batch_size": 4, "warmup": 2,
                                  "cooldown": 0.5})
    seen = []
    real_lr_at = bench_learn.lr_at
    monkeypatch.setattr(bench_learn, "lr_at", lambda step, c: seen.append((step, c.steps)) or real_lr_at(step, c))
    runs = {}
    for plan in (0.0, 0.04):
        seen.clear()
        rows, _ = bench_learn.run_arm("t", cfg, train, tasks, pairs, [0.01], torch.device("cpu"), lambda m: None, None, plan)
        runs[plan] = (rows[-1]["step"], seen[-1][1], real_lr_at(seen[-1][0], dataclasses.replace(train, steps=seen[-1][1])))
    (steps0, planned0, lr0), (steps1, planned1, lr1) = runs[0.0], runs[0.04]
    assert abs(steps1 - steps0) <= 1 and steps0 <= planned0  # both stop at the 0.01M budget
    assert planned1 >= 3.5 * planned0  # the schedule is planned for four times the tokens
    assert lr1 == train.lr > lr0  # still at the peak where the shorter plan has cooled down


def test_miss_kind_names_a_rotation_or_reflection_of_the_input_and_near_misses():
    import numpy as np
    grid = np.array([[1, 2, 3], [4, 5, 6]])
    truth = np.fliplr(grid)
    assert bench_learn.miss_kind(truth.copy(), grid, truth) == "right"
    assert bench_learn.miss_kind(grid.T.copy(), grid, truth) == "map transpose"
    assert bench_learn.miss_kind(np.rot90(grid), grid, truth) == "map rot90"
    assert bench_learn.miss_kind(grid.copy(), grid, truth) == "map identity"
    near = truth.copy()
    near[0, 0] = 9
    assert bench_learn.miss_kind(near, grid, truth) == "shape"
    assert bench_learn.miss_kind(np.zeros((3, 3), int), grid, truth) == "wrong shape"


def test_error_table_counts_each_kind_per_rule():
    import numpy as np

    from arc.data import Pair, Task
    from arc.solve import TaskPrediction, TestPrediction
    grid = np.array([[1, 2], [3, 4], [5, 6]])
    tasks = [Task(f"t{i}", (Pair(grid, np.flipud(grid)),), (Pair(grid, np.flipud(grid)),), source=f"synthetic:{rule}")
             for i, rule in enumerate(["flip_v", "flip_v", "flip_v", "rot90"])]
    near = np.flipud(grid).copy()
    near[0, 0] = 0  # 5 of 6 cells right
    answers = [np.flipud(grid), grid.copy(), near, np.zeros((1, 1), int)]  # grid: the input copied, the truth's shape
    preds = [TaskPrediction(t.id, [TestPrediction(a, a, {}, None)], 0.0, 0) for t, a in zip(tasks, answers)]
    table = bench_learn.error_table(tasks, preds)
    assert table[2] == "| flip_v | 3 | 1 | 1 (83%) | identity 1 | 0 |"  # the copy's cells not in the 83%
    assert table[3] == "| rot90 | 1 | 0 | 0 | - | 1 |"
