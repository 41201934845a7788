"""Training benchmarks on CPU (or GPU): throughput against the seed, memory against batch size,
and step time against sequence length.

    python bench/bench_train.py throughput [--steps 6] [--dtypes float32,bfloat16] [--compile --warmup 4] [--md docs/BENCHMARKS.md]
    python bench/bench_train.py memory     [--batches 1,2,4,8] [--md ...]
    python bench/bench_train.py length     [--lengths 512,1024,2048,4096] [--dtype auto] [--md ...]
    python bench/bench_train.py mfu        [--preset gpu] [--length 4096] [--batch 8] [--peak-tflops X] [--md ...]

Every throughput figure comes with its model FLOP utilisation (MFU): the model's FLOPs per token
(HybridLM.estimate_flops_per_token) x tokens/s against the machine's peak, measured at the start of
the run on a CPU (bench/peak.py), the spec sheet's dense bf16 peak on a GPU.

throughput  real (non-PAD) training tokens per second on ARC-AGI-1 training data, end to end
            (batch building, forward, backward, AdamW step), of
              ours: ArcDataLoader (length buckets, batches capped at --max-tokens) + the default hybrid
              seed: every sequence padded to 4096, random batches, an attention-only GPT (with MLP)
                    of about the same parameter count,
            each in float32 and under bf16 autocast, the arms' steps interleaved in one process (a
            shared machine slows all alike); the figure is the ratio of each setup in its best dtype.
            MFU counts the FLOPs of real tokens only (padding is work done for nothing).
memory      peak memory of one training step (forward + backward + AdamW) of the default model at
            sequences of 4096 tokens for each batch size, each in a fresh subprocess (CPU: peak RSS;
            GPU: max allocated), without accumulation (B sequences in one micro-batch) and with it
            (B micro-batches of one sequence).
length      forward+backward time of one sequence of length L for the hybrid, a pure-Mamba2 and a
            pure-attention model of equal width and depth, in one process, with each one's MFU.
mfu         training tokens/s and model FLOPs utilization of a preset (default ``gpu``; ``cpu`` on a
            CPU) on sequences of --length, once on the Mamba2 path arc/kernels.py picks (the fused
            kernels on CUDA, the fast chunked SSD on a CPU) and once forced onto the plain
            reference path, in each of --dtypes (default: bf16 autocast and fused AdamW on CUDA;
            float32 and bf16 autocast on a CPU), steps interleaved in one process. The peak is
            --peak-tflops, the dense bf16 peak of a known GPU (H100/H200 SXM: 989 TFLOP/s; A100:
            312), or on a CPU the peak measured at the start.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

from common import emit, header, load_note, mfu_cell, peak_for, timing_pos  # first: puts the checkout's arc/ first
from arc import kernels
from arc.data import load_tasks
from arc.loader import ArcDataLoader
from arc.model import HybridLM, ModelConfig, preset
from arc.tokens import PAD
from arc.compiling import compile_model, compile_seconds
from arc.loss import autocast_for, loss_sum, resolve_dtype


def seed_gpt(target_params: int) -> ModelConfig:
    """An attention-only GPT (gated MLP 2x width) of the default width with about target_params."""
    best = None
    for n_layer in range(1, 24):
        cfg = preset("cpu", layer_pattern="A", n_layer=n_layer, mlp_hidden=2 * preset("cpu").d_model)
        n = HybridLM(cfg).num_params()
        if best is None or abs(n - target_params) < abs(best[1] - target_params):
            best = (cfg, n)
    return best[0]


@dataclass
class Arm:
    """One setup of the throughput race: a model, its loader and optimizer, a dtype, and its tally."""

    model: HybridLM
    loader: ArcDataLoader
    dtype: str
    opt: torch.optim.Optimizer = field(init=False)
    real: int = 0
    padded: int = 0
    flops: float = 0.0  # model FLOPs of the real tokens
    seconds: float = 0.0
    steps: int = 0

    compiled: bool = False  # run the forward through torch.compile(model)
    run: torch.nn.Module = field(init=False)

    def __post_init__(self) -> None:
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        device = next(self.model.parameters()).device
        self.run = compile_model(self.model, device) if self.compiled else self.model  # as train.py --compile

    def step(self, device: torch.device, timed: bool = True) -> None:
        """One optimizer step, end to end: the batch is built inside the timed region."""
        t0 = time.perf_counter()
        x, y, pos = self.loader.next_batch().to(device)
        with autocast_for(self.dtype, device):
            logits, _ = self.run(x, pos=pos)
        (loss_sum(logits, y) / (y != -100).sum().clamp(min=1)).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if timed:
            real = int((x != PAD).sum())
            self.seconds += time.perf_counter() - t0
            self.real += real
            self.padded += x.numel()
            self.flops += real * self.model.estimate_flops_per_token(x.shape[1])
            self.steps += 1


def cmd_throughput(args) -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = peak_for(device, given_tflops=args.peak_tflops)
    tasks = load_tasks("arc1", "train")
    torch.manual_seed(0)
    ours_cfg = preset("cpu")
    gpt_cfg = seed_gpt(HybridLM(ours_cfg).num_params())
    setups = {"ours: length buckets + hybrid": ours_cfg, "seed: pad to 4096 + attention GPT": gpt_cfg}
    arms: dict[tuple[str, str], Arm] = {}
    for name, cfg in setups.items():
        for dtype in args.dtypes.split(","):
            torch.manual_seed(0)  # each arm: the same weights and batches as its twin in the other dtype
            loader = (ArcDataLoader(tasks, batch_size=16, max_tokens=args.max_tokens, seed=0) if name.startswith("ours")
                      else ArcDataLoader(tasks, batch_size=args.max_tokens // 4096, seed=0, bucket=False, pad_to_block=True))
            arms[(name, dtype)] = Arm(HybridLM(cfg).to(device), loader, dtype, compiled=args.compile)
    for _ in range(args.warmup):
        for arm in arms.values():
            arm.step(device, timed=False)  # warm-up (with --compile: the compiles, until the shapes are dynamic)
    compile_s = compile_seconds() if args.compile else 0.0
    order = list(arms.values())
    for r in range(args.steps):  # interleaved: every arm's r-th step before any arm's (r+1)-th
        for arm in order[r % len(order):] + order[:r % len(order)]:
            arm.step(device)

    def best_of(name: str) -> Arm:
        return max((a for (n, _), a in arms.items() if n == name), key=lambda a: a.real / a.seconds)

    base = best_of("seed: pad to 4096 + attention GPT")
    base_rate = base.real / base.seconds
    ours = HybridLM(ours_cfg)
    flags = f" --warmup {args.warmup}" + (" --compile" if args.compile else "")
    lines = [header(f"python bench/bench_train.py throughput --steps {args.steps} --max-tokens {args.max_tokens} --dtypes {args.dtypes}{flags}"),
             f"{kernels.describe()}. {peak.describe()}.", "",
             *([f"torch.compile on every arm: {compile_s:.0f} s of compiling in the {args.warmup} untimed warm-up rounds, "
                f"{compile_seconds() - compile_s:.0f} s more in the timed steps.", ""] if args.compile else []),
             f"Both take {args.max_tokens} padded tokens per step. Ours: {ours.num_params() / 1e6:.2f}M parameters "
             f"(layout {ours_cfg.layer_kinds}); seed GPT: {HybridLM(gpt_cfg).num_params() / 1e6:.2f}M ({gpt_cfg.n_layer} attention "
             f"layers, gated MLP {gpt_cfg.mlp_hidden}). {args.steps} timed steps per arm after {args.warmup} warm-up step(s), the arms "
             "interleaved. MFU: model FLOPs of the real tokens against the best peak (and the run dtype's peak).", "",
             "| setup | dtype | real tokens/s | padded tokens/s | real share | s/step | MFU | vs the seed's best |",
             "|---|---|---|---|---|---|---|---|"]
    for (name, dtype), a in arms.items():
        rate = a.real / a.seconds
        mark = "**" if a is best_of(name) else ""
        lines.append(f"| {name} | {dtype} | {rate:,.0f} | {a.padded / a.seconds:,.0f} | {a.real / a.padded:.1%} | "
                     f"{a.seconds / a.steps:.2f} | {mfu_cell(a.flops / a.real, rate, peak, dtype)} | {mark}{rate / base_rate:.2f}x{mark} |")
    lines += ["", f"Bold: each setup in its best dtype. {load_note()} at the end."]
    return "\n".join(lines)


def _one_memory_step(batch: int, accumulate: bool) -> dict:
    """Run in a subprocess: one optimizer step at sequences of 4096, report peak memory."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = HybridLM(preset("cpu")).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    micro = [(1, batch)] if not accumulate else [(batch, 1)]
    for repeats, b in micro:
        for _ in range(repeats):
            x = torch.randint(0, 10, (b, 4096), device=device)
            logits, _ = model(x, pos=timing_pos(model, x))
            loss_sum(logits, x).backward()
    opt.step()
    dt = time.perf_counter() - t0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mb": peak, "baseline_mb": before / 1024, "seconds": dt}


def cmd_memory(args) -> str:
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for b in batches:
        row = [b]
        for acc in (False, True):
            out = subprocess.run([sys.executable, __file__, "_memory", str(b), str(int(acc))], capture_output=True, text=True)
            if out.returncode != 0:
                row.append(None)
                print(out.stderr[-2000:], file=sys.stderr)
                continue
            row.append(json.loads(out.stdout.strip().splitlines()[-1]))
        rows.append(row)
    unit = "GPU max allocated" if torch.cuda.is_available() else "CPU peak RSS (process, incl. ~0.4 GB of torch itself)"
    lines = [header(f"python bench/bench_train.py memory --batches {args.batches}"),
             f"Default model (`cpu` preset), sequences of 4096 tokens, one optimizer step. Peak = {unit}.", "",
             "| batch size | peak, one micro-batch of B | s | peak, B micro-batches of 1 (accumulation) | s |",
             "|---|---|---|---|---|"]
    for b, plain, acc in rows:
        fmt = lambda r: ("failed (out of memory?)", "-") if r is None else (f"{r['peak_mb'] / 1024:.2f} GiB", f"{r['seconds']:.1f}")
        lines.append(f"| {b} | {' | '.join(fmt(plain))} | {' | '.join(fmt(acc))} |")
    return "\n".join(lines)


def cmd_length(args) -> str:
    lengths = [int(x) for x in args.lengths.split(",")]
    device = torch.device("cpu")
    dtype = resolve_dtype(args.dtype, device)
    peak = peak_for(device, given_tflops=args.peak_tflops)
    models = {"hybrid (MMMA)": "MMMA", "pure Mamba2 (M)": "M", "pure attention (A)": "A"}
    torch.manual_seed(0)
    built = {name: HybridLM(preset("cpu", layer_pattern=pattern)) for name, pattern in models.items()}
    res: dict[str, list[float]] = {name: [] for name in models}
    for L in lengths:
        x = torch.randint(0, 10, (1, L))
        best = {name: float("inf") for name in models}
        for r in range(args.repeats + 1):  # the first round is a warm-up; models interleaved
            for name, model in built.items():
                t0 = time.perf_counter()
                with autocast_for(dtype, device):
                    logits, _ = model(x, pos=timing_pos(model, x))
                loss_sum(logits, x).backward()
                model.zero_grad(set_to_none=True)
                if r:
                    best[name] = min(best[name], time.perf_counter() - t0)
        for name in models:
            res[name].append(best[name])
    lines = [header(f"python bench/bench_train.py length --lengths {args.lengths} --repeats {args.repeats} --dtype {args.dtype}"),
             f"{kernels.describe()}. {peak.describe()}.", "",
             f"Forward+backward of one sequence (B=1), d_model 256, 8 layers, {dtype}, best of the repeats, models "
             f"interleaved; (MFU against the best peak). Growth = time(L) / time({lengths[0]}) (linear would be L/{lengths[0]}).", "",
             "| model | " + " | ".join(f"L={L}" for L in lengths) + f" | growth {lengths[0]}->{lengths[-1]} |",
             "|---|" + "---|" * (len(lengths) + 1)]
    for name, times in res.items():
        model = built[name]
        cells = [f"{t:.3f} s ({mfu_cell(model.estimate_flops_per_token(L), L / t, peak, dtype).split(' ')[0]})"
                 for t, L in zip(times, lengths)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {times[-1] / times[0]:.1f}x |")
    lines.append(f"| (linear) | | | | | {lengths[-1] / lengths[0]:.1f}x |" if len(lengths) == 4 else "")
    return "\n".join(lines)


def cmd_mfu(args) -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    preset_name = args.preset or ("gpu" if cuda else "cpu")
    dtypes = args.dtypes.split(",") if args.dtypes else (["bfloat16"] if cuda else ["float32", "bfloat16"])
    peak = peak_for(device, given_tflops=args.peak_tflops)
    torch.manual_seed(0)
    model = HybridLM(preset(preset_name, max_seq_len=max(args.length, 4096))).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    flops = model.estimate_flops_per_token(args.length)
    picked = "kernels" if cuda and kernels.KERNELS.available else ("fast chunked SSD" if not cuda else
                                                                   f"kernels unavailable ({kernels.KERNELS.reason}): reference")
    arms = [(path, forced, dtype) for path, forced in ((picked, False), ("reference (plain PyTorch)", True)) for dtype in dtypes]
    x = torch.randint(0, 10, (args.batch, args.length), device=device)
    y = torch.randint(0, 10, (args.batch, args.length), device=device)

    def one_step(forced: bool, dtype: str) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with kernels.reference_path() if forced else contextlib.nullcontext():
            with autocast_for(dtype, device):
                logits, _ = model(x, pos=timing_pos(model, x))
            (loss_sum(logits, y) / y.numel()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    seconds = {arm: [] for arm in arms}
    for r in range(args.steps + 2):  # two warm-up rounds, arms interleaved
        for arm in arms[r % len(arms):] + arms[:r % len(arms)]:
            sec = one_step(arm[1], arm[2])
            if r >= 2:
                seconds[arm].append(sec)
    lines = [header(f"python bench/bench_train.py mfu --preset {preset_name} --length {args.length} --batch {args.batch} "
                    f"--steps {args.steps}" + (f" --dtypes {args.dtypes}" if args.dtypes else "")),
             f"{kernels.describe()}. {peak.describe()}.", "",
             f"Preset `{preset_name}`: {model.num_params() / 1e6:.2f}M parameters, {flops / 1e6:.1f} MFLOPs per training token at "
             f"L={args.length}; batch {args.batch}; AdamW{' (fused)' if cuda else ''}; the same weights and batch in every arm "
             f"(arms interleaved, median of {args.steps} steps).", "",
             "| Mamba2 path | dtype | s/step | tokens/s | achieved TFLOP/s | MFU |", "|---|---|---|---|---|---|"]
    for (name, _, dtype), secs in seconds.items():
        sec = sorted(secs)[len(secs) // 2]
        tok_s = args.batch * args.length / sec
        lines.append(f"| {name} | {dtype} | {sec:.3f} | {tok_s:,.0f} | {flops * tok_s / 1e12:.3f} | {mfu_cell(flops, tok_s, peak, dtype)} |")
    lines += ["", f"{load_note()} at the end."]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_memory":  # the subprocess of `memory`
        print(json.dumps(_one_memory_step(int(sys.argv[2]), bool(int(sys.argv[3])))))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("throughput", help="real tokens/s: ours vs the seed")
    t.add_argument("--steps", type=int, default=6, help="timed steps per setup")
    t.add_argument("--max-tokens", type=int, default=16384, help="padded tokens per step for both setups")
    t.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes each setup runs in (bfloat16 = autocast)")
    t.add_argument("--compile", action="store_true", help="torch.compile every arm's model (compile time reported)")
    t.add_argument("--warmup", type=int, default=1, help="untimed steps per arm first (with --compile: 4 lets the shapes go dynamic)")
    m = sub.add_parser("memory", help="peak memory vs batch size at 4096")
    m.add_argument("--batches", default="1,2,4,8", help="batch sizes")
    ln = sub.add_parser("length", help="step time vs sequence length")
    ln.add_argument("--lengths", default="512,1024,2048,4096", help="sequence lengths")
    ln.add_argument("--repeats", type=int, default=2, help="timed repeats per length (best is kept)")
    ln.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="float32, bf16 autocast, or auto (arc.loss.resolve_dtype)")
    f = sub.add_parser("mfu", help="tokens/s and MFU of a preset, kernel vs reference path")
    f.add_argument("--preset", default=None, help="model preset (default: gpu on CUDA, cpu on a CPU)")
    f.add_argument("--length", type=int, default=4096, help="sequence length")
    f.add_argument("--batch", type=int, default=8, help="sequences per step")
    f.add_argument("--steps", type=int, default=10, help="timed steps per path")
    f.add_argument("--dtypes", default=None, help="comma-separated dtypes (default: bfloat16 on CUDA, float32,bfloat16 on CPU)")
    for s in (t, ln, f):
        s.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s (default: measured on CPU, spec sheet on GPU)")
    for s in (t, m, ln, f):
        s.add_argument("--md", default=None, help="append the markdown result to this file")
    args = p.parse_args()
    text = {"throughput": cmd_throughput, "memory": cmd_memory, "length": cmd_length, "mfu": cmd_mfu}[args.cmd](args)
    emit(text, args.md)


if __name__ == "__main__":
    main()
