"""Loader benchmark: batches per second and real-token share, against the seed's pad-to-4096.

    python bench/bench_loader.py --data arc1 --batch-size 8 [--epochs 3] [--out docs/BENCHMARKS.md]

Three loaders over the same ARC-AGI-1 training instances, measured in one process:
  pad-to-block   every sequence padded to 4096, random batches (the seed's approach)
  random-longest random batches padded to their longest sequence (rounded up to 64)
  length-buckets sequences of similar length batched together (ArcDataLoader's default)
All three apply the default training augmentation, so batches/s includes augmenting and encoding.
"""
from __future__ import annotations

import argparse
import time

import torch

from common import emit, header
from arc.data import load_tasks
from arc.loader import ArcDataLoader
from arc.tokens import PAD

MODES = {
    "pad-to-block (seed)": dict(bucket=False, pad_to_block=True),
    "random-longest": dict(bucket=False),
    "length-buckets": dict(bucket=True),
}


def measure(loader: ArcDataLoader, epochs: int) -> dict:
    real = padded = batches = 0
    t0 = time.perf_counter()
    for _ in range(epochs):
        for x, _, _ in loader.epoch_batches():
            real += int((x != PAD).sum())
            padded += x.numel()
            batches += 1
    dt = time.perf_counter() - t0
    return {"batches_per_s": batches / dt, "real_share": real / padded, "padded_tokens_per_epoch": padded / epochs,
            "batches": batches}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="arc1", help="ARC source (default arc1)")
    p.add_argument("--split", default="train", help="split (default train)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    p.add_argument("--epochs", type=int, default=3, help="epochs measured per loader")
    p.add_argument("--out", default=None, help="append the markdown table to this file")
    args = p.parse_args()
    torch.set_num_threads(1)
    tasks = load_tasks(args.data, args.split)
    rows = []
    for name, opts in MODES.items():
        r = measure(ArcDataLoader(tasks, batch_size=args.batch_size, seed=0, **opts), args.epochs)
        rows.append((name, r))
    base = rows[0][1]
    lines = [
        header(f"python bench/bench_loader.py --data {args.data} --batch-size {args.batch_size} --epochs {args.epochs}"),
        "| loader | real-token share | padded tokens / epoch | vs seed | batches/s |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows:
        lines.append(f"| {name} | {r['real_share']:.1%} | {r['padded_tokens_per_epoch']:,.0f} | "
                     f"{base['padded_tokens_per_epoch'] / r['padded_tokens_per_epoch']:.2f}x fewer | {r['batches_per_s']:.0f} |")
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
