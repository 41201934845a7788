"""Solve and score ARC tasks with a trained checkpoint, or score any submission.json.

CPU (a run directory from train.py uses its latest checkpoint; --which best.pt for the best one):
    python eval.py --ckpt runs/cpu --data arc1 --split eval --out out/cpu-eval
    python eval.py --ckpt runs/smoke/latest.pt --limit 5 --views 1 --out out/quick
    python eval.py --ckpt runs/cpu --sample 40 --seed 0 --out out/sample40     # a fixed random 40 tasks
GPU (the same command; the model runs in bf16 with the fused kernels when they are installed):
    python eval.py --ckpt runs/gpu --data arc1 --split eval --views 8 --out out/gpu-eval
Test-time training before each task (fine-tune on its demonstrations, then predict):
    python eval.py --ckpt runs/cpu --ttt_steps 32 --out out/ttt
Several candidates per view, each scored under every view (slower; see docs/BENCHMARKS.md):
    python eval.py --ckpt runs/cpu --search 0.1 --select both --out out/product
Score an existing submission without a model:
    python eval.py --submission out/cpu-eval/submission.json --data arc1 --split eval --out out/rescored
Writes OUTDIR/submission.json (Kaggle format), OUTDIR/results.json and OUTDIR/report.html, and keeps
OUTDIR/progress.jsonl: an interrupted evaluation continues where it stopped when run again.
Every flag comes from a config dataclass (arc.evaluate.EvalConfig, arc.solve.SolveConfig,
arc.ttt.TTTConfig), where its default, help and checks live.
"""
import argparse
import logging
import sys

from arc import config
from arc.evaluate import EvalConfig, run
from arc.score import results_summary
from arc.solve import SolveConfig
from arc.ttt import TTTConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_flags(p, EvalConfig, "evaluation (one of --ckpt or --submission; --out)")
    config.add_flags(p, SolveConfig, "solving", skip=("seed",))  # one --seed, from EvalConfig, for all three
    config.add_flags(p, TTTConfig, "test-time training (off unless --ttt_steps > 0)", skip=("seed", "dtype"))  # --dtype: SolveConfig's, for both
    return p


def parse_args(argv: list[str] | None = None) -> tuple[EvalConfig, SolveConfig, TTTConfig]:
    """The three configs from the command line (ValueError names the flag that is wrong)."""
    args = build_parser().parse_args(argv)
    return (EvalConfig(**config.given(args, EvalConfig)), SolveConfig(**config.given(args, SolveConfig)),
            TTTConfig(**config.given(args, TTTConfig)))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        eval_cfg, solve_cfg, ttt_cfg = parse_args(argv)
        results = run(eval_cfg, solve_cfg, ttt_cfg)
    except (ValueError, OSError) as e:  # bad flags, tasks, checkpoint, submission or --out: the message says it
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eval.py: interrupted; the finished tasks are kept: run the same command to continue", file=sys.stderr)
        return 130
    for rule, v in (results["run"].get("by_select") or {}).items():
        if v["score"] is not None and results["run"]["settings"]["solve"]["select"] != "vote":
            print(f"  --select {rule}: score {v['score']:.3f}, {v['tasks_solved']}/{v['tasks_scored']} tasks solved")
    print(f"{results_summary(results)}; wrote {eval_cfg.out}/{{submission.json,results.json,report.html}}")
    seen = results["run"].get("seen_in_training") or []
    if seen:
        print(f"warning: {len(seen)} evaluated task(s) were trained on by this checkpoint (same content): "
              f"{', '.join(seen[:10])}{' ...' if len(seen) > 10 else ''}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
