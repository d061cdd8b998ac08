#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what bench/gpu_run.sh needs on the GPU machine and does not find
# there: diffusers, the Redis client, RQ, pydantic (+ their missing dependencies) as Python 3.12
# wheels, and Debian 12's redis-server with its two libraries as .debs. ~11 MB; run in the repo root
# on the development machine, before `run(command="bash bench/gpu_run.sh", carry=[".whl"], ...)`.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl/debs
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0 zipp==4.1.2 \
    redis==8.1.0 rq==2.12.0 croniter==7.0.0 pydantic==2.14.4 pydantic-core==2.50.5 \
    pydantic-settings==2.16.3 annotated-types==0.8.0 typing-extensions==4.16.0 \
    typing-inspection==0.4.5 python-dotenv==1.2.4
debs="redis-tools libjemalloc2 liblzf1 libatomic1"
(cd .whl/debs && { apt-get download $debs 2>/dev/null || { apt-get update -qq && apt-get download $debs; }; })
ls -la .whl .whl/debs
du -sh .whl
