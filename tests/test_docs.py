"""docs/TRACE.md stays true to the code: every ``module:function`` it names imports and exists, and
every file it names is there. A renamed or removed function fails here, not in a reader's hands."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "docs" / "TRACE.md"

# `arc.module:name`, `arc.module:Class.method`, `train:main`, `eval:main`, at the start of a code span
# (what follows, such as a call's arguments, is ignored)
REFERENCE = re.compile(r"`((?:arc\.[a-z_0-9]+)|train|eval):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
FILE = re.compile(r"(?<![\w/.])((?:arc|tests|bench|docs)/\w+\.(?:py|md)|train\.py|eval\.py)\b")


def references(text: str) -> list[tuple[str, str]]:
    """The distinct (module, dotted name) pairs a page names, in order of first mention."""
    return list(dict.fromkeys(REFERENCE.findall(text)))


def resolve(module: str, name: str) -> object:
    """The object ``module:name`` names; ImportError or AttributeError if there is none."""
    obj: object = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


TEXT = TRACE.read_text(encoding="utf-8")
REFS = references(TEXT)
FILES = sorted(set(FILE.findall(TEXT)))


def test_the_page_names_the_steps_of_both_traces():
    """The parametrised checks below run over what was found: the page must be found to name a lot."""
    assert len(REFS) >= 80, len(REFS)
    named = {f"{m}:{n}" for m, n in REFS}
    for step in ("train:main", "arc.sources:load_tasks", "arc.tokens:encode_instance", "arc.loss:loss_sum",
                 "eval:main", "arc.solve:decode", "arc.vote:two_attempts", "arc.score:build_results",
                 "arc.report:write_report"):
        assert step in named, step
    assert {"arc/score.py", "tests/test_docs.py"} <= set(FILES)


def test_a_wrong_reference_is_caught():
    assert references("call `arc.score:build_results(report)` then `eval:main`.") == [
        ("arc.score", "build_results"), ("eval", "main")]
    resolve("arc.solve", "SolveConfig.__post_init__")
    with pytest.raises(AttributeError):
        resolve("arc.score", "no_such_function")
    with pytest.raises(ImportError):
        resolve("arc.no_such_module", "run")


@pytest.mark.parametrize("module, name", REFS, ids=[f"{m}:{n}" for m, n in REFS])
def test_every_function_the_trace_names_exists(module, name):
    resolve(module, name)


@pytest.mark.parametrize("path", FILES)
def test_every_file_the_trace_names_exists(path):
    assert (ROOT / path).is_file(), path


def test_the_readme_links_the_trace():
    assert "(docs/TRACE.md)" in (ROOT / "README.md").read_text(encoding="utf-8")
