"""Test-time training: built from demonstrations only, sized by the model, restores weights
exactly, and learns."""
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from arc import ttt
from arc.data import Pair, Task, leave_one_out, load_tasks
from arc.loss import loss_sum, mean_loss
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


# ---- cheaper test-time training: what trains (--ttt_params) and the early stop (--ttt_check_every) ----
VARIANTS = [dict(ttt_params="all"), dict(ttt_params="lora", ttt_lora_rank=4), dict(ttt_params="lora", ttt_layers=2),
            dict(ttt_params="last", ttt_layers=1), dict(ttt_params="last", ttt_layers=3)]


def snapshot(model: torch.nn.Module) -> dict:
    """Everything restore must give back: every parameter and buffer (non-persistent ones too), their
    requires_grad flags, the state_dict's keys, and no forward hooks."""
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "buffers": {n: b.clone() for n, b in model.named_buffers()},
            "keys": list(model.state_dict()), "hooks": sum(len(m._forward_hooks) for m in model.modules())}


def assert_same(a: dict, b: dict) -> None:
    assert a["keys"] == b["keys"] and a["grad"] == b["grad"] and a["hooks"] == b["hooks"]
    assert all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"])
    assert all(torch.equal(a["buffers"][n], b["buffers"][n]) for n in a["buffers"])


def logits_of(model, task: Task) -> torch.Tensor:
    x, _, _ = ttt_loader(task, TTTConfig(ttt_batch=2), block_size=4096).next_batch()
    with torch.no_grad():
        return model.eval()(x)[0]


def test_lora_at_step_zero_is_the_base_model():
    torch.manual_seed(0)
    model, task = HybridLM(tiny()), small_task()
    base = logits_of(model, task)
    tuner = TaskFineTuner(model, TTTConfig(ttt_steps=0, ttt_params="lora"))
    tuner.fit(task, CPU)  # adapters drawn and attached, B = 0
    assert tuner.lora.attached
    assert torch.equal(logits_of(model, task), base)
    tuner.restore()


def test_lora_training_changes_the_outputs_not_the_base_weights():
    torch.manual_seed(0)
    model, task = HybridLM(tiny()), small_task()
    before, base = snapshot(model), logits_of(model, task)
    tuner = TaskFineTuner(model, TTTConfig(ttt_steps=3, ttt_batch=2, ttt_lr=1e-2, ttt_params="lora"))
    assert tuner.fit(task, CPU)["steps"] == 3
    assert not torch.allclose(logits_of(model, task), base)  # the adapters act, also on the solver's forward
    during = snapshot(model)
    assert during["hooks"] > 0
    during["hooks"] = before["hooks"]
    assert_same(before, during)  # base weights untouched; the state_dict has no adapter keys
    tuner.restore()
    assert_same(before, snapshot(model))
    assert torch.equal(logits_of(model, task), base)


@pytest.mark.parametrize("flags", VARIANTS, ids=lambda f: "-".join(map(str, f.values())))
@pytest.mark.parametrize("fail", [False, True], ids=["clean", "exception-in-fit"])
def test_restore_is_bit_exact_for_every_variant(flags, fail, monkeypatch):
    torch.manual_seed(0)
    model, task = HybridLM(tiny()), small_task()
    before = snapshot(model)
    tuner = TaskFineTuner(model, TTTConfig(ttt_steps=3, ttt_batch=2, ttt_lr=1e-2, ttt_check_every=2, **flags))
    if fail:  # the second step's loss raises, after one optimizer step has changed the weights
        calls = []

        def failing_loss(logits, y):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("boom")
            return mean_loss(logits, y)

        monkeypatch.setattr(ttt, "mean_loss", failing_loss)
        with pytest.raises(RuntimeError, match="boom"):
            tuner.fit(task, CPU)
    else:
        tuner.fit(task, CPU)
    tuner.restore()
    assert_same(before, snapshot(model))
    assert all(p.grad is None for p in list(model.parameters()) + tuner.trained)
    assert not tuner.optimizer.state


def test_the_optimizer_holds_only_the_trained_tensors():
    torch.manual_seed(0)
    task = small_task()
    for flags in VARIANTS:
        model = HybridLM(tiny())
        before = snapshot(model)
        tuner = TaskFineTuner(model, TTTConfig(ttt_steps=2, ttt_batch=2, ttt_lr=1e-2, **flags))
        held = {id(p) for g in tuner.optimizer.param_groups for p in g["params"]}
        own = {id(p): n for n, p in model.named_parameters()}
        if flags["ttt_params"] == "all":
            assert held == set(own)
        elif flags["ttt_params"] == "lora":
            assert not held & set(own) and held == {id(p) for p in tuner.lora.parameters()}
            n_blocks = flags.get("ttt_layers") or len(model.layers)
            assert len(tuner.lora.a) == n_blocks * 4  # mixer in/out projections, MLP fc1/fc2 per block
        else:
            first = len(model.layers) - flags["ttt_layers"]
            names = {own[i] for i in held}
            assert names == {n for n in own.values() if n.startswith("norm_f.") or
                             (n.startswith("layers.") and int(n.split(".")[1]) >= first)}
            assert "embedding.weight" not in names  # the tied head stays
        tuner.fit(task, CPU)
        after = {n: p for n, p in model.named_parameters()}
        for n, p in after.items():  # what is not held never moves; what is held does
            assert torch.equal(p, before["params"][n]) != (id(p) in held), n
        assert {n: p.requires_grad for n, p in after.items()} == before["grad"]  # flags given back after fit
        tuner.restore()


def test_early_stop_stops_at_the_first_check_that_solves_every_demonstration(monkeypatch):
    calls = []

    def forced(model, prompts, answers, device):
        calls.append(len(answers))
        return [SimpleNamespace(exact=len(calls) >= 3)] * len(answers)

    monkeypatch.setattr(ttt, "teacher_forced", forced)
    torch.manual_seed(0)
    model, task = HybridLM(tiny()), small_task()
    tuner = TaskFineTuner(model, TTTConfig(ttt_steps=20, ttt_batch=2, ttt_check_every=2))
    record = tuner.fit(task, CPU)
    tuner.restore()
    assert record["stop"] == "solved" and record["checks"] == 3 and record["steps"] == 4  # checked at steps 0, 2, 4
    assert calls == [len(task.train)] * 3  # every leave-one-out demonstration at once
    calls.clear()
    record = TaskFineTuner(model, TTTConfig(ttt_steps=3, ttt_batch=2)).fit(task, CPU)
    assert record["stop"] == "budget" and record["checks"] == 0 and record["steps"] == 3 and not calls


def identity_task(test_output) -> Task:
    """1x1 grids copied from input to output: a tiny model learns it in a few dozen steps."""
    g = lambda c: np.array([[c]])
    return Task("same", tuple(Pair(g(c), g(c)) for c in (1, 2, 3, 4)), (Pair(g(5), test_output),))


def test_early_stop_on_a_learnt_task_reads_only_the_demonstrations():
    """A tiny model fitted to a copy task stops once greedy decoding writes every leave-one-out
    answer (checked here by decoding them), and the test output (None, right or wrong) changes nothing."""
    cfg = TTTConfig(ttt_steps=300, ttt_batch=8, ttt_lr=1e-2, ttt_check_every=10)

    def fitted(test_output):
        torch.manual_seed(0)
        model = HybridLM(preset("tiny", max_seq_len=256))
        record = TaskFineTuner(model, cfg).fit(identity_task(test_output), CPU)
        return model, record, [p.detach().clone() for p in model.parameters()]

    model, record, weights = fitted(None)
    assert record["stop"] == "solved" and 0 < record["steps"] < 300 and record["steps"] % 10 == 0
    for loo in leave_one_out(identity_task(None)):
        pred = solve_tasks(model, [loo], SolveConfig(views=1), device=CPU, progress=False)[0]
        assert np.array_equal(pred.tests[0].attempt_1, loo.test[0].output)
    for other in (np.array([[5]]), np.array([[7, 7], [7, 7]])):
        _, other_record, other_weights = fitted(other)
        del other_record["seconds"]
        assert other_record == {k: v for k, v in record.items() if k != "seconds"}
        assert all(torch.equal(a, b) for a, b in zip(weights, other_weights))


@pytest.mark.parametrize("flags, message", [
    (dict(ttt_params="some"), "--ttt_params must be one of"),
    (dict(ttt_params="last"), "--ttt_params last needs --ttt_layers >= 1"),
    (dict(ttt_layers=2), "--ttt_layers applies to --ttt_params last or lora"),
    (dict(ttt_params="lora", ttt_layers=-1), "--ttt_layers must be >= 0"),
    (dict(ttt_lora_rank=0), "--ttt_lora_rank must be >= 1"), (dict(ttt_lora_alpha=float("inf")), "--ttt_lora_alpha"),
    (dict(ttt_check_every=-1), "--ttt_check_every must be >= 0"),
    (dict(ttt_compile=True, ttt_params="lora"), "--ttt_compile does not support --ttt_params lora"),
])
def test_bad_cheaper_ttt_settings_name_the_flag(flags, message):
    with pytest.raises(ValueError, match=message):
        TTTConfig(**flags)


def test_more_layers_than_the_model_has_is_an_error_naming_the_flag():
    model = HybridLM(tiny())
    for params in ("last", "lora"):
        with pytest.raises(ValueError, match="--ttt_layers 5 is more than the model's 4 blocks"):
            TaskFineTuner(model, TTTConfig(ttt_steps=1, ttt_params=params, ttt_layers=5))


def test_the_new_settings_are_eval_flags():
    import eval as eval_cli
    _, _, ttt_cfg = eval_cli.parse_args(["--ckpt", "c", "--out", "o", "--ttt_steps", "64", "--ttt_params", "lora",
                                         "--ttt_lora_rank", "8", "--ttt_check_every", "16"])
    assert (ttt_cfg.ttt_params, ttt_cfg.ttt_lora_rank, ttt_cfg.ttt_check_every) == ("lora", 8, 16)


@pytest.mark.slow
def test_compiled_fine_tuning_follows_eager_and_restores_the_weights():
    """--ttt_compile: the fine-tuning steps run through torch.compile (every dim dynamic on a CPU),
    lose as the eager steps do on the same batches, report the compiling, and leave the weights as
    they were; an eval flag, journaled."""
    torch.manual_seed(0)
    model = HybridLM(tiny())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = small_task()
    from arc.compiling import compile_seconds
    records, before_s = {}, compile_seconds()
    for compiled in (False, True):
        tuner = TaskFineTuner(model, TTTConfig(ttt_steps=3, ttt_batch=2, ttt_lr=3e-3, ttt_compile=compiled, dtype="float32"))
        assert (tuner.forward is model) != compiled
        records[compiled] = tuner.fit(task, CPU)
        tuner.restore()
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    eager, comp = records[False], records[True]
    assert comp["steps"] == eager["steps"] == 3 and "compile_s" not in eager
    assert comp["compile_s"] > before_s  # this fine-tuning compiled (the counter is the process's)
    assert eager["last_loss"] != pytest.approx(eager["first_loss"], rel=1e-3)  # the steps moved the weights
    assert comp["first_loss"] == pytest.approx(eager["first_loss"], rel=1e-4)
    assert comp["last_loss"] == pytest.approx(eager["last_loss"], rel=1e-3)
    import eval as eval_cli
    _, _, ttt_cfg = eval_cli.parse_args(["--ckpt", "c", "--out", "o", "--ttt_steps", "8", "--ttt_compile", "true"])
    assert ttt_cfg.ttt_compile is True
