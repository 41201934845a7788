"""Speed and memory of one sequence-mixing layer, and decoding cost per token, on this machine.

Part 1, training: forward + backward time and peak memory of one layer (d_model 256) at each
length and batch size: our Mamba2 mixer (arc/mamba2.py, the path arc/kernels.py picks: the
pure-PyTorch chunked SSD on a CPU), a causal attention layer of the same width (arc/model.py,
SDPA + rotary), and ``mambapy``'s pure-PyTorch Mamba (one layer, parallel scan). Times are reported
as ratios against attention measured in the same run. Each (layer, L, B) runs in its own
subprocess; its peak memory is the growth of the process's peak resident set (ru_maxrss) during the
timed iterations over what the layer and its inputs already held (CPU), or
``torch.cuda.max_memory_allocated`` growth (GPU).

Part 2, decoding: milliseconds per generated token after prompts of 128..4096 tokens, for a stack
of Mamba2 layers and a stack of attention layers (``HybridLM.prefill`` then ``HybridLM.step``).
A Mamba2 layer's step should cost the same whatever the prompt length.

Run (prints markdown; --out appends it to a file)::

    python bench/bench_layers.py                                  # laptop / 2-core CPU, ~4 minutes
    python bench/bench_layers.py --skip-mambapy-above 8192        # leave out mambapy's slowest runs
    python bench/bench_layers.py --device cuda --lengths 1024 4096 16384 --batches 1 8   # one GPU
    python bench/bench_layers.py --out docs/bench_layers.md

There is nothing distributed to measure here: run it on one process (no torchrun).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from arc import kernels  # noqa: E402
from arc.mamba2 import Mamba2  # noqa: E402
from arc.model import CausalSelfAttention, HybridLM, ModelConfig  # noqa: E402

LAYERS = ("attention", "mamba2", "mambapy")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to measure")
    g.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096], help="sequence lengths L")
    g.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="batch sizes B")
    g.add_argument("--layers", nargs="+", default=list(LAYERS), choices=LAYERS, help="layers to time")
    g.add_argument("--skip-mambapy-above", type=int, default=0,
                   help="skip mambapy when B*L exceeds this many tokens (0 = never skip); it is the slowest")
    g.add_argument("--decode-lengths", type=int, nargs="*", default=[128, 512, 1024, 2048, 4096],
                   help="prompt lengths for the decoding table (none: skip it)")
    g.add_argument("--decode-layers", type=int, default=4, help="layers in each decoding stack")
    g.add_argument("--decode-steps", type=int, default=64, help="generated tokens timed per prompt length")
    g = p.add_argument_group("the layers")
    g.add_argument("--d-model", type=int, default=256, help="width of every layer")
    g.add_argument("--d-state", type=int, default=64, help="Mamba2 state size (mambapy keeps its default 16)")
    g.add_argument("--headdim", type=int, default=64, help="Mamba2 head dim")
    g.add_argument("--chunk-size", type=int, default=64, help="Mamba2 SSD chunk length")
    g.add_argument("--n-head", type=int, default=4, help="attention heads")
    g = p.add_argument_group("how")
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    g.add_argument("--repeats", type=int, default=3, help="timed forward+backward passes (median reported)")
    g.add_argument("--warmup", type=int, default=1, help="untimed passes first")
    g.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    g.add_argument("--out", type=Path, default=None, help="append the markdown to this file")
    g.add_argument("--worker", nargs=3, metavar=("LAYER", "L", "B"), default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_layer(name: str, args: argparse.Namespace) -> torch.nn.Module:
    if name == "mamba2":
        return Mamba2(args.d_model, d_state=args.d_state, headdim=args.headdim, chunk_size=args.chunk_size)
    if name == "attention":
        return CausalSelfAttention(args.d_model, args.n_head, max(args.lengths), 10000.0, 0.0)
    from mambapy.mamba import Mamba, MambaConfig
    return Mamba(MambaConfig(d_model=args.d_model, n_layers=1))


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(args: argparse.Namespace) -> dict:
    """One (layer, L, B) in this process: median forward+backward seconds and peak memory growth."""
    name, length, batch = args.worker[0], int(args.worker[1]), int(args.worker[2])
    device = torch.device(args.device)
    torch.manual_seed(0)
    layer = build_layer(name, args).to(device)
    x = torch.randn(batch, length, args.d_model, device=device, requires_grad=True)

    def once() -> None:
        out = layer(x)
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()
        layer.zero_grad(set_to_none=True)
        x.grad = None

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = peak_bytes(device)
    for _ in range(args.warmup):
        once()
    times = []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        once()
        sync()
        times.append(time.perf_counter() - t0)
    return {"layer": name, "L": length, "B": batch, "s": statistics.median(times), "peak_mb": (peak_bytes(device) - base) / 2**20}


def run_worker(args: argparse.Namespace, name: str, length: int, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, str(length), str(batch), "--device", args.device,
           "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--d-model", str(args.d_model), "--d-state", str(args.d_state), "--headdim", str(args.headdim),
           "--chunk-size", str(args.chunk_size), "--n-head", str(args.n_head),
           "--lengths", *map(str, args.lengths)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench worker {name} L={length} B={batch} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def decode_ms_per_token(kind: str, prompt_len: int, args: argparse.Namespace) -> float:
    cfg = ModelConfig(d_model=args.d_model, n_layer=args.decode_layers, layer_pattern=kind, d_state=args.d_state,
                      headdim=args.headdim, chunk_size=args.chunk_size, n_head=args.n_head,
                      max_seq_len=prompt_len + args.decode_steps + 1)
    torch.manual_seed(0)
    model = HybridLM(cfg).to(args.device).eval()
    prompt = torch.randint(0, cfg.vocab_size, (prompt_len,), device=args.device)
    with torch.inference_mode():
        cache, logits = model.prefill([prompt], args.decode_steps + 1)
        token = logits.argmax(-1)
        logits = model.step(token, cache)  # warm-up step
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.decode_steps):
            logits = model.step(logits.argmax(-1), cache)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    return (time.perf_counter() - t0) / args.decode_steps * 1e3


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args)))
        return

    started = time.time()
    lines = [
        f"Machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPU cores visible, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, device {args.device}. "
        f"{kernels.describe()}.",
        "",
        "Command: `" + " ".join(["python bench/bench_layers.py", *(sys.argv[1:] if argv is None else argv)]) + "`",
        "",
        f"### Forward + backward of one layer, d_model {args.d_model} (median of {args.repeats}, after {args.warmup} warm-up)",
        "",
        f"Mamba2: d_state {args.d_state}, headdim {args.headdim}, expand 2, chunk {args.chunk_size}. Attention: "
        f"{args.n_head} heads, SDPA causal + rotary. mambapy: Mamba (v1) layer, d_state 16, parallel scan. "
        "Peak = growth of peak memory during the passes.",
        "",
        "| L | B | attention s | Mamba2 s | mambapy s | Mamba2 / attention | mambapy / Mamba2 | attention MB | Mamba2 MB | mambapy MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for length in args.lengths:
        for batch in args.batches:
            res = {}
            for name in args.layers:
                if name == "mambapy" and args.skip_mambapy_above and batch * length > args.skip_mambapy_above:
                    continue
                res[name] = run_worker(args, name, length, batch)

            def cell(name: str, key: str, fmt: str) -> str:
                return format(res[name][key], fmt) if name in res else "skipped"

            def ratio(a: str, b: str) -> str:
                return f"{res[a]['s'] / res[b]['s']:.2f}x" if a in res and b in res else "-"

            row = (f"| {length} | {batch} | {cell('attention', 's', '.3f')} | {cell('mamba2', 's', '.3f')} | "
                   f"{cell('mambapy', 's', '.3f')} | {ratio('mamba2', 'attention')} | {ratio('mambapy', 'mamba2')} | "
                   f"{cell('attention', 'peak_mb', '.0f')} | {cell('mamba2', 'peak_mb', '.0f')} | {cell('mambapy', 'peak_mb', '.0f')} |")
            lines.append(row)
            print(row, flush=True)

    if args.decode_lengths:
        head = ["", f"### Decoding: ms per generated token after a prompt, {args.decode_layers}-layer stacks, d_model {args.d_model}, "
                f"batch 1 (mean of {args.decode_steps} steps)", "",
                "| prompt tokens | Mamba2 stack ms/token | attention stack ms/token | attention / Mamba2 |", "|---:|---:|---:|---:|"]
        lines += head
        print("\n".join(head), flush=True)
        for prompt_len in args.decode_lengths:
            m = decode_ms_per_token("M", prompt_len, args)
            a = decode_ms_per_token("A", prompt_len, args)
            row = f"| {prompt_len} | {m:.2f} | {a:.2f} | {a / m:.2f}x |"
            lines.append(row)
            print(row, flush=True)
    tail = ["", f"Total bench time {time.time() - started:.0f} s.", ""]
    lines += tail
    print("\n".join(tail), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
