#!/usr/bin/env bash
# `make test-compose`: the compose deployment really run, on the CPU profile (opt-in: it builds the
# images, ~1 GB of downloads the first time, and takes minutes).
#
#   1. base images: scripts/docker_base_images.sh builds stand-ins where Docker Hub cannot be reached;
#   2. torch's CPU wheel: when pip finds torch==$TORCH_VERSION+cpu on this machine (e.g. a local
#      find-links folder), it is copied into docker/wheels/ for the build (PyTorch's index otherwise);
#   3. builds the images and starts redis, api, janitor and worker-cpu under a project name of its own,
#      on a free port (or SD_COMPOSE_PORT), with a random Redis password;
#   4. waits until every healthcheck is healthy;
#   5. the README's curl flow against the published port: POST /v1/txt2img, poll GET /v1/jobs/ID,
#      fetch the PNG;
#   6. restarts the worker container while a job runs: the job still succeeds (the worker drains on
#      SIGTERM, or the janitor retries the job) and the worker comes back healthy;
#   7. always, even on failure: removes its containers, networks and volumes, the wheel it copied, and
#      the images it built that were not there before (SD_COMPOSE_KEEP_IMAGES=1 keeps them, for a
#      faster next run).
#
# Needs docker (a running daemon), docker compose or docker-compose, curl, python3; root and
# debootstrap only where stand-ins must be built.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PORT=${SD_COMPOSE_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
HEALTHY_TIMEOUT_S=${SD_COMPOSE_HEALTHY_TIMEOUT_S:-600}
JOB_TIMEOUT_S=${SD_COMPOSE_JOB_TIMEOUT_S:-300}
PROJECT=sdserve-compose-test-$$
URL=http://127.0.0.1:$PORT
IMAGES=(sdserve-api:latest sdserve-worker:cpu)
START_S=$SECONDS

say() { echo "[test-compose +$((SECONDS - START_S))s] $*"; }
fail() { say "FAILED: $*"; exit 1; }

if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then
    COMPOSE=(docker-compose)
else
    fail "neither 'docker compose' nor docker-compose is installed"
fi
docker info >/dev/null 2>&1 || fail "no Docker daemon answers (start dockerd)"
# the CPU profile alone, whatever .env says; a password of this run's own
export COMPOSE_PROFILES=cpu PORT
SD_REDIS_PASSWORD=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
export SD_REDIS_PASSWORD
compose() { "${COMPOSE[@]}" -p "$PROJECT" --profile cpu "$@"; }

# --- cleanup, whatever happens ------------------------------------------------------------------
NEW_IMAGES=()
COPIED_WHEEL=
cleanup() {
    local status=$?
    if [ $status -ne 0 ]; then
        say "state at failure:"
        compose ps || true
        compose logs --tail 60 || true
    fi
    say "removing containers, networks and volumes"
    compose down --volumes --remove-orphans --timeout 20 >/dev/null 2>&1 || true
    [ -n "$COPIED_WHEEL" ] && rm -f "$COPIED_WHEEL"
    if [ "${SD_COMPOSE_KEEP_IMAGES:-0}" = 1 ]; then
        say "keeping the images (SD_COMPOSE_KEEP_IMAGES=1)"
    elif [ ${#NEW_IMAGES[@]} -gt 0 ]; then
        say "removing the images it built: ${NEW_IMAGES[*]}"
        docker image rm "${NEW_IMAGES[@]}" >/dev/null 2>&1 || true
    fi
    say "$([ $status -eq 0 ] && echo passed || echo failed) in $((SECONDS - START_S)) s"
    exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for image in "${IMAGES[@]}"; do
    docker image inspect "$image" >/dev/null 2>&1 || NEW_IMAGES+=("$image")
done

# --- 1-2: what the build needs ------------------------------------------------------------------
say "base images"
while read -r tag; do [ -n "$tag" ] && NEW_IMAGES+=("$tag"); done < <(scripts/docker_base_images.sh)

if ! ls docker/wheels/torch-"$TORCH_VERSION"+cpu-*.whl >/dev/null 2>&1; then
    pip_python=$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)
    # +cpu exists only where a local folder or PyTorch's index offers it: elsewhere this fails fast and
    # the image takes torch from PyTorch's CPU index
    if "$pip_python" -m pip download -q --no-deps --only-binary :all: --python-version 3.11 \
        --platform manylinux_2_28_x86_64 "torch==$TORCH_VERSION+cpu" -d docker/wheels >/dev/null 2>&1; then
        COPIED_WHEEL=$(ls docker/wheels/torch-"$TORCH_VERSION"+cpu-*.whl | head -n 1)
        say "torch's CPU wheel for the build: $COPIED_WHEEL (removed afterwards)"
    fi
fi

# --- 3: build and start -------------------------------------------------------------------------
say "building the images"
compose build api worker-cpu  # the janitor runs the API's image: building it twice leaves a stray copy
say "starting the CPU profile on port $PORT"
compose up -d

# --- 4: healthy ---------------------------------------------------------------------------------
# every container of the project healthy (the janitor, which has no healthcheck: running)
wait_healthy() {
    local deadline=$((SECONDS + HEALTHY_TIMEOUT_S)) states
    while :; do
        states=$(docker ps -a --filter "label=com.docker.compose.project=$PROJECT" -q \
            | xargs -r docker inspect -f '{{.Name}} {{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' \
            || true)
        if ! grep -qvE ' (healthy|running)$' <<<"$states" && [ "$(wc -l <<<"$states")" -ge 4 ]; then
            say "all healthy: $(tr '\n' ' ' <<<"$states")"
            return 0
        fi
        [ $SECONDS -lt $deadline ] || fail "not healthy within ${HEALTHY_TIMEOUT_S} s: $(tr '\n' ' ' <<<"$states")"
        sleep 2
    done
}
wait_healthy

# --- 5: the README's curl flow ------------------------------------------------------------------
field() { python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

submit() {
    curl -sf -X POST "$URL/v1/txt2img" -H 'Content-Type: application/json' -d "$1" | field id
}

wait_succeeded() {
    local id=$1 deadline=$((SECONDS + JOB_TIMEOUT_S)) status
    while :; do
        status=$(curl -sf "$URL/v1/jobs/$id" | field status) || status=unreachable
        case $status in
            succeeded) return 0 ;;
            failed | canceled) fail "job $id $status: $(curl -s "$URL/v1/jobs/$id")" ;;
        esac
        [ $SECONDS -lt $deadline ] || fail "job $id still $status after ${JOB_TIMEOUT_S} s"
        sleep 1
    done
}

fetch_png() {
    local id=$1 index=$2 out
    out=$(mktemp)
    curl -sf -o "$out" "$URL/v1/jobs/$id/images/$index.png" || fail "cannot fetch image $index of job $id"
    python3 - "$out" <<'EOF' || fail "image $index of job $id is not a PNG"
import sys
data = open(sys.argv[1], "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n" and b"parameters" in data, data[:64]
EOF
    say "image $index of job $id: a PNG of $(wc -c <"$out") bytes"
    rm -f "$out"
}

say "README flow: POST /v1/txt2img, poll, fetch"
id=$(submit '{"prompt": "a red circle in the top left on a blue background",
  "negative_prompt": "", "steps": 30, "guidance_scale": 7.5, "seed": 42, "num_images": 2}')
say "job $id queued"
wait_succeeded "$id"
fetch_png "$id" 0
fetch_png "$id" 1

# --- 6: a worker restart in the middle of a job -------------------------------------------------
say "a long job, and a worker restart while it runs"
id=$(submit '{"prompt": "yellow square, bottom right, black background", "steps": 150, "num_images": 8, "seed": 7}')
deadline=$((SECONDS + JOB_TIMEOUT_S))
until [ "$(curl -sf "$URL/v1/jobs/$id" | python3 -c 'import json, sys; job = json.load(sys.stdin); print(job["status"] == "running" and (job.get("progress") or {}).get("step", 0) > 0)')" = True ]; do
    [ $SECONDS -lt $deadline ] || fail "job $id never started running"
    sleep 0.5
done
say "job $id running ($(curl -s "$URL/v1/jobs/$id" | field progress)); restarting worker-cpu"
compose restart worker-cpu
say "worker-cpu restarted; what its launcher and worker said about the stop:"
compose logs --no-color worker-cpu | grep -E "SIGTERM|drain|stopped|exited|handing|ready" || true
wait_succeeded "$id"
say "job $id succeeded across the restart"
fetch_png "$id" 7
wait_healthy
