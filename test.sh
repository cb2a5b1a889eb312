#!/usr/bin/env bash
# Install what the tests need (from nothing) and run the whole suite: ./test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

# torch first: where a CPU wheel of 2.13.0 is on local disk this avoids a multi-GB CUDA download,
# and requirements.txt's range is then already met. Elsewhere pip simply fetches it.
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install "torch==2.13.0" || "$PY" -m pip install torch
fi
"$PY" -m pip install -r requirements-test.txt

# Debian's Chromium for the browser test (Playwright's own browser download is not used).
if ! command -v chromium >/dev/null 2>&1 && [ ! -x /usr/bin/chromium ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q && $SUDO apt-get install -y -q chromium
fi

exec "$PY" -m pytest "$@"
