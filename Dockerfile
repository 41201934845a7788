# GPU image: CUDA 12.4 + PyTorch 2.5.1 (the devel variant carries nvcc, which mamba-ssm and
# causal-conv1d need to compile their kernels against this exact torch).
#   docker build -t arc-hybrid .
#   docker run --gpus all -it --rm -v "$PWD/runs:/app/runs" arc-hybrid python train.py --preset gpu
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel

# Ampere (8.0, 8.6) and Hopper (9.0); narrow this to your card to build faster.
ENV TORCH_CUDA_ARCH_LIST="8.0;8.6;9.0" \
    MAX_JOBS=8 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY arc ./arc
# torch is already in the image and satisfies the project's range, so pip keeps it; the kernels
# build against it (--no-build-isolation), which is why they are installed in a second step.
RUN pip install -e ".[dev]" \
 && pip install --no-build-isolation "causal-conv1d>=1.4.0" "mamba-ssm>=2.2.4"
COPY . .
CMD ["python", "train.py", "--preset", "gpu"]
