#!/usr/bin/env bash
# Install exactly the locked dependency set (from nothing) and run the whole suite: ./test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
fail() { echo "test.sh: $*" >&2; exit 1; }

# torch first, at its locked version and with its own dependencies from the lock: where a CPU wheel of it lies
# on local disk (CI), pip takes it instead of a multi-GB CUDA download. Elsewhere pip fetches it.
TORCH_PIN=$(grep -oE '^torch==[^ ;]+' requirements.lock) || fail "requirements.lock pins no torch; refresh it with tools/lock.sh"
"$PY" -m pip install "$TORCH_PIN" -c requirements.lock || fail "cannot install $TORCH_PIN (pinned in requirements.lock)"

# Everything else at its locked version (requirements.txt applies requirements.lock as constraints).
"$PY" -m pip install -r requirements-test.txt ||
  fail "pip cannot install requirements-test.txt at the versions in requirements.lock: the lock is inconsistent with the ranges in requirements*.txt; refresh it with tools/lock.sh"
# The package itself, so tests and bench/ import chatglm_web from anywhere (no dependencies: they are installed).
"$PY" -m pip install --no-deps --no-build-isolation -e . || fail "cannot install the chatglm_web package (pyproject.toml)"
# A package the ranges need but the lock lacks was installed unpinned above: say so, naming it.
tools/lock.sh --verify-installed || fail "the installed packages are not the locked set (see above)"

# Debian's Chromium for the browser tests (Playwright's own browser download is not used), and the CJK and
# emoji fonts a plain Debian box lacks (the page uses the visitor's system fonts; see README "Fonts").
MISSING=""
if ! command -v chromium >/dev/null 2>&1 && [ ! -x /usr/bin/chromium ]; then MISSING="chromium"; fi
if ! fc-list :lang=zh 2>/dev/null | grep -q .; then MISSING="$MISSING fonts-noto-cjk"; fi
if ! fc-list 2>/dev/null | grep -qi "color emoji"; then MISSING="$MISSING fonts-noto-color-emoji"; fi
if [ -n "$MISSING" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q && $SUDO apt-get install -y -q $MISSING
fi

exec "$PY" -m pytest "$@"
