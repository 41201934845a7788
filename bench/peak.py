"""The machine's peak matrix-multiply rate, the yardstick of every MFU figure in ``bench/``.

On a CPU the peak is *measured* in the same process as the figures it judges: the best rate of a
few large matrix products in float32 and in bfloat16 on all of torch's threads, over a few seconds
(:func:`measure_peak`). Measuring beats a spec sheet here: the matrix units a CPU has (AVX-512,
AVX-512-BF16, AMX) and the clock it holds under load differ from machine to machine, and a VM
shares its cores. On a GPU the peak is the spec sheet's dense bf16 figure (a measured matmul on a
GPU falls well short of it, and the spec sheet is what published MFU figures use).

MFU = model FLOPs per token (``HybridLM.estimate_flops_per_token``) x tokens/s / peak FLOP/s.
The benches report it against the peak of the dtype the run used *and* against the machine's best
peak (on a CPU with bf16 units, the bf16 one): the second says how much of the machine is used.

    python bench/peak.py               # prints this machine's peaks (about 8 seconds)
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

# bench scripts run from a checkout: its arc/ wins over an installed copy (common.py imports this first)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from arc.loss import matmul_rate  # noqa: E402

# (m, k, n) of the timed products: shapes of the cpu preset's projections and a few square ones;
# the best of them is the peak.
PEAK_SHAPES = ((2048, 256, 1024), (4096, 512, 512), (1024, 1024, 1024), (2048, 2048, 2048))

# Dense bf16 tensor-core peaks from the vendors' spec sheets, TFLOP/s (no sparsity).
GPU_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0,
                   "L4": 121.0, "RTX 4090": 165.0}


@dataclass(frozen=True)
class Peak:
    """Peak FLOP/s per dtype on one device (None where unknown) and where the numbers come from."""

    float32: float | None
    bfloat16: float | None
    source: str

    def of(self, dtype: str) -> float | None:
        """The peak of ``dtype`` ('float32' or 'bfloat16')."""
        return {"float32": self.float32, "bfloat16": self.bfloat16}[dtype]

    @property
    def best(self) -> float | None:
        known = [v for v in (self.float32, self.bfloat16) if v]
        return max(known) if known else None

    def describe(self) -> str:
        def tf(v: float | None) -> str:
            return "unknown" if not v else f"{v / 1e12:.3g} TFLOP/s" if v >= 1e12 else f"{v / 1e9:.0f} GFLOP/s"

        return f"peak matmul: float32 {tf(self.float32)}, bfloat16 {tf(self.bfloat16)} ({self.source})"


def measure_peak(device: torch.device | str = "cpu", seconds: float = 4.0, given_tflops: float | None = None) -> Peak:
    """This device's peak: measured on a CPU (``seconds`` split over the dtypes and shapes, best
    rate kept), the spec sheet's dense bf16 figure on a known GPU, or ``given_tflops`` if set
    (taken as the peak of both dtypes)."""
    device = torch.device(device)
    if given_tflops is not None:
        return Peak(given_tflops * 1e12, given_tflops * 1e12, "given on the command line")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tflops = next((v for k, v in GPU_BF16_TFLOPS.items() if k in name), None)
        return Peak(None, tflops * 1e12 if tflops else None, f"spec-sheet dense bf16 of {name}" if tflops else
                    f"{name}: not in the spec-sheet table, pass --peak-tflops")
    per = seconds / (2 * len(PEAK_SHAPES))
    rates = {dt: max(matmul_rate(getattr(torch, dt), shape, per, device) for shape in PEAK_SHAPES)
             for dt in ("float32", "bfloat16")}
    return Peak(rates["float32"], rates["bfloat16"],
                f"measured in this process: best of {len(PEAK_SHAPES)} products on {torch.get_num_threads()} threads")


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float | None) -> float | None:
    """Model FLOP utilisation: the share of ``peak_flops`` the model's FLOPs per token at this rate
    amount to (None when the peak is unknown)."""
    return flops_per_token * tokens_per_s / peak_flops if peak_flops else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seconds", type=float, default=8.0, help="time spent measuring, over both dtypes and all shapes")
    args = p.parse_args()
    print(measure_peak(args.device, args.seconds).describe())


if __name__ == "__main__":
    main()
