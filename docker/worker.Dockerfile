# Worker image: the model code with PyTorch. One file, two variants:
#   CUDA (default):  docker build -f docker/worker.Dockerfile .
#   CPU:             docker build -f docker/worker.Dockerfile --build-arg TORCH_FLAVOR=cpu .
# PyTorch's CUDA wheels carry their own CUDA libraries: the host needs only the NVIDIA driver and
# the NVIDIA container toolkit.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_FLAVOR=cu128
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

RUN useradd --create-home --uid 10001 sdserve
WORKDIR /app

# dependency layers first, cached apart from the source: torch (large, rarely changes), then the rest
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_FLAVOR}"
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(d for d in tomllib.load(open('pyproject.toml','rb'))['project']['dependencies'] if not d.startswith('torch')))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

COPY schemas/ schemas/
COPY models/ models/
COPY workers/ workers/
ENV PYTHONPATH=/app SD_CACHE_DIR=/home/sdserve/.cache/sdserve TORCHINDUCTOR_CACHE_DIR=/cache/inductor
# torch.compile's kernels (SD_COMPILE): compose mounts a volume here, so a restarted worker reuses
# them instead of compiling again (the folder exists, owned by the worker's user, for the volume to
# take its ownership)
RUN mkdir -p /cache/inductor && chown -R sdserve /cache

USER sdserve
CMD ["python", "-m", "workers.main"]
