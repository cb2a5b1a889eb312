#!/usr/bin/env bash
# Drift: do the newest releases that requirements*.txt allow still pass? Not run by CI, so a new release
# upstream never breaks anyone's fresh install or CI run (they get requirements.lock); run it before
# refreshing the lock with tools/lock.sh.
#
#   tools/check_drift.sh [pytest args]
#
# Resolves requirements-test.txt WITHOUT requirements.lock into a throw-away virtual environment (uv),
# prints the locked and the newest version of every package, runs the fast suite there
# (-m "not slow and not browser") and ends with PASS (exit 0) or FAIL (exit 1). It never writes
# requirements.lock. torch stays at its locked release (a newer one is a download of GBs); TORCH_PIN=torch==X
# moves it. Wheel folders of pip's find-links are searched too (a local CPU torch wheel is taken from
# there); without any, torch comes from PyTorch's CPU index (UV_TORCH_BACKEND=cpu) rather than a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m uv --version >/dev/null 2>&1 || "$PY" -m pip install -q uv
uv() { "$PY" -m uv "$@"; }
TORCH_PIN=${TORCH_PIN:-$(grep -oE '^torch==[^ ;]+' requirements.lock)}

work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
venv="$work/venv"
grep -v '^-c requirements.lock' requirements.txt >"$work/requirements.txt"
sed 's#^-r requirements.txt#-r '"$work"'/requirements.txt#' requirements-test.txt >"$work/requirements-test.txt"
echo "$TORCH_PIN" >"$work/pins.txt"

links=()
for dir in ${PIP_FIND_LINKS:-$("$PY" -m pip config get global.find-links 2>/dev/null || true)}; do
  links+=(--find-links "$dir")
done
[ ${#links[@]} -gt 0 ] || export UV_TORCH_BACKEND=${UV_TORCH_BACKEND:-cpu}

echo "drift: resolving the newest releases into $venv ($TORCH_PIN)"
uv venv -q --python "$PY" "$venv"
if ! uv pip install -q --python "$venv/bin/python" "${links[@]}" -r "$work/requirements-test.txt" -c "$work/pins.txt" ||
   ! uv pip install -q --python "$venv/bin/python" --no-deps -e .; then
  echo "drift: FAIL (the newest releases cannot be installed together; see uv's message above)"
  exit 1
fi

# locked vs newest, for every package in either set (markers evaluated for this Python and platform)
"$venv/bin/python" - requirements.lock <<'EOF'
import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

locked = {}
for line in open(sys.argv[1], encoding="utf-8"):
    line = line.strip()
    if line and not line.startswith(("#", "-")):
        pin = Requirement(line)
        if pin.marker is None or pin.marker.evaluate():
            locked[canonicalize_name(pin.name)] = next(iter(pin.specifier)).version
newest = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
newest.pop("chatglm-web", None)
names = sorted(set(locked) | set(newest))
width = max(len(n) for n in names)
print(f"\n  {'package':<{width}}  {'locked':<16}  newest")
moved = unused = 0
for name in names:
    old, new = locked.get(name, "-"), newest.get(name)
    if new is None:  # e.g. the CUDA wheels of the lock, with a CPU torch
        unused += 1
        print(f"  {name:<{width}}  {old:<16}  - (not installed on this platform)")
        continue
    changed = old.split("+")[0] != new.split("+")[0]  # a local label (2.13.0+cpu) is the same release
    moved += changed
    print(f"{'*' if changed else ' '} {name:<{width}}  {old:<16}  {new}")
print(f"\n{moved} of {len(names) - unused} installed packages differ from requirements.lock (marked *)\n")
EOF

if "$venv/bin/python" -m pytest -m "not slow and not browser" -q "$@"; then
  echo "drift: PASS (the fast suite passes with the newest releases; tools/lock.sh would pin them)"
else
  echo "drift: FAIL (the fast suite fails with the newest releases; keep requirements.lock, fix or cap the range)"
  exit 1
fi
