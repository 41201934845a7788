"""Train the GPT/Mamba hybrid on ARC tasks (or text), from scratch.

Laptop CPU (the default CPU-sized hybrid on the bundled ARC-AGI-1 training tasks):
    python train.py
    python train.py --preset smoke --out runs/smoke          # a tiny model, a few steps, < 1 minute
One GPU (bf16 autocast, fused Mamba kernels when mamba-ssm is installed):
    python train.py --preset gpu --out runs/gpu
Several GPUs (DDP; gloo on CPU processes works too):
    torchrun --standalone --nproc_per_node 4 train.py --preset gpu --out runs/gpu4
Resume an interrupted run exactly where its latest checkpoint left it (an --out that holds a run
is refused without --resume, or --overwrite to start it afresh):
    python train.py --preset cpu --out runs/cpu --resume
Other data: --data arc2 | path/to/tasks/ | path/to/x_challenges.json | synthetic:5000 | text:input.txt
(comma-separate ARC sources to combine them). Plot runs: python -m arc.plot runs/a runs/b --out loss.png
"""
import argparse
import logging
import sys

from arc import config
from arc.model import ModelConfig, preset as model_preset
from arc.trainer import PRESETS, OverlapError, TrainConfig, TrainingDiverged, run


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, ModelConfig]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                        help="a model size plus training settings; other flags override it (default: cpu)")
    config.add_flags(parser, TrainConfig, "training")
    config.add_flags(parser, ModelConfig, "model")
    args = parser.parse_args(argv)
    model_name, model_defaults, train_defaults = PRESETS[args.preset]
    train_cfg = TrainConfig(**{**train_defaults, **config.given(args, TrainConfig)})
    model_cfg = ModelConfig.from_dict({**model_preset(model_name, **model_defaults).to_dict(), **config.given(args, ModelConfig)})
    return train_cfg, model_cfg


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        train_cfg, model_cfg = parse_args(argv)
        result = run(train_cfg, model_cfg)
    except (OverlapError, TrainingDiverged, ValueError, FileNotFoundError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    print(f"done: {result.step} steps, last loss {result.losses[-1] if result.losses else float('nan'):.4f}, "
          f"val loss {result.val_loss if result.val_loss is not None else float('nan'):.4f}; checkpoints in {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
