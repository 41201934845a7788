"""What the rotary embedding costs a training step, per ``--rope``: the one-pass rotation
(``Rotary.apply`` over whole-head tables) against its part-by-part reference twin
(``Rotary.apply_reference``, each part rotated on its own and the parts concatenated).

    python bench/bench_rotary.py [--ropes mirror,dihedral] [--batches 4] [--rounds 5] [--md docs/BENCHMARKS.md]

The model is bench/bench_learn.py's base recipe with 2D positions (grid_pos, align_input) and each
rope; a step is forward + backward under bf16 autocast on real batches of the synthetic suite (the
loader bench_learn trains from). Every (rope, rotation) arm runs in the same process, interleaved
round by round over the same batches, so a shared machine's load falls on all of them alike; the
best round is kept. Both rotations give the same logits (checked here; tests/test_model.py holds the
parity test).
"""
from __future__ import annotations

import argparse
import time

import torch

from bench_learn import BASE_MODEL
from common import emit, header
from arc.data import load_tasks
from arc.loader import ArcDataLoader
from arc.loss import autocast_for, mean_loss
from arc.model import HybridLM, ModelConfig, Rotary, preset
from arc.synthetic import RULES, make_tasks


def reference_pair(self: Rotary, q, k, positions, pos=None):
    """Rotary.pair through the part-by-part twin."""
    tables = self.part_tables(positions, pos)
    return self.apply_reference(q, tables), self.apply_reference(k, tables)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ropes", default="mirror,dihedral", help="comma-separated ModelConfig.rope values")
    p.add_argument("--preset", default=None, help="time this model preset (arc.model.preset, its own rope replaced "
                   "by each --ropes) instead of the bench_learn recipe")
    p.add_argument("--max-tokens", type=int, default=16384, help="padded tokens per batch")
    p.add_argument("--batches", type=int, default=4, help="loader batches per round (16 sequences each)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds over every arm (best kept)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--md", default=None, help="append the markdown table to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    shape = preset(args.preset).to_dict() if args.preset else {**BASE_MODEL, "grid_pos": True, "align_input": True}
    tasks = load_tasks("arc1", "train") if args.preset else make_tasks(400, seed=3, rules=list(RULES))
    loader = ArcDataLoader(tasks, block_size=shape["max_seq_len"], train=True, seed=0, batch_size=16,
                           max_tokens=args.max_tokens, targets="outputs", augment=False)
    batches = [loader.next_batch() for _ in range(args.batches)]
    tokens = sum(int(b.x.numel()) for b in batches)
    fast_pair = Rotary.pair

    def run(model: HybridLM, reference: bool, backward: bool = True) -> list[torch.Tensor]:
        Rotary.pair = reference_pair if reference else fast_pair
        try:
            out = []
            for b in batches:
                with autocast_for("bfloat16", device):
                    logits, _ = model(b.x, pos=b.pos)
                if backward:
                    mean_loss(logits, b.y).backward()
                out.append(logits.detach())
            return out
        finally:
            Rotary.pair = fast_pair

    arms = {}
    for rope in args.ropes.split(","):
        torch.manual_seed(0)
        model = HybridLM(ModelConfig(**{**shape, "rope": rope}))
        with torch.no_grad():
            same = all(torch.equal(a, b) for a, b in zip(run(model, False, False), run(model, True, False)))
        if not same:
            raise SystemExit(f"rope={rope}: the one-pass and the reference rotation gave different logits")
        for reference in (True, False):
            run(model, reference)  # warm-up, untimed
            model.zero_grad(set_to_none=True)
            arms[(rope, reference)] = (model, [])
    for _ in range(args.rounds):
        for (rope, reference), (model, times) in arms.items():
            t0 = time.perf_counter()
            run(model, reference)
            times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)

    baseline = min(arms[(args.ropes.split(",")[0], True)][1])
    lines = [header("python bench/bench_rotary.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                                if v is not None and k != "md")),
             f"{'Preset ' + args.preset + ' on ARC-AGI-1 training tasks' if args.preset else 'Base recipe + grid_pos, align_input on the suite'}; "
             f"{len(batches)} batches of up to 16 sequences ({tokens} tokens incl. padding) "
             f"per round, forward + backward, bf16 autocast, best of {args.rounds} rounds. Logits equal between "
             "the two rotations (checked).\n",
             "| rope | rotation | s per round | ms per step | tokens/s | vs first rope, reference |",
             "|---|---|---|---|---|---|"]
    for (rope, reference), (_, times) in arms.items():
        best = min(times)
        lines.append(f"| {rope} | {'part by part (reference)' if reference else 'one pass'} | {best:.2f} | "
                     f"{best / len(batches) * 1000:.0f} | {tokens / best:,.0f} | {baseline / best:.2f}x |")
    emit("\n".join(lines), args.md)


if __name__ == "__main__":
    main()
