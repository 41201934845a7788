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
TRAINING_ONLY = {"arc.trainer", "arc.text", "arc.synthetic", "arc.plot"}  # the loop, text data, generators


def modules_after(statement: str) -> set[str]:
    """The modules loaded by ``statement`` in a new interpreter run from the repository root."""
    code = f"import sys, json; sys.path.insert(0, '.'); {statement}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_evaluation_does_not_import_the_training_stack():
    loaded = modules_after("import eval, arc.evaluate, arc.ttt")
    assert {"arc.evaluate", "arc.ttt", "arc.solve", "arc.model", "arc.score", "arc.report"} <= loaded
    assert not loaded & TRAINING_ONLY, sorted(loaded & TRAINING_ONLY)


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
