"""Plot the loss curves of one or more runs to a PNG.

    python -m arc.plot runs/a runs/b --out loss.png

Reads each run's ``log.jsonl`` (written by train.py): training loss per logged step, and the
validation loss where it was measured.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_log(run: str | Path) -> list[dict]:
    path = Path(run) / "log.jsonl" if Path(run).is_dir() else Path(run)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no training log (expected a run directory from train.py or its log.jsonl)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e})") from e
    return rows


def plot_runs(runs: list[str], out: str, log_y: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        rows = read_log(run)
        name = Path(run).name
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if train:
            line, = ax.plot(*zip(*train), label=f"{name} train", lw=1)
            if val:
                ax.plot(*zip(*val), "o--", color=line.get_color(), label=f"{name} val", ms=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per target token)")
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Plot loss curves of train.py runs to a PNG.")
    p.add_argument("runs", nargs="+", help="run directories (or their log.jsonl files)")
    p.add_argument("--out", default="loss.png", help="PNG file to write")
    p.add_argument("--linear", action="store_true", help="linear loss axis instead of log")
    args = p.parse_args(argv)
    plot_runs(args.runs, args.out, log_y=not args.linear)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
