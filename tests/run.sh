#!/usr/bin/env bash
# The test suite: sets up (or reuses) .venv, then runs pytest. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/pipelines/setup_env.sh"
# The lxmert-serve page test drives a real headless Chromium (Debian's package); install it where we may.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[tests] installing Debian's chromium for the lxmert-serve page test (once)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
    || echo "[tests] could not install chromium: the page test will be skipped"
fi
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -q "$@" tests
