"""Solve and score ARC tasks with a trained checkpoint, or score any submission.json.

CPU (a run directory from train.py uses its latest checkpoint; --which best for the best one):
    python eval.py --ckpt runs/cpu --data arc1 --split eval --out out/cpu-eval
    python eval.py --ckpt runs/smoke/latest.pt --limit 5 --views 1 --out out/quick
GPU (the same command; the model runs in bf16 with the fused kernels when they are installed):
    python eval.py --ckpt runs/gpu --data arc1 --split eval --views 8 --out out/gpu-eval
Test-time training before each task (fine-tune on its demonstrations, then predict):
    python eval.py --ckpt runs/cpu --ttt_steps 32 --out out/ttt
Score an existing submission without a model:
    python eval.py --submission out/cpu-eval/submission.json --data arc1 --split eval --out out/rescored
Writes OUTDIR/submission.json (Kaggle format), OUTDIR/results.json and OUTDIR/report.html.
"""
import argparse
import logging
import sys

from arc import checkpoint
from arc.data import SourceError, TaskError
from arc.evaluate import IncompatibleCheckpoint, evaluate, score_file
from arc.solve import SolveConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to evaluate (one of)")
    what.add_argument("--ckpt", help="a checkpoint file, or a run directory from train.py")
    what.add_argument("--submission", help="score this submission.json instead of running a model")
    p.add_argument("--which", default=checkpoint.LATEST, help="checkpoint inside a run directory: latest.pt or best.pt")
    tasks = p.add_argument_group("tasks")
    tasks.add_argument("--data", default="arc1", help="arc1, arc2, a task folder or a *_challenges.json (default arc1)")
    tasks.add_argument("--split", default="eval", choices=["train", "eval"], help="split (default eval)")
    tasks.add_argument("--limit", type=int, default=None, help="only the first N tasks")
    tasks.add_argument("--tasks", default=None, help="comma-separated task ids")
    solve = p.add_argument_group("solving")
    solve.add_argument("--views", type=int, default=8, help="views voted over per test input: 1 = the original only, 8 = all rotations/reflections, more add colour permutations (default 8)")
    solve.add_argument("--batch", type=int, default=16, help="prompts decoded together (default 16)")
    solve.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    solve.add_argument("--samples", type=int, default=1, help="decodes per view when sampling (best-of-n by vote)")
    solve.add_argument("--seed", type=int, default=0, help="seed of the colour-permutation views and sampling")
    solve.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ttt = p.add_argument_group("test-time training (off unless --ttt_steps > 0)")
    ttt.add_argument("--ttt_steps", type=int, default=0, help="fine-tuning steps on each task's own demonstrations before predicting it")
    ttt.add_argument("--ttt_lr", type=float, default=3e-4, help="test-time learning rate")
    ttt.add_argument("--ttt_batch", type=int, default=8, help="augmented leave-one-out sequences per test-time step")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--report_limit", type=int, default=None, help="at most this many task sections in report.html")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if bool(args.ckpt) == bool(args.submission):
        print("eval.py: error: give exactly one of --ckpt or --submission", file=sys.stderr)
        return 2
    ids = [t for t in args.tasks.split(",") if t] if args.tasks else None
    try:
        if args.submission:
            results = score_file(args.submission, args.data, args.split, args.out, limit=args.limit, task_ids=ids)
        else:
            solve_cfg = SolveConfig(views=args.views, batch=args.batch, temperature=args.temperature,
                                    samples=args.samples, seed=args.seed)
            ttt_cfg = None
            if args.ttt_steps > 0:
                from arc.ttt import TTTConfig

                ttt_cfg = TTTConfig(steps=args.ttt_steps, lr=args.ttt_lr, batch_size=args.ttt_batch, seed=args.seed)
            results = evaluate(args.ckpt, args.data, args.split, args.out, solve_cfg, device=args.device,
                               limit=args.limit, task_ids=ids, which=args.which, progress=not args.no_progress,
                               report_limit=args.report_limit, ttt=ttt_cfg)
    except (IncompatibleCheckpoint, TaskError, SourceError, FileNotFoundError, ValueError) as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 2
    print(f"score {results['score']:.4f} (pass@2, official), pass@1 {results['pass_at_1']:.4f}, "
          f"{results['tasks_solved']}/{results['tasks_scored']} tasks solved, "
          f"{results['test_inputs_solved']}/{results['test_inputs']} test inputs; wrote {args.out}/"
          "{submission.json,results.json,report.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
