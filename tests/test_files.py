"""arc.files: atomic writes keep the old file on failure, create files with the umask's permissions
(not 0600), and the leftovers of a killed write are removed by the next write or checkpoint load."""
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from arc import checkpoint, files
from arc.score import atomic_write_text as score_atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
DEAD_PID = 2**22 + 1  # above Linux's largest pid_max: never a live process


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the process umask for a test and put the old one back."""
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def test_text_and_bytes_round_trip_and_overwrite_in_place(tmp_path):
    path = tmp_path / "sub" / "a.json"
    files.atomic_write_text(path, "héllo\n")
    assert path.read_text(encoding="utf-8") == "héllo\n"
    files.atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert os.listdir(path.parent) == ["a.json"]  # no temporary left behind


def test_evaluation_outputs_use_the_same_helper():
    assert score_atomic_write_text is files.atomic_write_text


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_files_get_the_permissions_open_would_give(tmp_path, umask, mask, expected):
    umask(mask)
    files.atomic_write_text(tmp_path / "r.json", "{}")
    checkpoint.save_atomic({"model": {}, "model_config": {}}, tmp_path / "latest.pt")
    with open(tmp_path / "plain.txt", "w") as f:  # the reference: what open() makes
        f.write("x")
    assert mode(tmp_path / "plain.txt") == expected
    assert mode(tmp_path / "r.json") == expected
    assert mode(tmp_path / "latest.pt") == expected


def test_an_exception_while_writing_keeps_the_old_file(tmp_path):
    path = tmp_path / "x.bin"
    files.atomic_write_bytes(path, b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with files.atomic_open(path) as f:
            f.write(b"half of the new")
            raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.bin"]


def kill_during_write(path: Path) -> None:
    """A process that dies (no cleanup at all, like kill -9) in the middle of an atomic write."""
    code = ("import os, sys; from arc import files\n"
            "with files.atomic_open(sys.argv[1]) as f:\n"
            "    f.write(b'half'); f.flush(); os._exit(9)\n")
    done = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT)
    assert done.returncode == 9


def test_a_killed_write_leaves_the_old_file_and_the_next_write_removes_its_leftover(tmp_path):
    path = tmp_path / "latest.pt"
    checkpoint.save_atomic({"model": {"w": torch.ones(2)}, "model_config": {}}, path)
    kill_during_write(path)
    leftovers = files.stale_temporaries(path)
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".latest.pt.") and leftovers[0].name.endswith(".tmp")
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(2))  # the old one is whole
    live = tmp_path / f".latest.pt.{os.getpid()}-0123abcd.tmp"  # a write in progress (this process)
    other = tmp_path / f".best.pt.{DEAD_PID}-0123abcd.tmp"  # another file's leftover
    legacy = tmp_path / ".latest.pt.k2j_x9q1.tmp"  # tempfile.mkstemp's names, from older versions
    for p in (live, other, legacy):
        p.write_bytes(b"")
    files.atomic_write_bytes(path, b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["latest.pt", live.name, other.name])


def test_loading_a_checkpoint_removes_the_leftovers_of_killed_checkpoint_writes(tmp_path):
    checkpoint.save_atomic({"model": {}, "model_config": {}}, tmp_path / checkpoint.LATEST)
    kill_during_write(tmp_path / checkpoint.LATEST)
    kill_during_write(tmp_path / checkpoint.BEST)
    notes = tmp_path / f".notes.txt.{DEAD_PID}-ab.tmp"  # not a checkpoint's: left alone
    notes.write_bytes(b"")
    checkpoint.load(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [notes.name, checkpoint.LATEST]


def test_names_with_glob_characters_are_taken_literally(tmp_path):
    path = tmp_path / "a[1].json"
    (tmp_path / f".a1.json.{DEAD_PID}-ab.tmp").write_bytes(b"")  # matches the unescaped pattern .a[1].json.*
    (tmp_path / f".a[1].json.{DEAD_PID}-ab.tmp").write_bytes(b"")
    assert [p.name for p in files.stale_temporaries(path)] == [f".a[1].json.{DEAD_PID}-ab.tmp"]
