"""Test-time training: built from demonstrations only, restores weights exactly, and learns."""
import torch

from arc.data import Pair, Task, load_tasks
from arc.model import HybridLM, preset
from arc.solve import SolveConfig
from arc.loss import loss_sum
from arc.ttt import TaskFineTuner, TTTConfig, solve_tasks_with_ttt, ttt_loader


def tiny():
    """The tiny test model, long enough for any ARC instance."""
    return preset("tiny", max_seq_len=4096)

CPU = torch.device("cpu")


def small_task() -> Task:
    return next(t for t in load_tasks("arc1", "eval") if max(p.input.size for p in t.train) <= 100 and len(t.train) >= 3)


def batches(task: Task, n: int = 4):
    loader = ttt_loader(task, TTTConfig(steps=n, batch_size=4))
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
    preds = solve_tasks_with_ttt(model, tasks, SolveConfig(views=1), TTTConfig(steps=2, batch_size=2), device=CPU,
                                 progress=False)
    assert len(preds) == 1 and preds[0].tests[0].info["adapt"]["steps"] == 2
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_one_ttt_step_reduces_the_loss_on_the_task_demonstrations():
    torch.manual_seed(0)
    model = HybridLM(tiny())
    task = small_task()
    cfg = TTTConfig(steps=1, batch_size=4, lr=3e-3, warmup=1)
    x, y, _ = ttt_loader(task, cfg).next_batch()  # the batch fit() will train on

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
    assert ttt_loader(single, TTTConfig()) is None
    model = HybridLM(tiny())
    preds = solve_tasks_with_ttt(model, [single], SolveConfig(views=1), TTTConfig(steps=2), device=CPU, progress=False)
    assert preds[0].tests[0].info["adapt"]["steps"] == 0
