"""What test-time training buys: one checkpoint, the same tasks, several TTT budgets.

    python bench/bench_ttt.py --ckpt runs/cpu [--tasks 12] [--pick shortest|first|sample] [--seed 0] [--budgets 0,8,32]
                              [--views 8] [--ttt_batch 4] [--ttt_lr 3e-4] [--ttt_params all|lora|last] [--ttt_layers 0]
                              [--ttt_lora_rank 16] [--ttt_lora_alpha 32] [--ttt_check_every 0] [--md docs/BENCHMARKS.md]

For each budget (0 = no TTT) and each task: fine-tune on the task's demonstrations (arc.ttt), then
measure the teacher-forced loss and token accuracy of the model on the task's true test outputs
(a continuous figure that moves before the exact-match score does; the truth is only read for
this measurement, never trained on), solve the task with --views views, and restore the weights.
Reports per budget: official score (pass@2), tasks solved, attempts of the right shape, mean
test-output loss and token accuracy, fine-tuning steps actually run per task (fewer than the budget
when --ttt_check_every stops early), seconds per fine-tuning step, and seconds per task (fine-tuning,
and fine-tuning + solving). --ttt_params/--ttt_layers/--ttt_lora_*/--ttt_check_every are
arc.ttt.TTTConfig's (eval.py's) flags: which weights train, and the early stop.

--pick shortest takes the tasks with the fewest tokens (demonstrations + test pairs), so a CPU
can afford several budgets; --pick first takes the first ones by id, as eval.py --limit does;
--pick sample takes eval.py's --sample N --seed S draw (an unselected fixed subset, the same tasks).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import emit, header
from arc import data, score
from arc.evaluate import load_model, select_tasks
from arc.solve import SolveConfig, solve_task, submission_of
from arc.tokens import IGNORE_INDEX, encode_instance, pair_length
from arc.loss import loss_sum
from arc.compiling import compile_seconds
from arc.ttt import TTT_PARAMS, TaskFineTuner, TTTConfig


def task_tokens(task: data.Task) -> int:
    return sum(pair_length(p.input.shape, p.output.shape) for p in task.train + task.test if p.output is not None)


def pick_tasks(args: argparse.Namespace) -> list[data.Task]:
    """``args.tasks`` tasks of ``args.data``/``args.split`` with known test outputs, by ``args.pick``:
    shortest (fewest tokens), first (by id, as eval.py --limit) or sample (eval.py's --sample N --seed S)."""
    tasks = [t for t in data.load_tasks(args.data, args.split) if all(p.output is not None for p in t.test)]
    if args.pick == "shortest":
        tasks = sorted(tasks, key=lambda t: (task_tokens(t), t.id))
    if args.pick == "sample":
        tasks, _ = select_tasks(tasks, sample=args.tasks, seed=args.seed)
    return tasks[: args.tasks]


def picked(args: argparse.Namespace) -> str:
    """How :func:`pick_tasks` chose, in words, for a benchmark's table header."""
    return {"shortest": "fewest tokens", "first": "first by id", "sample": f"eval.py --sample {args.tasks} --seed {args.seed}"}[args.pick]


@torch.no_grad()
def test_output_fit(model, task: data.Task, device: torch.device) -> tuple[float, int, int]:
    """Summed loss, correct argmax tokens and target tokens over the task's test outputs."""
    total, right, count = 0.0, 0, 0
    for pair in task.test:
        enc = encode_instance(task.demos, pair.input, pair.output, targets="test")
        x = torch.as_tensor(enc.ids[None, :-1], device=device)
        y = torch.as_tensor(np.where(enc.target[1:], enc.ids[1:], IGNORE_INDEX)[None], device=device)
        pos = torch.as_tensor(enc.x_pos()[None], device=device) if model.cfg.uses_positions else None  # (1, L, N_POS)
        logits, _ = model(x, pos=pos)
        total += float(loss_sum(logits, y))
        mask = y != IGNORE_INDEX
        right += int((logits.argmax(-1)[mask] == y[mask]).sum())
        count += int(mask.sum())
    return total, right, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--data", default="arc1")
    ap.add_argument("--split", default="eval")
    ap.add_argument("--tasks", type=int, default=12)
    ap.add_argument("--pick", choices=["shortest", "first", "sample"], default="shortest")
    ap.add_argument("--seed", type=int, default=0, help="--pick sample: eval.py's --seed")
    ap.add_argument("--budgets", default="0,8,32")
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--ttt_batch", type=int, default=4)
    ap.add_argument("--ttt_lr", type=float, default=3e-4)
    ap.add_argument("--ttt_params", choices=TTT_PARAMS, default=TTTConfig.ttt_params)
    ap.add_argument("--ttt_layers", type=int, default=TTTConfig.ttt_layers)
    ap.add_argument("--ttt_lora_rank", type=int, default=TTTConfig.ttt_lora_rank)
    ap.add_argument("--ttt_lora_alpha", type=float, default=TTTConfig.ttt_lora_alpha)
    ap.add_argument("--ttt_check_every", type=int, default=TTTConfig.ttt_check_every)
    ap.add_argument("--ttt_compile", action="store_true", help="torch.compile the fine-tuning forward (TTTConfig.ttt_compile)")
    ap.add_argument("--md", default=None)
    args = ap.parse_args()

    device = torch.device("cpu")
    model, _ = load_model(args.ckpt, device)
    tasks = pick_tasks(args)
    solve_cfg = SolveConfig(views=args.views)
    rows = []
    ttt_flags = dict(ttt_lr=args.ttt_lr, ttt_batch=args.ttt_batch, ttt_params=args.ttt_params, ttt_layers=args.ttt_layers,
                     ttt_lora_rank=args.ttt_lora_rank, ttt_lora_alpha=args.ttt_lora_alpha,
                     ttt_check_every=args.ttt_check_every, ttt_compile=args.ttt_compile)
    TTTConfig(**ttt_flags)  # bad flags fail before the model runs
    for steps in [int(b) for b in args.budgets.split(",")]:
        tuner = TaskFineTuner(model, TTTConfig(ttt_steps=steps, **ttt_flags)) if steps else None
        loss, right, count, seconds, fit_seconds, shaped, steps_run = 0.0, 0, 0, 0.0, 0.0, 0, 0
        predictions = []
        for task in tasks:
            t0, record = time.perf_counter(), None
            try:
                if tuner is not None:
                    record = tuner.fit(task, device)
                    fit_seconds, steps_run = fit_seconds + record["seconds"], steps_run + record["steps"]
                model.eval()
                pred = solve_task(model, task, solve_cfg, device)
                seconds += time.perf_counter() - t0
                l, r, c = test_output_fit(model, task, device)
            finally:
                if tuner is not None:
                    tuner.restore()
            loss, right, count = loss + l, right + r, count + c
            predictions.append(pred)
            for t, pair in zip(pred.tests, task.test):
                shaped += any(a.shape == pair.output.shape for a in (t.attempt_1, t.attempt_2))
            ran = "" if record is None else f", {record['steps']} steps ({record.get('stop', record.get('reason'))})"
            print(f"budget {steps}: {task.id} loss {l / c:.3f} solved {all(pred.correct)} ({time.perf_counter() - t0:.1f} s{ran})",
                  flush=True)
        result = score.score_submission(submission_of(predictions), tasks)
        rows.append((steps, result.score, result.tasks_solved, shaped, sum(len(t.test) for t in tasks), loss / count,
                     right / count, steps_run / len(tasks), fit_seconds / max(steps_run, 1), fit_seconds / len(tasks),
                     seconds / len(tasks), [p.task_id for p in predictions if all(p.correct)]))

    trains = {"all": "every weight", "lora": f"LoRA rank {args.ttt_lora_rank}, alpha {args.ttt_lora_alpha}"
              + (f", last {args.ttt_layers} blocks" if args.ttt_layers else ", every block"),
              "last": f"the last {args.ttt_layers} blocks + final norm"}[args.ttt_params]
    stops = f", early stop checked every {args.ttt_check_every} steps" if args.ttt_check_every else ""
    lines = [header(f"python bench/bench_ttt.py --ckpt {args.ckpt} --tasks {args.tasks} --pick {args.pick}"
                    + (f" --seed {args.seed}" if args.pick == "sample" else "") + f" --budgets {args.budgets} --views {args.views} --ttt_batch {args.ttt_batch} --ttt_lr {args.ttt_lr}"
                    + f" --ttt_params {args.ttt_params}" + (f" --ttt_layers {args.ttt_layers}" if args.ttt_layers else "")
                    + (f" --ttt_lora_rank {args.ttt_lora_rank} --ttt_lora_alpha {args.ttt_lora_alpha}" if args.ttt_params == "lora" else "")
                    + (" --ttt_compile" if args.ttt_compile else "")
                    + (f" --ttt_check_every {args.ttt_check_every}" if args.ttt_check_every else "")),
             f"{len(tasks)} {args.data} {args.split} tasks ({picked(args)}): {', '.join(t.id for t in tasks)}. "
             f"{model.num_params() / 1e6:.2f}M parameters, {args.views} views, TTT batch {args.ttt_batch}, lr {args.ttt_lr}, "
             f"trains {trains}{stops}.", "",
             "| TTT steps | score (pass@2) | tasks solved | attempts of the right shape | test-output loss | token accuracy "
             "| steps run/task | TTT s/step | TTT s/task | total s/task |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for steps, sc, solved, shaped, n_tests, l, acc, run, step_s, fit_s, total_s, _ in rows:
        lines.append(f"| {steps} | {sc:.3f} | {solved}/{len(tasks)} | {shaped}/{n_tests} | {l:.3f} | {acc:.1%} | {run:.1f} "
                     f"| {step_s:.3f} | {fit_s:.1f} | {total_s:.1f} |")
    lines += [""] + [f"Solved at {r[0]} steps: {', '.join(r[-1]) or 'none'}." for r in rows]
    if args.ttt_compile:
        lines.append(f"torch.compile spent {compile_seconds():.0f} s compiling in this process, inside the TTT seconds above.")
    emit("\n".join(lines) + "\n", args.md)


if __name__ == "__main__":
    main()
