"""eval.py end to end: train a smoke model, evaluate it, score submissions; cached decoding parity."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as eval_cli
from arc import checkpoint
from arc.data import load_tasks
from arc.evaluate import IncompatibleCheckpoint, load_model
from arc.model import HybridLM, preset
from arc.solve import decode, decode_uncached
from arc.tokens import encode_prompt


def tiny():
    """The tiny test model, long enough for any ARC instance."""
    return preset("tiny", max_seq_len=4096)

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """train.py --preset smoke --out DIR, exactly as a user runs it."""
    out = tmp_path_factory.mktemp("runs") / "smoke"
    subprocess.run([sys.executable, "train.py", "--preset", "smoke", "--out", str(out), "--progress", "false"],
                   check=True, cwd=ROOT, capture_output=True)
    return out


def test_smoke_checkpoint_then_eval_writes_all_three_outputs(smoke_run, tmp_path):
    out = tmp_path / "eval"
    rc = eval_cli.main(["--ckpt", str(smoke_run), "--data", "arc1", "--split", "eval", "--limit", "3",
                        "--views", "2", "--out", str(out), "--no_progress"])
    assert rc == 0
    sub = json.loads((out / "submission.json").read_text())
    tasks = load_tasks("arc1", "eval")[:3]
    assert list(sub) == [t.id for t in tasks]
    for t in tasks:
        assert len(sub[t.id]) == len(t.test)
        assert all(set(e) == {"attempt_1", "attempt_2"} for e in sub[t.id])
    results = json.loads((out / "results.json").read_text())
    assert results["tasks_scored"] == 3 and 0.0 <= results["score"] <= 1.0
    assert results["settings"]["views"] == 2 and results["model_config"]["d_model"] == tiny().d_model
    assert set(results["seconds_per_task"]) == {t.id for t in tasks}
    html = (out / "report.html").read_text()
    assert all(t.id in html for t in tasks)


def test_scoring_a_submission_of_the_true_outputs_gives_one_and_an_empty_one_zero(tmp_path):
    tasks = load_tasks("arc1", "eval")
    truth = {t.id: [{"attempt_1": p.output.tolist(), "attempt_2": [[0]]} for p in t.test] for t in tasks}
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    (tmp_path / "empty.json").write_text("{}")
    assert eval_cli.main(["--submission", str(tmp_path / "truth.json"), "--out", str(tmp_path / "a")]) == 0
    assert eval_cli.main(["--submission", str(tmp_path / "empty.json"), "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert a["score"] == 1.0 and a["tasks_solved"] == 400 and a["test_inputs"] == 419
    assert b["score"] == 0.0 and b["warnings"]


def test_checkpoint_of_another_vocabulary_fails_clearly(tmp_path):
    cfg = tiny().to_dict()
    cfg["vocab_size"] = 100277
    model = HybridLM(tiny())
    checkpoint.save_atomic({"model": model.state_dict(), "model_config": cfg}, tmp_path / "text.pt")
    with pytest.raises(IncompatibleCheckpoint, match="vocabulary of 100277"):
        load_model(tmp_path / "text.pt", CPU)
    assert eval_cli.main(["--ckpt", str(tmp_path / "text.pt"), "--out", str(tmp_path / "o")]) == 2


def test_a_missing_checkpoint_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no latest.pt"):
        load_model(tmp_path, CPU)


def test_cached_decoding_matches_recomputing_the_whole_sequence():
    torch.manual_seed(0)
    model = HybridLM(tiny()).eval()
    tasks = load_tasks("arc1", "eval")[:3]
    prompts = [encode_prompt(t.demos, t.test[0].input, block_size=2048) for t in tasks]
    fast = decode(model, prompts, CPU, max_new_tokens=40)
    slow = decode_uncached(model, prompts, CPU, max_new_tokens=40)
    for (ids_f, lp_f), (ids_s, lp_s) in zip(fast, slow):
        assert ids_f == ids_s
        assert lp_f == pytest.approx(lp_s, abs=1e-4)
