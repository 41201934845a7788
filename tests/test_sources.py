"""arc.sources, the --data grammar: every form, combined sources kept once by content (and the
dropped ones reported), unique ids, clear errors, and the same forms on the command line."""
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from arc import data, sources
from arc.data import SourceError, TaskError, task_fingerprint
from arc.synthetic import make_tasks

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"train": [{"input": [[1, 2], [3, 4]], "output": [[4, 3], [2, 1]]}], "test": [{"input": [[5]], "output": [[5]]}]}
OTHER = {"train": [{"input": [[1]], "output": [[2]]}], "test": [{"input": [[3]], "output": [[4]]}]}


def write_task(folder: Path, task_id: str, value: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{task_id}.json").write_text(json.dumps(value))


def same(a: data.Task, b: data.Task) -> bool:
    return a.id == b.id and task_fingerprint(a) == task_fingerprint(b)


def test_a_single_source_reads_what_arc_data_reads():
    for split in ("train", "eval"):
        loaded = sources.load_tasks("arc1", split)
        assert [t.id for t in loaded.tasks] == [t.id for t in data.load_tasks("arc1", split)]
        assert (len(loaded.tasks), loaded.duplicates, loaded.bad, loaded.renamed) == (400, [], [], [])


def test_synthetic_is_seeded_by_split_and_defaults_to_2000(monkeypatch):
    got = sources.load_tasks("synthetic:5", "train", seed=3).tasks
    assert all(same(a, b) for a, b in zip(got, make_tasks(5, seed=3), strict=True))
    got = sources.load_tasks("synthetic:5", "eval", seed=3).tasks
    assert all(same(a, b) for a, b in zip(got, make_tasks(5, seed=4), strict=True))
    asked = []
    from arc import synthetic  # arc.sources imports it only when a synthetic source is read
    monkeypatch.setattr(synthetic, "make_tasks", lambda n, seed: asked.append((n, seed)) or [])
    sources.load_tasks("synthetic", "train", seed=7)
    assert asked == [(2000, 7)]


def test_combined_sources_keep_each_content_once_and_report_the_rest(caplog):
    with caplog.at_level(logging.WARNING, logger="arc.sources"):
        loaded = sources.load_tasks("synthetic:4,synthetic:6", "train", seed=0)
    first6 = make_tasks(6, seed=0)  # synthetic:6 begins with synthetic:4's tasks
    assert [t.id for t in loaded.tasks] == [t.id for t in first6]
    assert loaded.duplicates == [(t.id, t.id) for t in first6[:4]]
    lines = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(lines) == 1 and "dropped 4 task(s)" in lines[0] and first6[0].id in lines[0]


def test_arc1_and_arc2_training_sets_together():
    loaded = sources.load_tasks("arc1,arc2", "train")
    # ARC-AGI-2 training holds 372 ARC-AGI-1 training tasks by content; 20 more reuse an ARC-AGI-1 id
    # with edited content: kept, renamed
    assert (len(loaded.tasks), len(loaded.duplicates), len(loaded.renamed)) == (1028, 372, 20)
    assert len({task_fingerprint(t) for t in loaded.tasks}) == 1028
    assert len({t.id for t in loaded.tasks}) == 1028
    assert all(new == f"{old}@arc2" for new, old in loaded.renamed)


def test_the_same_id_with_other_content_is_renamed_not_dropped(tmp_path):
    write_task(tmp_path / "a", "t1", GOOD)
    write_task(tmp_path / "b", "t1", OTHER)
    b = str(tmp_path / "b")
    loaded = sources.load_tasks(f"{tmp_path / 'a'},{b}", "train")
    assert [t.id for t in loaded.tasks] == ["t1", f"t1@{b}"]
    assert np.array_equal(loaded.tasks[1].train[0].input, [[1]])
    assert loaded.renamed == [(f"t1@{b}", "t1")] and loaded.duplicates == []


def test_skip_bad_lists_bad_tasks_of_every_source(tmp_path):
    write_task(tmp_path / "a", "good", GOOD)
    write_task(tmp_path / "b", "ragged", {"train": [{"input": [[1, 2], [3]], "output": [[1]]}], "test": [{"input": [[1]]}]})
    spec = f"{tmp_path / 'a'},{tmp_path / 'b'}"
    with pytest.raises(TaskError, match="ragged"):
        sources.load_tasks(spec, "train")
    loaded = sources.load_tasks(spec, "train", skip_bad=True)
    assert [t.id for t in loaded.tasks] == ["good"]
    assert [(b.task_id, b.file) for b in loaded.bad] == [("ragged", str(tmp_path / "b" / "ragged.json"))]


@pytest.mark.parametrize("spec, message", [
    ("arc1,", "an empty source in the list"),
    (",arc1", "an empty source in the list"),
    ("", "an empty source in the list"),
    ("arc1,text:notes.txt", "cannot be combined"),
    ("text:notes.txt", "a text file holds no ARC tasks"),
    ("synthetic:0", "whole number >= 1"),
    ("synthetic:many", "whole number >= 1"),
    ("arc3", "is not arc1, arc2"),
])
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(SourceError, match=message):
        sources.load_tasks(spec, "train")


def test_text_is_its_own_form():
    assert sources.is_text("text:input.txt") and sources.is_text(" text:input.txt")
    assert not sources.is_text("arc1") and not sources.is_text("arc1,text:a.txt")
    assert sources.text_path("text:dir/input.txt") == "dir/input.txt"
    with pytest.raises(SourceError, match="names no file"):
        sources.text_path("text:")


def test_describe_names_every_source():
    text = sources.describe("arc1,synthetic:3", "eval", seed=5)
    assert "arc1.json[eval]" in text and "3 synthetic tasks (seed 6)" in text


def test_command_line_takes_the_same_forms():
    out = subprocess.run([sys.executable, "-m", "arc.data", "stats", "--data", "synthetic:6,synthetic:4", "--json"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)
    assert (stats["tasks"], stats["duplicates_dropped"], stats["bad_skipped"]) == (6, 4, 0)
    bad = subprocess.run([sys.executable, "-m", "arc.data", "stats", "--data", "arc1,"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "an empty source in the list" in bad.stderr


def test_show_finds_a_synthetic_task(capsys):
    task = make_tasks(2, seed=1)[1]
    assert sources.main(["show", "--data", "synthetic:2", "--seed", "1", "--task", task.id]) == 0
    assert f"task {task.id}" in capsys.readouterr().out
