# longctx training image. `docker run --gpus all --ipc=host IMAGE attention=transformer_xl ...` takes
# train.py's arguments (docs/cluster.md). torch, CUDA, cuDNN and NCCL come from the base image and stay:
# the install step is the README's, after its `pip install torch==...`, constrained to the base's torch.
# Another base: docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:<yy.mm>-py3 .
# Its torch must be at least the floor in pyproject.toml (2.8: the GPU kernels' FlexAttention and
# dynamo APIs); scripts/gpu_check.sh checks a GPU image end to end.
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.9-cudnn9-runtime
FROM ${BASE_IMAGE}

# Offline by default, like the CLI: wandb writes offline-run-* into the run directory, and nothing
# reaches the Hugging Face hub (run with -e HF_HUB_OFFLINE=0 -e HF_DATASETS_OFFLINE=0 to download).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WANDB_MODE=offline \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    MPLBACKEND=Agg \
    HF_HOME=/app/data/cache/huggingface
# Any uid may run the image (`docker run --user "$(id -u):$(id -g)"`), without a passwd entry or
# a writable home: torch.compile's inductor and triton caches, matplotlib's and wandb's settings go
# to /tmp, and USER answers getpass.getuser() (on the base image's torch, inductor's default cache
# folder asks the user database, which has no entry for such a uid).
ENV TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    TRITON_CACHE_DIR=/tmp/triton \
    XDG_CACHE_HOME=/tmp/cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    WANDB_CONFIG_DIR=/tmp/wandb \
    USER=longctx
# The tokenizers library's thread pool must stay off in DataLoader workers forked after it ran.
# DL3064 takes the TOKEN in this name for a secret; the variable is a switch.
# hadolint ignore=DL3064
ENV TOKENIZERS_PARALLELISM=false

WORKDIR /app

# The package alone first: changing configs or entry points then reuses the installed dependencies.
COPY pyproject.toml README.md ./
COPY longctx/ longctx/
# PIP_CONSTRAINT pins torch to the base image's build: a dependency that wanted another torch
# would fail the build instead of replacing the CUDA build with a download from PyPI.
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/base-torch.txt \
    && PIP_CONSTRAINT=/tmp/base-torch.txt pip install -e ".[dev]" \
    && rm /tmp/base-torch.txt

COPY conf/ conf/
COPY data/ data/
COPY train.py eval.py generate.py export.py ./

# Runs as an unprivileged user; outputs/ and data/cache/ are where runs write (mount them to keep results).
# A high id that no base image uses for its own accounts (Ubuntu's images take 1000).
RUN groupadd --gid 10001 longctx \
    && useradd --create-home --uid 10001 --gid 10001 longctx \
    && mkdir -p outputs data/cache \
    && chown -R 10001:10001 outputs data/cache
USER 10001:10001

ENTRYPOINT ["python", "train.py"]
