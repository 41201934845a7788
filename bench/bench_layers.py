"""Speed and memory of one sequence-mixing layer, and decoding cost per token, on this machine.

Part 1, training: forward + backward time of one layer (d_model 256) at each length and batch
size, in float32 and under bf16 autocast: our Mamba2 mixer on the path arc/kernels.py picks (on a
CPU the fast chunked SSD), the same mixer forced onto the plain reference path
(``mamba2-ref``), a causal attention layer of the same width (arc/model.py, SDPA + rotary), and
``mambapy``'s pure-PyTorch Mamba (one layer, parallel scan; float32 only). All arms of one (L, B)
run in one process, interleaved round by round (a shared machine slows every arm alike), and the
best of the rounds is kept. Ratios compare each layer in its best dtype. MFU is the layer's FLOPs
(``HybridLM.estimate_flops_per_token`` of a one-layer model, less the output head) against the
machine's best peak matmul rate measured at the start (bench/peak.py).

Peak memory is measured separately, one subprocess per layer: the growth of the process's peak
resident set (ru_maxrss) during one forward+backward over what the layer and its inputs already
held (CPU), or ``torch.cuda.max_memory_allocated`` growth (GPU).

Part 2, decoding: milliseconds per generated token after prompts of 128..4096 tokens, for a stack
of Mamba2 layers and a stack of attention layers (``HybridLM.prefill`` then ``HybridLM.step``).
A Mamba2 layer's step should cost the same whatever the prompt length.

Run (prints markdown; --out appends it to a file)::

    python bench/bench_layers.py                                  # 2-core CPU, ~6 minutes
    python bench/bench_layers.py --lengths 512 1024 2048 4096 --batches 1 4 --layers attention mamba2 mamba2-ref
    python bench/bench_layers.py --device cuda --lengths 1024 4096 16384 --batches 1 8   # one GPU
    python bench/bench_layers.py --out docs/bench_layers.md

There is nothing distributed to measure here: run it on one process (no torchrun).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py (it puts the checkout's arc/ first)
from common import header, load_note, peak_for  # noqa: E402
from peak import mfu  # noqa: E402

from arc import kernels  # noqa: E402
from arc.mamba2 import Mamba2  # noqa: E402
from arc.model import CausalSelfAttention, HybridLM, ModelConfig  # noqa: E402

LAYERS = ("attention", "mamba2", "mamba2-ref", "mambapy")
DTYPES = ("float32", "bfloat16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to measure")
    g.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096], help="sequence lengths L")
    g.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="batch sizes B")
    g.add_argument("--layers", nargs="+", default=list(LAYERS), choices=LAYERS, help="layers to time")
    g.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES,
                   help="float32 and/or bf16 autocast (mambapy: float32 only)")
    g.add_argument("--skip-mambapy-above", type=int, default=8192,
                   help="skip mambapy when B*L exceeds this many tokens (0 = never skip); it is the slowest")
    g.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
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
    g.add_argument("--repeats", type=int, default=5, help="timed rounds over every arm (best kept)")
    g.add_argument("--warmup", type=int, default=1, help="untimed passes of each arm first")
    g.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    g.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: measured on CPU, spec sheet on GPU)")
    g.add_argument("--out", type=Path, default=None, help="append the markdown to this file")
    g.add_argument("--worker", nargs=4, metavar=("LAYER", "DTYPE", "L", "B"), default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_layer(name: str, args: argparse.Namespace, max_len: int) -> torch.nn.Module:
    if name in ("mamba2", "mamba2-ref"):
        return Mamba2(args.d_model, d_state=args.d_state, headdim=args.headdim, chunk_size=args.chunk_size)
    if name == "attention":
        return CausalSelfAttention(args.d_model, args.n_head, max_len, 10000.0, 0.0)
    from mambapy.mamba import Mamba, MambaConfig
    return Mamba(MambaConfig(d_model=args.d_model, n_layers=1))


def layer_flops_per_token(name: str, length: int, args: argparse.Namespace) -> float | None:
    """Training FLOPs per token of one layer, from the model's own estimate (None for mambapy)."""
    if name == "mambapy":
        return None
    kind = "A" if name == "attention" else "M"
    cfg = ModelConfig(d_model=args.d_model, n_layer=1, layer_pattern=kind, d_state=args.d_state, headdim=args.headdim,
                      chunk_size=args.chunk_size, n_head=args.n_head, max_seq_len=max(length, 1))
    model = HybridLM(cfg)
    return model.estimate_flops_per_token(length) - 6.0 * model.lm_head.weight.numel()


def one_pass(layer: torch.nn.Module, x: torch.Tensor, name: str, dtype: str) -> None:
    """Forward + backward of one layer; ``mamba2-ref`` on the plain reference path."""
    forced = kernels.reference_path() if name == "mamba2-ref" else contextlib.nullcontext()
    with forced, torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        out = layer(x)
    out = out[0] if isinstance(out, tuple) else out
    out.float().sum().backward()
    layer.zero_grad(set_to_none=True)
    x.grad = None


def time_arms(length: int, batch: int, arms: list[tuple[str, str]], args: argparse.Namespace) -> dict[tuple[str, str], float]:
    """Best forward+backward seconds of each (layer, dtype) arm, the arms interleaved round by round."""
    device = torch.device(args.device)
    layers = {}
    for name in {n for n, _ in arms}:
        torch.manual_seed(0)
        layers[name] = build_layer(name, args, length).to(device)
    x = torch.randn(batch, length, args.d_model, device=device, requires_grad=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for name, dtype in arms:
        for _ in range(args.warmup):
            one_pass(layers[name], x, name, dtype)
    best = {arm: float("inf") for arm in arms}
    for r in range(args.repeats):
        for name, dtype in arms[r % len(arms):] + arms[:r % len(arms)]:  # rotate the order every round
            sync()
            t0 = time.perf_counter()
            one_pass(layers[name], x, name, dtype)
            sync()
            best[(name, dtype)] = min(best[(name, dtype)], time.perf_counter() - t0)
    return best


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def memory_worker(args: argparse.Namespace) -> dict:
    """In a fresh process: peak memory growth of one forward+backward of one (layer, dtype, L, B)."""
    name, dtype, length, batch = args.worker[0], args.worker[1], int(args.worker[2]), int(args.worker[3])
    device = torch.device(args.device)
    torch.manual_seed(0)
    layer = build_layer(name, args, length).to(device)
    x = torch.randn(batch, length, args.d_model, device=device, requires_grad=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = peak_bytes(device)
    one_pass(layer, x, name, dtype)
    return {"peak_mb": (peak_bytes(device) - base) / 2**20}


def memory_of(args: argparse.Namespace, name: str, dtype: str, length: int, batch: int) -> float:
    cmd = [sys.executable, __file__, "--worker", name, dtype, str(length), str(batch), "--device", args.device,
           "--threads", str(args.threads), "--d-model", str(args.d_model), "--d-state", str(args.d_state),
           "--headdim", str(args.headdim), "--chunk-size", str(args.chunk_size), "--n-head", str(args.n_head)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker {name} {dtype} L={length} B={batch} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]


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
        print(json.dumps(memory_worker(args)))
        return

    started = time.time()
    device = torch.device(args.device)
    peak = peak_for(device, given_tflops=args.peak_tflops)
    command = " ".join(["python bench/bench_layers.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [
        header(command).rstrip("\n"), "", f"{kernels.describe()}. {peak.describe()}.", "",
        f"### Forward + backward of one layer, d_model {args.d_model} (best of {args.repeats} interleaved rounds, "
        f"after {args.warmup} warm-up)", "",
        f"Mamba2: d_state {args.d_state}, headdim {args.headdim}, expand 2, chunk {args.chunk_size}; `mamba2` is the "
        f"path arc/kernels.py picks, `mamba2-ref` the plain reference. Attention: {args.n_head} heads, SDPA causal + "
        "rotary. mambapy: Mamba (v1) layer, d_state 16, parallel scan, float32. Each layer in its best dtype "
        "(f32 = float32, bf16 = bf16 autocast); MFU against the best peak above. Peak = growth of peak memory "
        "during one pass, in that dtype.", "",
        "| L | B | attention s | Mamba2 s | Mamba2 ref s | mambapy s | **Mamba2 / attention** | Mamba2 ref / Mamba2 | "
        "mambapy / Mamba2 | attention MFU | Mamba2 MFU | attention MB | Mamba2 MB | mambapy MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    detail = ["", "All arms (seconds, best of the rounds):", "",
              "| L | B | " + " | ".join(f"{n} {d}" for n in args.layers for d in args.dtypes if n != "mambapy" or d == "float32") + " |",
              "|---:|---:|" + "---:|" * sum(1 for n in args.layers for d in args.dtypes if n != "mambapy" or d == "float32")]
    print("\n".join(lines), flush=True)
    short = {"float32": "f32", "bfloat16": "bf16"}
    for length in args.lengths:
        for batch in args.batches:
            arms = [(n, d) for n in args.layers for d in args.dtypes if n != "mambapy" or d == "float32"]
            if args.skip_mambapy_above and batch * length > args.skip_mambapy_above:
                arms = [a for a in arms if a[0] != "mambapy"]
            times = time_arms(length, batch, arms, args)
            best: dict[str, tuple[float, str]] = {}
            for (name, dtype), s in times.items():
                if name not in best or s < best[name][0]:
                    best[name] = (s, dtype)
            mem = {}
            if not args.no_memory:
                mem = {name: memory_of(args, name, dtype, length, batch) for name, (_, dtype) in best.items()}

            def cell(name: str) -> str:
                return f"{best[name][0]:.3f} ({short[best[name][1]]})" if name in best else "-"

            def ratio(a: str, b: str) -> str:
                return f"{best[a][0] / best[b][0]:.2f}x" if a in best and b in best else "-"

            def mfu_of(name: str) -> str:
                if name not in best:
                    return "-"
                flops = layer_flops_per_token(name, length, args)
                value = mfu(flops, batch * length / best[name][0], peak.best) if flops else None
                return "-" if value is None else f"{value:.1%}"

            def mb(name: str) -> str:
                return f"{mem[name]:.0f}" if name in mem else "-"

            row = (f"| {length} | {batch} | {cell('attention')} | {cell('mamba2')} | {cell('mamba2-ref')} | {cell('mambapy')} | "
                   f"**{ratio('mamba2', 'attention')}** | {ratio('mamba2-ref', 'mamba2')} | {ratio('mambapy', 'mamba2')} | "
                   f"{mfu_of('attention')} | {mfu_of('mamba2')} | {mb('attention')} | {mb('mamba2')} | {mb('mambapy')} |")
            lines.append(row)
            print(row, flush=True)
            detail.append(f"| {length} | {batch} | " + " | ".join(
                f"{times[(n, d)]:.3f}" if (n, d) in times else "-"
                for n in args.layers for d in args.dtypes if n != "mambapy" or d == "float32") + " |")
    lines += detail
    print("\n".join(detail), flush=True)

    if args.decode_lengths:
        head = ["", f"### Decoding: ms per generated token after a prompt, {args.decode_layers}-layer stacks, d_model {args.d_model}, "
                f"batch 1, float32 (mean of {args.decode_steps} steps)", "",
                "| prompt tokens | Mamba2 stack ms/token | attention stack ms/token | attention / Mamba2 |", "|---:|---:|---:|---:|"]
        lines += head
        print("\n".join(head), flush=True)
        for prompt_len in args.decode_lengths:
            m = decode_ms_per_token("M", prompt_len, args)
            a = decode_ms_per_token("A", prompt_len, args)
            row = f"| {prompt_len} | {m:.2f} | {a:.2f} | {a / m:.2f}x |"
            lines.append(row)
            print(row, flush=True)
    tail = ["", f"Total bench time {time.time() - started:.0f} s; {load_note()} at the end.", ""]
    lines += tail
    print("\n".join(tail), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
