# Worker image: the model code with PyTorch, run by the launcher (one worker process per device).
# One file, two variants:
#   CUDA (default):  docker build -f docker/worker.Dockerfile .
#   CPU:             docker build -f docker/worker.Dockerfile --build-arg TORCH_FLAVOR=cpu .
# PyTorch's CUDA wheels carry their own CUDA libraries: the host needs only the NVIDIA driver and
# the NVIDIA container toolkit. torch comes from PyTorch's index for TORCH_FLAVOR, or from a wheel of
# that flavor in docker/wheels/ (machines without that index; see docker/wheels/README.md).
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_FLAVOR=cu128
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# A C compiler and libc's headers: torch.compile (SD_COMPILE, on by default on CUDA) has Triton build
# small C launchers at run time, against Python's headers (which the python image carries).
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 sdserve
WORKDIR /app

# dependency layers first, cached apart from the source: torch (large, rarely changes), then the rest.
# A local wheel stays in its COPY layer (the legacy builder has no RUN --mount): only machines
# without PyTorch's index pay that.
COPY docker/wheels/ /tmp/wheels/
RUN if ls /tmp/wheels/torch-"${TORCH_VERSION}+${TORCH_FLAVOR}"-*.whl >/dev/null 2>&1; then \
      pip install --find-links /tmp/wheels "torch==${TORCH_VERSION}+${TORCH_FLAVOR}"; \
    else \
      pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_FLAVOR}"; \
    fi
# only its dependency list is read: README.md, which changes often, stays out of this layer
COPY pyproject.toml ./
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
# one worker process per device (SD_DEVICES), restarted when one crashes
CMD ["python", "-m", "workers.launcher"]
