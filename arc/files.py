"""Atomic file writes: the one home for "a reader never sees half a file, a kill keeps the old one".

Every file the project writes that someone may read back (checkpoints, config.json, results.json,
submission.json, report.html) goes through :func:`atomic_open` or its two shorthands: the bytes go
to a temporary file beside the target, are flushed and fsynced, and the temporary file is renamed
over the target (``os.replace`` is atomic on one filesystem); the folder is fsynced too, so the
rename itself survives a power cut.

The temporary file is ``.<name>.<pid>-<random>.tmp``. It is created the way ``open()`` creates
files (mode 0666 less the umask), not ``tempfile.mkstemp``'s 0600, so outputs are readable by the
people the user's umask allows. A write killed with ``kill -9`` cannot remove its temporary file;
:func:`clean_stale` removes such leftovers of one target name, and every atomic write calls it for
its own target first. A leftover whose pid is a live process on this machine is left alone: it
may be another writer's write in progress.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
from pathlib import Path
from typing import BinaryIO, Iterator

log = logging.getLogger(__name__)

# .<name>.<pid>-<hex>.tmp (ours) or .<name>.<8 chars>.tmp (tempfile.mkstemp's, from older versions)
_TMP = re.compile(r"^\.(?P<name>.+)\.(?:(?P<pid>\d+)-[0-9a-f]+|[a-z0-9_]{8})\.tmp$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """The leftover temporary files of interrupted atomic writes of ``path`` (same folder, same name)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    found = []
    for candidate in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        m = _TMP.match(candidate.name)
        if m is None or m["name"] != path.name or not candidate.is_file():
            continue
        if m["pid"] is not None and _pid_alive(int(m["pid"])):
            continue
        found.append(candidate)
    return sorted(found)


def glob_escape(name: str) -> str:
    """``name`` with glob's special characters taken literally."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def clean_stale(path: str | os.PathLike) -> list[Path]:
    """Remove the leftovers of interrupted atomic writes of ``path``; returns what was removed.

    A leftover that cannot be removed (a read-only folder) is reported in a warning, not raised:
    it costs disk space, never correctness, and must not stop a read.
    """
    removed = []
    for tmp in stale_temporaries(path):
        try:
            tmp.unlink()
        except FileNotFoundError:  # someone else cleaned it meanwhile
            continue
        except OSError as err:
            log.warning("cannot remove %s, the leftover of an interrupted write: %s", tmp, err)
            continue
        removed.append(tmp)
    if removed:
        log.info("removed %d leftover temporary file(s) of interrupted writes: %s",
                 len(removed), ", ".join(p.name for p in removed))
    return removed


def _fsync_folder(folder: Path) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # Windows cannot open a folder; its rename is durable enough
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through; it replaces ``path`` only when the block ends without
    an exception (an exception removes the temporary file and leaves ``path`` as it was)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    # O_EXCL: never write through a file someone else made; 0o666 less the umask, like open()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (see the module docstring)."""
    atomic_write_bytes(path, text.encode(encoding))
