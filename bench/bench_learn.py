"""Learning curves: exact match on fresh held-out tasks against training tokens, to A/B the recipe.

    python bench/bench_learn.py --curriculum flip_h --budgets 0.25,0.5,1,2 \
        --arm base --arm pos:grid_pos=true,align_input=true --md docs/BENCHMARKS.md --plot docs/learn_flip_h.png
    python bench/bench_learn.py --curriculum suite --budgets 1,2,4,8,16,32 --arm best:...

For each arm (a name and ModelConfig / TrainConfig overrides of the bench's base recipe), a model is
trained from scratch on synthetic tasks of the curriculum's rules (arc/synthetic.py, seed
``--seed``), and every time the real (non-PAD) training tokens pass a budget, it is scored on fresh
held-out tasks of the same rules (another seed, never trained on): the share whose test output greedy
decoding would write exactly, measured by teacher forcing under the decoder's own grammar mask
(arc.solve.teacher_forced: one forward pass; equal to greedy decoding, which is checked at the end on
a sample with arc.solve.solve_tasks). The learning-rate schedule is planned for the largest budget
(or ``--plan M`` million tokens, to read a longer run's first points only), so the smaller budgets
are points along one run. The x-axis is tokens, so curves compare across machines; wall time is
printed too. Arms share seeds, tasks and budgets. ``--errors N`` breaks the greedy answers of N
held-out tasks down per rule after training (right, near miss, which rotation/reflection of the
input, wrong shape); ``--first RULES@M`` trains on some rules alone first (a staged curriculum).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from common import emit, header
from arc import checkpoint, config
from arc.augment import DIHEDRAL_NAMES, dihedral
from arc.data import Task
from arc.loader import ArcDataLoader
from arc.loss import autocast_for, mean_loss
from arc.model import HybridLM, ModelConfig
from arc.solve import SolveConfig, solve_tasks, teacher_forced
from arc.synthetic import RULES, make_tasks
from arc.tokens import PAD, encode_prompt
from arc.trainer import TrainConfig, lr_at, make_optimizer

CURRICULA = {"suite": list(RULES), "simple": ["flip_h", "rot90", "transpose", "gravity", "shift", "colour_map", "tile", "upscale"]}

# The bench's base recipe: a ~0.75M-parameter hybrid, sized so a curve to 16M tokens fits a CPU hour.
BASE_MODEL = dict(d_model=128, n_layer=4, layer_pattern="MA", mlp_hidden=256, n_head=4, headdim=32, d_state=32,
                  chunk_size=64, max_seq_len=1024)
BASE_TRAIN = dict(lr=2e-3, warmup=50, schedule="wsd", cooldown=0.1, min_lr_ratio=0.1, batch_size=16, max_tokens=16384,
                  weight_decay=0.1, grad_clip=1.0, targets="outputs", augment=True, dtype="bfloat16")
LOADER_FIELDS = ("batch_size", "max_tokens", "targets", "augment", "permute_background")


def parse_arm(text: str) -> tuple[str, dict, dict]:
    """``name[:field=value,...]`` -> (name, ModelConfig overrides, TrainConfig overrides)."""
    name, _, rest = text.partition(":")
    model_hints = {f.name: f for f in dataclasses.fields(ModelConfig)}
    train_hints = {f.name: f for f in dataclasses.fields(TrainConfig)}
    model, train = {}, {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key in model_hints:
            model[key] = config.parse_value(ModelConfig, key, value)
        elif key in train_hints:
            train[key] = config.parse_value(TrainConfig, key, value)
        else:
            raise SystemExit(f"--arm {text}: {key!r} is not a ModelConfig or TrainConfig field")
    return name, model, train


def held_out_pairs(tasks: list[Task], max_seq_len: int):
    """(prompt, answer, rule) of every test pair, prompts encoded as the solver encodes them."""
    out = []
    for task in tasks:
        for pair in task.test:
            out.append((encode_prompt(task.demos, pair.input, block_size=max_seq_len), pair.output, task.source.split(":", 1)[1]))
    return out


def score(model: HybridLM, pairs, device: torch.device) -> dict:
    """Exact-match share overall and per rule, and token accuracy, on held-out pairs."""
    model.eval()
    forced = teacher_forced(model, [p for p, _, _ in pairs], [a for _, a, _ in pairs], device, batch=32)
    model.train()
    per_rule: dict[str, list[bool]] = {}
    for f, (_, _, rule) in zip(forced, pairs):
        per_rule.setdefault(rule, []).append(f.exact)
    return {
        "exact": float(np.mean([np.mean(v) for v in per_rule.values()])),  # mean over rules (balanced)
        "token_acc": sum(f.correct_tokens for f in forced) / sum(f.tokens for f in forced),
        "per_rule": {r: float(np.mean(v)) for r, v in sorted(per_rule.items())},
    }


def miss_kind(answer: np.ndarray, test_input: np.ndarray, truth: np.ndarray) -> str:
    """What a greedy answer is: ``right``; ``map <name>`` when it is exactly a rotation/reflection of
    the test input (arc.augment.DIHEDRAL_NAMES; ``identity`` = the input copied) but not the truth;
    ``shape`` when it has the truth's shape, other cells; ``wrong shape`` otherwise."""
    if answer.shape == truth.shape and np.array_equal(answer, truth):
        return "right"
    for k, name in enumerate(DIHEDRAL_NAMES):
        mapped = dihedral(test_input, k)
        if mapped.shape == answer.shape and np.array_equal(mapped, answer):
            return f"map {name}"
    return "shape" if answer.shape == truth.shape else "wrong shape"


def error_table(tasks: list[Task], preds) -> list[str]:
    """Markdown rows, one per rule: how many greedy answers of each :func:`miss_kind`, and the mean
    share of cells right among the answers of the right shape that are not right."""
    kinds: dict[str, Counter] = {}
    cells: dict[str, list[float]] = {}
    for task, pred in zip(tasks, preds):
        rule = task.source.split(":", 1)[1]
        for pair, attempts in zip(task.test, pred.tests):
            answer = attempts.attempt_1
            kind = miss_kind(answer, pair.input, pair.output)
            kinds.setdefault(rule, Counter())[kind] += 1
            if kind == "shape":
                cells.setdefault(rule, []).append(float((answer == pair.output).mean()))
    lines = ["| rule | answers | right | right shape, other cells (mean cells right) | a rotation/reflection of the input | wrong shape |",
             "|---|---|---|---|---|---|"]
    for rule in sorted(kinds):
        k = kinds[rule]
        maps = ", ".join(f"{name[4:]} {n}" for name, n in sorted(k.items()) if name.startswith("map "))
        near = cells.get(rule, [])
        lines.append(f"| {rule} | {sum(k.values())} | {k['right']} | {k['shape']}"
                     + (f" ({100 * np.mean(near):.0f}%)" if near else "") + f" | {maps or '-'} | {k['wrong shape']} |")
    return lines


def parse_first(text: str | None, rules: list[str]) -> tuple[list[str], float] | None:
    """``--first RULES@M`` -> (rules, M): train on those rules alone for the first M million tokens."""
    if not text:
        return None
    names, at, million = text.rpartition("@")
    first = CURRICULA.get(names, names.split(",")) if at else []
    unknown = sorted(set(first) - set(rules))
    try:
        m = float(million)
    except ValueError:
        m = -1.0
    if not at or not first or unknown or m <= 0:
        raise SystemExit(f"--first {text!r}: expected RULES@MILLIONS with RULES among the curriculum's "
                         f"({'not in it: ' + ', '.join(unknown) if unknown else 'e.g. flip_h,flip_v@2'})")
    return first, m


def run_arm(name: str, model_cfg: ModelConfig, train_cfg: TrainConfig, train_tasks: list[Task], pairs,
            budgets: list[float], device: torch.device, log, first: tuple[list[str], float] | None = None,
            plan: float = 0.0) -> list[dict]:
    """Train one arm, scoring it at each budget (millions of tokens); the learning-rate schedule is
    planned for ``max(plan, max(budgets))`` million tokens, so a run stopped early (``--plan``) reads
    the same curve as a longer one up to its last budget."""
    torch.manual_seed(train_cfg.seed)
    model = HybridLM(model_cfg).to(device)
    loader = ArcDataLoader(train_tasks, block_size=model_cfg.max_seq_len, train=True, seed=train_cfg.seed,
                           **{k: getattr(train_cfg, k) for k in LOADER_FIELDS})
    first_loader = None
    if first is not None:  # a staged curriculum: some rules alone first, then the whole curriculum
        subset = [t for t in train_tasks if t.source.split(":", 1)[1] in first[0]]
        first_loader = ArcDataLoader(subset, block_size=model_cfg.max_seq_len, train=True, seed=train_cfg.seed,
                                     **{k: getattr(train_cfg, k) for k in LOADER_FIELDS})
        log(f"[{name}] the first {first[1]:g}M tokens on {','.join(first[0])} alone ({len(subset)} tasks)")
    probe = ArcDataLoader(train_tasks, block_size=model_cfg.max_seq_len, train=True, seed=train_cfg.seed + 1,
                          **{k: getattr(train_cfg, k) for k in LOADER_FIELDS})
    per_batch = np.mean([int((probe.next_batch().x != PAD).sum()) for _ in range(20)])
    steps = math.ceil(max(plan, *budgets) * 1e6 / per_batch)
    cfg = dataclasses.replace(train_cfg, steps=steps)  # the schedule is planned for the largest budget (or --plan)
    optimizer = make_optimizer(model, cfg, device)
    rows, tokens, t0, next_budget, losses = [], 0, time.time(), 0, []
    log(f"[{name}] {model.num_params() / 1e6:.2f}M parameters, ~{per_batch:.0f} real tokens per step, {steps} steps planned")
    step = 0
    while next_budget < len(budgets):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(min(step, steps - 1), cfg)
        source = first_loader if first_loader is not None and tokens < first[1] * 1e6 else loader
        x, y, pos = source.next_batch().to(device)
        with autocast_for(cfg.dtype, device):
            logits, _ = model(x, pos=pos)
        loss = mean_loss(logits, y)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        tokens += int((x != PAD).sum())
        step += 1
        if not math.isfinite(losses[-1]):
            log(f"[{name}] diverged at step {step}")
            break
        while next_budget < len(budgets) and tokens >= budgets[next_budget] * 1e6:
            result = score(model, pairs, device)
            row = {"arm": name, "budget_M": budgets[next_budget], "tokens": tokens, "step": step,
                   "seconds": round(time.time() - t0, 1), "train_loss": float(np.mean(losses[-20:])), **result}
            rows.append(row)
            log(f"[{name}] {budgets[next_budget]:g}M tokens (step {step}, {row['seconds']:.0f} s): exact {result['exact']:.1%}, "
                f"token acc {result['token_acc']:.1%}, loss {row['train_loss']:.3f}")
            next_budget += 1
    return rows, model


def plot(rows: list[dict], path: str, title: str) -> None:
    """Exact match and token accuracy on the held-out tasks against training tokens, one line per arm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "exact", "exact match (%)"), (axes[1], "token_acc", "answer-token accuracy (%)")):
        for arm in dict.fromkeys(r["arm"] for r in rows):
            pts = [r for r in rows if r["arm"] == arm]
            ax.plot([r["tokens"] / 1e6 for r in pts], [100 * r[key] for r in pts], marker="o", label=arm)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training tokens (millions, real)")
        ax.set_ylabel(f"held-out {label}")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--curriculum", default="flip_h", help=f"a rule, comma-separated rules, or one of {sorted(CURRICULA)}")
    p.add_argument("--budgets", default="0.25,0.5,1,2", help="training-token budgets in millions, comma-separated")
    p.add_argument("--arm", action="append", default=[], help="name[:field=value,...] (ModelConfig/TrainConfig fields); repeat")
    p.add_argument("--tasks", type=int, default=4000, help="synthetic training tasks (augmented every epoch)")
    p.add_argument("--held-out", type=int, default=200, help="fresh held-out tasks")
    p.add_argument("--seed", type=int, default=1337, help="training data and weights; held-out tasks use seed + 1000")
    p.add_argument("--check", type=int, default=24, help="held-out tasks re-solved by greedy decoding to check the metric")
    p.add_argument("--errors", type=int, default=0,
                   help="after training, break the greedy answers of the first N held-out tasks down per rule: right, "
                        "right shape (mean cells right), a rotation/reflection of the input, wrong shape")
    p.add_argument("--json", default=None, help="write every row to this JSON file")
    p.add_argument("--md", default=None, help="append the markdown table to this file")
    p.add_argument("--plot", default=None, help="write the curves to this PNG")
    p.add_argument("--first", default=None, metavar="RULES@M",
                   help="staged curriculum: train on these of the curriculum's rules alone for the first M million "
                        "tokens, then on all of them (held-out tasks are always the whole curriculum's)")
    p.add_argument("--plan", type=float, default=0.0, metavar="M",
                   help="plan the learning-rate schedule for M million tokens (default: the largest budget) and stop at "
                        "the largest budget: the first budgets of a longer run's curve at a fraction of its cost")
    p.add_argument("--save", default=None, help="save each arm's final model to DIR/<arm>.pt (arc.checkpoint format)")
    args = p.parse_args()

    rules = CURRICULA.get(args.curriculum, args.curriculum.split(","))
    budgets = sorted(float(b) for b in args.budgets.split(","))
    arms = [parse_arm(a) for a in (args.arm or ["base"])]
    first = parse_first(args.first, rules)
    if args.plan and args.plan < max(budgets):
        raise SystemExit(f"--plan {args.plan:g} is below the largest budget {max(budgets):g}: the schedule would be planned "
                         "for the budget anyway (drop --plan, or plan at least as far as the last budget)")
    device = torch.device("cpu")
    train_tasks = make_tasks(args.tasks, seed=args.seed, rules=rules)
    held = make_tasks(args.held_out, seed=args.seed + 1000, rules=rules)
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"{time.time() - t_start:7.0f}s {msg}", flush=True)

    rows: list[dict] = []
    checks, errors = [], []
    for name, model_over, train_over in arms:
        model_cfg = ModelConfig(**{**BASE_MODEL, **model_over})
        train_cfg = TrainConfig(**{**BASE_TRAIN, "seed": args.seed, **train_over})
        pairs = held_out_pairs(held, model_cfg.max_seq_len)
        arm_rows, model = run_arm(name, model_cfg, train_cfg, train_tasks, pairs, budgets, device, log, first, args.plan)
        rows += arm_rows
        if args.save:
            checkpoint.save_atomic({"model": model.state_dict(), "model_config": model_cfg.to_dict(),
                                    "train_config": config.to_dict(train_cfg)}, Path(args.save) / f"{name}.pt")
        sample = held[: max(args.check, args.errors)]
        # float32 decoding, as teacher_forced reads: the check compares the two metrics, not two precisions
        preds = solve_tasks(model.eval(), sample, SolveConfig(views=1, batch=8, dtype="float32"), device=device,
                            progress=False)
        if args.errors:
            errors.append((name, error_table(sample[: args.errors], preds[: args.errors])))
        greedy = [c for pred in preds[: args.check] for c in pred.correct]
        forced = [f.exact for f in teacher_forced(model, [q for q, _, _ in pairs[: len(greedy)]],
                                                   [a for _, a, _ in pairs[: len(greedy)]], device)]
        checks.append((name, sum(g == f for g, f in zip(greedy, forced)), len(greedy), sum(greedy)))
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "base_model": BASE_MODEL, "base_train": BASE_TRAIN,
                                                   "rows": rows, "errors": dict(errors)}, indent=1))

    command = "python bench/bench_learn.py " + " ".join(
        [f"--curriculum {args.curriculum}", f"--budgets {args.budgets}", f"--tasks {args.tasks}", f"--held-out {args.held_out}"]
        + ([f"--seed {args.seed}"] if args.seed != 1337 else []) + ([f"--plan {args.plan:g}"] if args.plan else [])
        + ([f"--first {args.first}"] if args.first else [])
        + ([f"--errors {args.errors}"] if args.errors else []) + [f"--arm {a}" for a in args.arm])
    lines = [header(command),
             f"Curriculum: {', '.join(rules)} ({args.tasks} training tasks, {args.held_out} fresh held-out tasks). "
             f"Base model {BASE_MODEL}; base training {BASE_TRAIN}. Exact match = share of held-out test outputs "
             f"greedy decoding writes exactly (teacher-forced under the decoder's mask), mean over rules.", "",
             "| arm | " + " | ".join(f"{b:g}M" for b in budgets) + " | wall s | loss |",
             "|---|" + "---|" * (len(budgets) + 2)]
    for name, _, _ in arms:
        pts = {r["budget_M"]: r for r in rows if r["arm"] == name}
        cells = [f"{100 * pts[b]['exact']:.1f}%" if b in pts else "-" for b in budgets]
        last = pts[max(pts)] if pts else None
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {last['seconds'] if last else '-'} | "
                     f"{last['train_loss']:.3f} |" if last else f"| {name} | diverged |")
    lines.append("")
    lines += [f"Check against greedy decoding (arc.solve.solve_tasks, 1 view) on {n} held-out test inputs, arm {name}: "
              f"{agree}/{n} agree ({solved} solved)." for name, agree, n, solved in checks]
    for name, table in errors:
        lines += ["", f"Greedy answers on the first {min(args.errors, len(held))} held-out tasks after training, arm {name}:",
                  ""] + table
    if len(rules) > 1:
        lines += ["", "Per rule at the largest budget: " + "; ".join(
            f"{r['arm']}: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["per_rule"].items())
            for r in rows if r["budget_M"] == budgets[-1])]
    if args.plot:
        plot(rows, args.plot, f"learning curves: {args.curriculum}")
        lines.append(f"\n![learning curves: {args.curriculum}]({Path(args.plot).name})")
    emit("\n".join(lines), args.md)


if __name__ == "__main__":
    main()
