"""Test-time training: built from demonstrations only, sized by the model, restores weights
exactly, and learns."""
import sys

import pytest
import torch

from arc.data import Pair, Task, leave_one_out, load_tasks
from arc.loss import loss_sum
from arc.model import HybridLM, preset
from arc.solve import SolveConfig, solve_tasks
from arc.tokens import DoesNotFit, encode_instance
from arc.ttt import TaskFineTuner, TTTConfig, ttt_loader


def tiny():
    """The tiny test model, long enough for any ARC instance."""
    return preset("tiny", max_seq_len=4096)

CPU = torch.device("cpu")


def small_task() -> Task:
    return next(t for t in load_tasks("arc1", "eval") if max(p.input.size for p in t.train) <= 100 and len(t.train) >= 3)


def batches(task: Task, n: int = 4):
    loader = ttt_loader(task, TTTConfig(ttt_steps=n, ttt_batch=4), block_size=4096)
    return [loader.next_batch() for _ in range(n)]


def test_test_outputs_do_not_change_what_ttt_trains_on():
    task = small_task()
    hidden = Task(task.id, task.train, tuple(Pair(p.input, None) for p in task.test))
    wrong = Task(task.id, task.train, tuple(Pair(p.input, (p.output + 1) % 10) for p in task.test))
    ref = batches(task)
    for other in (hidden, wrong):
        for a, b in zip(ref, batches(other)):
            assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_weights_are_restored_exactly_after_each_task():
    torch.manual_seed(0)
    model = HybridLM(tiny())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tasks = [small_task()]
    preds = solve_tasks(model, tasks, SolveConfig(views=1), device=CPU, progress=False,
                        adapter=TaskFineTuner(model, TTTConfig(ttt_steps=2, ttt_batch=2)))
    assert len(preds) == 1 and preds[0].tests[0].info["adapt"]["steps"] == 2
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_one_ttt_step_reduces_the_loss_on_the_task_demonstrations():
    torch.manual_seed(0)
    model = HybridLM(tiny())
    task = small_task()
    cfg = TTTConfig(ttt_steps=1, ttt_batch=4, ttt_lr=3e-3, ttt_warmup=1)
    x, y, _ = ttt_loader(task, cfg, block_size=4096).next_batch()  # the batch fit() will train on

    def loss() -> float:
        with torch.no_grad():
            logits, _ = model(x)
            return float(loss_sum(logits, y) / (y != -100).sum())

    before = loss()
    trainer = TaskFineTuner(model, cfg)
    trainer.fit(task, CPU)
    assert loss() < before
    trainer.restore()
    assert loss() == before


def test_a_single_demonstration_task_is_predicted_without_ttt():
    task = small_task()
    single = Task("one", task.train[:1], task.test)
    assert ttt_loader(single, TTTConfig(), block_size=4096) is None
    model = HybridLM(tiny())
    preds = solve_tasks(model, [single], SolveConfig(views=1), device=CPU, progress=False,
                        adapter=TaskFineTuner(model, TTTConfig(ttt_steps=2)))
    adapt = preds[0].tests[0].info["adapt"]
    assert adapt["steps"] == 0 and adapt["reason"] == "a single demonstration: nothing to leave out"


def _length(task: Task, block_size: int, transpose: bool) -> int | None:
    """Tokens of a leave-one-out task's instance (demonstrations dropped to fit), None if it cannot fit."""
    t = (lambda g: g.T) if transpose else (lambda g: g)
    demos = [(t(i), t(o)) for i, o in task.demos]
    try:
        return len(encode_instance(demos, t(task.test[0].input), t(task.test[0].output), block_size=block_size).ids)
    except DoesNotFit:
        return None


def long_task() -> Task:
    """An ARC-AGI-1 task whose leave-one-out instances need more than 1024 tokens with every
    demonstration, yet all fit 1024 (either orientation) once the longest ones are dropped."""
    for task in load_tasks("arc1", "eval"):
        loo = leave_one_out(task)
        if len(loo) >= 2 and max(_length(t, sys.maxsize, False) for t in loo) > 1024 and all(
                _length(t, 1024, tr) is not None for t in loo for tr in (False, True)):
            return task
    raise AssertionError("no ARC-AGI-1 eval task of that kind")


def test_ttt_takes_its_block_from_the_model():
    """A model of max_seq_len 1024: every fine-tuning sequence fits it (demonstrations dropped),
    where the old fixed 4096-token block handed the model sequences it cannot take."""
    task = long_task()
    torch.manual_seed(0)
    model = HybridLM(preset("tiny", max_seq_len=1024))
    cfg = TTTConfig(ttt_steps=3, ttt_batch=4)
    tuner = TaskFineTuner(model, cfg)
    assert tuner.block_size == 1024
    assert TaskFineTuner(model, TTTConfig(ttt_steps=1, ttt_block_size=600)).block_size == 600  # a smaller cap wins
    assert TaskFineTuner(model, TTTConfig(ttt_steps=1, ttt_block_size=8192)).block_size == 1024  # never above the model
    lengths = [x.shape[1] for x, _, _ in (ttt_loader(task, cfg, 1024).next_batch() for _ in range(6))]
    assert max(lengths) <= 1024
    unlimited = ttt_loader(task, cfg, 4096)
    assert max(unlimited.next_batch()[0].shape[1] for _ in range(6)) > 1024  # the task does need the dropping
    record = tuner.fit(task, CPU)
    assert record["steps"] == 3 and record["block_size"] == 1024 and record["first_loss"] > 0
    tuner.restore()


def test_a_task_that_cannot_fit_the_block_is_not_fine_tuned_and_says_why():
    task = small_task()
    model = HybridLM(preset("tiny", max_seq_len=4096))
    record = TaskFineTuner(model, TTTConfig(ttt_steps=2, ttt_block_size=20)).fit(task, CPU)
    assert record["steps"] == 0 and record["reason"] == "no leave-one-out instance fits the block of 20 tokens"


def test_fine_tuning_a_task_does_not_depend_on_what_ran_before():
    """Dropout draws from a per-task seed: fitting B after A equals fitting B alone (what makes a
    resumed evaluation equal an unbroken one)."""
    tasks = [t for t in load_tasks("arc1", "eval") if max(p.input.size for p in t.train) <= 100 and len(t.train) >= 3][:2]
    cfg = TTTConfig(ttt_steps=2, ttt_batch=2)

    def fitted_weights(sequence):
        torch.manual_seed(0)
        model = HybridLM(preset("tiny", max_seq_len=4096, dropout=0.2))
        tuner = TaskFineTuner(model, cfg)
        for task in sequence[:-1]:
            tuner.fit(task, CPU)
            tuner.restore()
        torch.manual_seed(123)  # whatever the global generator holds
        record = tuner.fit(sequence[-1], CPU)
        return record["last_loss"], [p.detach().clone() for p in model.parameters()]

    loss_alone, alone = fitted_weights([tasks[1]])
    loss_after, after = fitted_weights(tasks)
    assert loss_alone == loss_after
    assert all(torch.equal(a, b) for a, b in zip(alone, after))


@pytest.mark.parametrize("flags, message", [
    (dict(ttt_steps=-1), "--ttt_steps must be >= 0"), (dict(ttt_lr=0.0), "--ttt_lr must be a positive number"),
    (dict(ttt_lr=float("nan")), "--ttt_lr"), (dict(ttt_batch=0), "--ttt_batch must be >= 1"),
    (dict(ttt_block_size=0), "--ttt_block_size must be >= 1"), (dict(ttt_grad_clip=-1.0), "--ttt_grad_clip"),
])
def test_bad_ttt_settings_name_the_flag(flags, message):
    with pytest.raises(ValueError, match=message):
        TTTConfig(**flags)
    assert not TTTConfig().enabled and TTTConfig(ttt_steps=1).enabled
