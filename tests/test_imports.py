"""The import graph of evaluation: it never loads the training loop, and scoring never loads a model.

Each check runs in a fresh interpreter, so what other tests imported cannot hide a dependency.
"""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINING_ONLY = {"arc.trainer", "arc.text", "arc.synthetic", "arc.plot", "tiktoken"}  # loop, text path, generators


def modules_after(statement: str) -> set[str]:
    """The modules loaded by ``statement`` in a new interpreter run from the repository root."""
    code = f"import sys, json; sys.path.insert(0, '.'); {statement}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_evaluation_does_not_import_the_training_stack():
    loaded = modules_after("import eval, arc.evaluate, arc.ttt")
    assert {"arc.evaluate", "arc.ttt", "arc.solve", "arc.model", "arc.score", "arc.report"} <= loaded
    assert not loaded & TRAINING_ONLY, sorted(loaded & TRAINING_ONLY)


def test_the_probe_sees_what_training_and_synthetic_data_load():
    """The checks here can fail: the same probe finds the training modules where they are used."""
    assert {"arc.trainer", "arc.text"} <= modules_after("import arc.trainer")
    assert "arc.synthetic" in modules_after("from arc import sources; sources.load_tasks('synthetic:2', 'eval')")


def test_evaluating_real_tasks_loads_no_training_module(tmp_path):
    """A whole evaluation run, not just its imports: eval.py with a checkpoint on a task folder, and
    eval.py scoring a submission against ARC-AGI-1, load neither the loop, nor the text path, nor the
    synthetic generators (imported lazily by arc.sources, for synthetic:N only)."""
    import torch

    from arc import checkpoint
    from arc.model import HybridLM, preset

    torch.manual_seed(0)
    model = HybridLM(preset("tiny"))
    checkpoint.save_atomic({"model": model.state_dict(), "model_config": model.cfg.to_dict()}, tmp_path / "m.pt")
    (tmp_path / "tasks").mkdir()
    pair = {"input": [[1, 2], [3, 4]], "output": [[4, 3], [2, 1]]}
    (tmp_path / "tasks" / "t1.json").write_text(json.dumps({"train": [pair, pair], "test": [pair]}))
    (tmp_path / "sub.json").write_text(json.dumps({"00576224": [{"attempt_1": [[0]], "attempt_2": [[1]]}]}))
    runs = {
        "checkpoint": ["--ckpt", str(tmp_path / "m.pt"), "--data", str(tmp_path / "tasks"), "--views", "1"],
        "submission": ["--submission", str(tmp_path / "sub.json"), "--data", "arc1", "--split", "eval"],
    }
    for name, args in runs.items():
        argv = [*args, "--out", str(tmp_path / name), "--progress", "false"]
        loaded = modules_after(f"import eval; assert eval.main({argv!r}) == 0")
        assert (tmp_path / name / "results.json").is_file(), name
        assert "arc.score" in loaded and not loaded & TRAINING_ONLY, (name, sorted(loaded & TRAINING_ONLY))


def test_scoring_and_the_report_know_no_model():
    """Scoring takes any solver's submission: no model, no solver, no checkpoint."""
    solver_side = {"arc.model", "arc.solve", "arc.loader", "arc.checkpoint", "arc.mamba2", "arc.kernels", "arc.ttt"}
    loaded = modules_after("import arc.score, arc.report, arc.vote")
    assert not solver_side & loaded, sorted(solver_side & loaded)


@pytest.mark.parametrize("path", ["eval.py", "arc/evaluate.py", "arc/ttt.py", "arc/score.py", "arc/report.py",
                                  "arc/vote.py", "bench/bench_ttt.py", "bench/bench_decode.py"])
def test_no_imports_hidden_inside_functions(path):
    """Lazy imports hid that evaluation needed the trainer; every import is at the top now."""
    tree = ast.parse((ROOT / path).read_text())
    hidden = [f"line {node.lineno}" for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert hidden == []
