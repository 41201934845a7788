"""What every benchmark prints with its figures: the machine, the commit, the date, the command."""
from __future__ import annotations

import datetime
import platform
import subprocess

import torch


def header(command: str) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}{gpu}. "
            f"Commit {commit}, {datetime.date.today()}.\nCommand: `{command}`\n")


def emit(text: str, md: str | None) -> None:
    """Print a result and append it to a markdown file if one is named."""
    print(text)
    if md:
        with open(md, "a") as f:
            f.write(text + "\n")
