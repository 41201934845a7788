"""Training benchmarks on CPU (or GPU): throughput against the seed, memory against batch size,
and step time against sequence length.

    python bench/bench_train.py throughput [--steps 6] [--md docs/BENCHMARKS.md]
    python bench/bench_train.py memory     [--batches 1,2,4,8] [--md ...]
    python bench/bench_train.py length     [--lengths 512,1024,2048,4096] [--md ...]
    python bench/bench_train.py mfu        [--preset gpu] [--length 4096] [--batch 8] [--peak-tflops X] [--md ...]

throughput  real (non-PAD) training tokens per second on ARC-AGI-1 training data, end to end
            (batch building, forward, backward, AdamW step), of
              ours: ArcDataLoader (length buckets, batches capped at --max-tokens) + the default hybrid
              seed: every sequence padded to 4096, random batches, an attention-only GPT (with MLP)
                    of about the same parameter count,
            measured one after the other in the same process; the ratio is the figure.
memory      peak memory of one training step (forward + backward + AdamW) of the default model at
            sequences of 4096 tokens for each batch size, each in a fresh subprocess (CPU: peak RSS;
            GPU: max allocated), without accumulation (B sequences in one micro-batch) and with it
            (B micro-batches of one sequence).
length      forward+backward time of one sequence of length L for the hybrid, a pure-Mamba2 and a
            pure-attention model of equal width and depth, in one process.
mfu         training tokens/s and model FLOPs utilization of a preset (default ``gpu``) on full-length
            sequences, bf16 autocast and fused AdamW on CUDA, once with the Mamba2 kernels and once
            forced onto the pure-PyTorch reference path, in one process. MFU = FLOPs/token
            (HybridLM.estimate_flops_per_token) x tokens/s / peak; the peak is --peak-tflops, or the
            dense bf16 peak of a known GPU (H100/H200 SXM: 989 TFLOP/s; A100: 312). On a CPU the
            reference path alone is timed in fp32 and MFU is printed only with --peak-tflops.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time

import torch

from common import emit, header
from arc.data import load_tasks
from arc.loader import ArcDataLoader
from arc.model import HybridLM, ModelConfig, preset
from arc.tokens import PAD
from arc.loss import autocast_for, loss_sum


def seed_gpt(target_params: int) -> ModelConfig:
    """An attention-only GPT (gated MLP 2x width) of the default width with about target_params."""
    best = None
    for n_layer in range(1, 24):
        cfg = preset("cpu", layer_pattern="A", n_layer=n_layer, mlp_hidden=2 * preset("cpu").d_model)
        n = HybridLM(cfg).num_params()
        if best is None or abs(n - target_params) < abs(best[1] - target_params):
            best = (cfg, n)
    return best[0]


def train_steps(model: HybridLM, loader: ArcDataLoader, steps: int, device: torch.device) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    real = padded = 0
    x, y, _ = loader.next_batch()  # warm-up step, not timed
    loss = loss_sum(model(x.to(device))[0], y.to(device))
    loss.backward()
    opt.step()
    opt.zero_grad()
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y, _ = loader.next_batch()
        x, y = x.to(device), y.to(device)
        logits, _ = model(x)
        (loss_sum(logits, y) / (y != -100).sum().clamp(min=1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        real += int((x != PAD).sum())
        padded += x.numel()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"real_tok_s": real / dt, "padded_tok_s": padded / dt, "real_share": real / padded, "s_per_step": dt / steps}


def cmd_throughput(args) -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tasks = load_tasks("arc1", "train")
    torch.manual_seed(0)
    ours_cfg = preset("cpu")
    ours = HybridLM(ours_cfg).to(device)
    gpt_cfg = seed_gpt(ours.num_params())
    gpt = HybridLM(gpt_cfg).to(device)
    runs = {
        "ours: length buckets + hybrid": (ours, ArcDataLoader(tasks, batch_size=16, max_tokens=args.max_tokens, seed=0)),
        "seed: pad to 4096 + attention GPT": (gpt, ArcDataLoader(tasks, batch_size=args.max_tokens // 4096, seed=0,
                                                                bucket=False, pad_to_block=True)),
    }
    res = {name: train_steps(m, ld, args.steps, device) for name, (m, ld) in runs.items()}
    base = res["seed: pad to 4096 + attention GPT"]["real_tok_s"]
    lines = [header(f"python bench/bench_train.py throughput --steps {args.steps} --max-tokens {args.max_tokens}"),
             f"Both take {args.max_tokens} padded tokens per step. Ours: {ours.num_params() / 1e6:.2f}M parameters "
             f"(layout {ours_cfg.layer_kinds}); seed GPT: {gpt.num_params() / 1e6:.2f}M ({gpt_cfg.n_layer} attention layers, "
             f"gated MLP {gpt_cfg.mlp_hidden}). {args.steps} timed steps each after one warm-up step.", "",
             "| setup | real tokens/s | padded tokens/s | real share | s/step | speed-up |", "|---|---|---|---|---|---|"]
    for name, r in res.items():
        lines.append(f"| {name} | {r['real_tok_s']:,.0f} | {r['padded_tok_s']:,.0f} | {r['real_share']:.1%} | "
                     f"{r['s_per_step']:.2f} | **{r['real_tok_s'] / base:.2f}x** |")
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
            logits, _ = model(x)
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
    models = {"hybrid (MMMA)": "MMMA", "pure Mamba2 (M)": "M", "pure attention (A)": "A"}
    torch.manual_seed(0)
    res: dict[str, list[float]] = {}
    for name, pattern in models.items():
        model = HybridLM(preset("cpu", layer_pattern=pattern))
        times = []
        for L in lengths:
            x = torch.randint(0, 10, (1, L))
            best = float("inf")
            for _ in range(args.repeats + 1):  # the first is a warm-up
                t0 = time.perf_counter()
                logits, _ = model(x)
                loss_sum(logits, x).backward()
                best = min(best, time.perf_counter() - t0)
            times.append(best)
        res[name] = times
    lines = [header(f"python bench/bench_train.py length --lengths {args.lengths} --repeats {args.repeats}"),
             "Forward+backward of one sequence (B=1), d_model 256, 8 layers, best of the repeats. "
             f"Growth = time(L) / time({lengths[0]}) (linear would be L/{lengths[0]}).", "",
             "| model | " + " | ".join(f"L={L}" for L in lengths) + f" | growth {lengths[0]}->{lengths[-1]} |",
             "|---|" + "---|" * (len(lengths) + 1)]
    for name, times in res.items():
        lines.append(f"| {name} | " + " | ".join(f"{t:.3f} s" for t in times) + f" | {times[-1] / times[0]:.1f}x |")
    lines.append(f"| (linear) | | | | | {lengths[-1] / lengths[0]:.1f}x |" if len(lengths) == 4 else "")
    return "\n".join(lines)


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def time_training(model: HybridLM, batch: int, length: int, steps: int, device: torch.device) -> float:
    """Seconds per optimizer step on random full-length sequences (after two warm-up steps)."""
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    x = torch.randint(0, 10, (batch, length), device=device)
    y = torch.randint(0, 10, (batch, length), device=device)
    t0 = 0.0
    for i in range(steps + 2):
        if i == 2:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with autocast_for("auto", device):
            logits, _ = model(x)
        (loss_sum(logits, y) / y.numel()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def cmd_mfu(args) -> str:
    from arc import kernels

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = HybridLM(preset(args.preset, max_seq_len=max(args.length, 4096))).to(device)
    flops = model.estimate_flops_per_token(args.length)
    peak = peak_tflops(device, args.peak_tflops)
    paths = [("reference (pure PyTorch)", True)]
    if device.type == "cuda":
        paths.insert(0, ("kernels" if kernels.KERNELS.available else f"kernels unavailable ({kernels.KERNELS.reason}): reference", False))
    lines = [header(f"python bench/bench_train.py mfu --preset {args.preset} --length {args.length} --batch {args.batch} --steps {args.steps}"),
             f"Preset `{args.preset}`: {model.num_params() / 1e6:.2f}M parameters, {flops / 1e6:.1f} MFLOPs per training token at "
             f"L={args.length}; batch {args.batch}; {'bf16 autocast, fused AdamW' if device.type == 'cuda' else 'fp32 on CPU'}; "
             f"peak {'%g TFLOP/s' % peak if peak else 'unknown (pass --peak-tflops)'}.", "",
             "| Mamba2 path | s/step | tokens/s | achieved TFLOP/s | MFU |", "|---|---|---|---|---|"]
    for name, forced in paths:
        with kernels.reference_path() if forced else contextlib.nullcontext():
            sec = time_training(model, args.batch, args.length, args.steps, device)
        tok_s = args.batch * args.length / sec
        achieved = flops * tok_s / 1e12
        mfu = f"{achieved / peak:.1%}" if peak else "n/a"
        lines.append(f"| {name} | {sec:.3f} | {tok_s:,.0f} | {achieved:.2f} | {mfu} |")
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
    m = sub.add_parser("memory", help="peak memory vs batch size at 4096")
    m.add_argument("--batches", default="1,2,4,8", help="batch sizes")
    ln = sub.add_parser("length", help="step time vs sequence length")
    ln.add_argument("--lengths", default="512,1024,2048,4096", help="sequence lengths")
    ln.add_argument("--repeats", type=int, default=2, help="timed repeats per length (best is kept)")
    f = sub.add_parser("mfu", help="tokens/s and MFU of a preset, kernel vs reference path")
    f.add_argument("--preset", default="gpu", help="model preset")
    f.add_argument("--length", type=int, default=4096, help="sequence length")
    f.add_argument("--batch", type=int, default=8, help="sequences per step")
    f.add_argument("--steps", type=int, default=10, help="timed steps per path")
    f.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s of the device (default: known GPUs' bf16 peak)")
    for s in (t, m, ln, f):
        s.add_argument("--md", default=None, help="append the markdown result to this file")
    args = p.parse_args()
    text = {"throughput": cmd_throughput, "memory": cmd_memory, "length": cmd_length, "mfu": cmd_mfu}[args.cmd](args)
    emit(text, args.md)


if __name__ == "__main__":
    main()
