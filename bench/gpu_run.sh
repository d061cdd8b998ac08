#!/usr/bin/env bash
# The one command a GPU session runs, through the device tool:
#
#   run(command="bash bench/gpu_run.sh", carry=[".whl"], timeout_s=560)
#
# (docs/benchmarks.md, "Prepared, not yet run", has the runs prepared next with their exact
# commands, GPU_RUN_* and GPU_BENCH_ARGS set, and how long each takes.)
#
# It needs .whl/ (git-ignored, ~11 MB) prepared on the development machine first, in the repo root:
# `bash bench/gpu_wheels.sh`, which runs exactly these two downloads:
#
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#      diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0 zipp==4.1.2 \
#      redis==8.1.0 rq==2.12.0 croniter==7.0.0 pydantic==2.14.4 pydantic-core==2.50.5 \
#      pydantic-settings==2.16.3 annotated-types==0.8.0 typing-extensions==4.16.0 \
#      typing-inspection==0.4.5 python-dotenv==1.2.4
#   mkdir -p .whl/debs && (cd .whl/debs && apt-get download redis-tools libjemalloc2 liblzf1 libatomic1)
#
# (the GPU machine has torch, transformers, safetensors, numpy, pillow, pytest, but no diffusers,
# no Redis client or server, no RQ, no pydantic; the debs are Debian 12's redis-server 7.0.)
#
# What it does, all output in $OUT/gpu_run.log (the tail also comes back in the reply):
#   1. installs the wheels into /tmp/site (PYTHONPATH), unpacks redis-server into /tmp/redis;
#   2. prints the card, driver, torch and package versions;
#   3. runs the CUDA tests of the fast path (tests/models/test_accel.py, CPU ones too);
#   4. runs bench/gpu.py (SD 1.5, 512x512, 50 steps: ours vs diffusers at batch 1/4/8/16, the
#      compiled UNet call's kernels by kind, finer CUDA-graph buckets, the engine with its PNG/decode
#      tail, a real worker, ablations) -> $OUT/gpu_bench.json, $OUT/gpu_bench.md;
#   5. if time is left: bench/models_bench.py on the GPU (ours against diffusers per image, with
#      peak memory) -> $OUT/models_bench.json.
# The whole run keeps within GPU_RUN_DEADLINE_S (default 500 s); optional stages are skipped first.
# GPU_RUN_TESTS=0 skips step 3 (=after: runs it last, time permitting); GPU_BENCH_ARGS adds
# arguments to bench/gpu.py (a shorter rerun).
# On a machine without CUDA, GPU_RUN_QUICK=1 runs the same script with bench/gpu.py --quick (a check).

set -u
START=$(date +%s)
DEADLINE_S=${GPU_RUN_DEADLINE_S:-500}
QUICK=${GPU_RUN_QUICK:-0}
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu-run-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_run.log") 2>&1
export PYTHONUNBUFFERED=1

elapsed() { echo $(($(date +%s) - START)); }
left() { echo $((DEADLINE_S - $(elapsed))); }
step() { printf '\n=== [%4d s] %s\n' "$(elapsed)" "$*"; }

step "wheels -> /tmp/site"
if ls .whl/*.whl >/dev/null 2>&1; then
    if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "installing the wheels FAILED: no diffusers, engine or worker stages"
    fi
else
    echo "no .whl/ carried (see this script's header): no diffusers, engine or worker stages"
fi

step "redis-server"
if ! command -v redis-server >/dev/null && ls .whl/debs/*.deb >/dev/null 2>&1; then
    mkdir -p /tmp/redis/bin
    for deb in .whl/debs/*.deb; do dpkg -x "$deb" /tmp/redis; done
    ln -sf redis-check-rdb /tmp/redis/usr/bin/redis-server # one binary; argv[0] picks the mode
    # its libraries only for redis itself, not for Python
    printf '#!/bin/sh\nLD_LIBRARY_PATH=/tmp/redis/usr/lib/x86_64-linux-gnu exec /tmp/redis/usr/bin/redis-server "$@"\n' \
        >/tmp/redis/bin/redis-server
    chmod +x /tmp/redis/bin/redis-server
    export PATH=/tmp/redis/bin:$PATH
fi
redis-server --version || echo "no working redis-server: the worker stage will fail, the rest goes on"

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.limit \
    --format=csv 2>/dev/null || echo "no nvidia-smi"
$PY - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(torch.cuda.get_device_name(0), f"| {p.total_memory / 2**30:.0f} GiB | {p.multi_processor_count} SMs | cc {p.major}.{p.minor}")
for name in ("transformers", "diffusers", "redis", "rq", "pydantic", "pydantic_settings", "triton"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:
        print(name, "MISSING:", error)
EOF

cuda_tests() {
    step "CUDA tests of the fast path (tests/models/test_accel.py, test_sampler_decode.py)"
    timeout "$1" $PY -m pytest tests/models/test_accel.py tests/models/test_sampler_decode.py -q -p no:cacheprovider -rs --durations=5 ||
        echo "CUDA TESTS FAILED (exit $?)"
}

if [ "${GPU_RUN_TESTS:-1}" = 1 ]; then
    cuda_tests 150
else
    step "CUDA tests not run first (GPU_RUN_TESTS=${GPU_RUN_TESTS:-1})"
fi

step "bench/gpu.py ($(left) s left)"
if [ "$QUICK" = 1 ]; then
    BENCH_ARGS=(--quick --no-slow-ablations)
else
    BENCH_ARGS=()
fi
# extra arguments for bench/gpu.py, e.g. GPU_BENCH_ARGS="--skip worker --ablations default compile"
read -r -a EXTRA_ARGS <<<"${GPU_BENCH_ARGS:-}"
BENCH_ARGS+=("${EXTRA_ARGS[@]}")
# gpu.py skips optional stages past its budget; the timeout is the backstop (results are saved
# after every stage, so a kill loses only the stage in progress)
timeout $(($(left) - 15)) $PY bench/gpu.py --budget-s $(($(left) - 60)) --out "$OUT" "${BENCH_ARGS[@]}" ||
    echo "bench/gpu.py exited with $?"

if [ "$QUICK" != 1 ] && [ "$(left)" -gt 170 ]; then
    step "bench/models_bench.py, SD 1.5 float16: ours against diffusers per image, peak memory"
    timeout $(($(left) - 10)) $PY bench/models_bench.py --configs sd15 --size 512 --steps 50 \
        --device cuda --dtype float16 --repeats 3 --json "$OUT/models_bench.json" ||
        echo "models_bench exited with $?"
else
    step "bench/models_bench.py skipped ($(left) s left)"
fi

# GPU_RUN_TESTS=after: the CUDA tests once the bench is done, if 90 s are left
if [ "${GPU_RUN_TESTS:-1}" = after ]; then
    if [ "$(left)" -gt 90 ]; then cuda_tests $(($(left) - 10)); else step "CUDA tests skipped ($(left) s left)"; fi
fi

nvidia-smi --query-gpu=clocks.sm,temperature.gpu,memory.used --format=csv 2>/dev/null
step "done; files in $OUT:"
ls -la "$OUT"
[ -f "$OUT/gpu_bench.md" ] && cat "$OUT/gpu_bench.md"
