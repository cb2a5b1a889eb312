#!/usr/bin/env bash
# requirements.lock: the exact versions of everything the app and the tests install.
#
#   tools/lock.sh                     re-resolve with the newest releases the ranges allow (then run ./test.sh
#                                     and commit requirements.lock only when it passes)
#   tools/lock.sh --keep              add what the ranges newly need, keeping every existing pin (uv takes the
#                                     current lock as its preferences): for a new dependency, not an upgrade
#   tools/lock.sh --check             exit 1 when requirements.lock is not what the ranges resolve to today
#   tools/lock.sh --verify-installed  exit 1, naming each package, unless everything requirements-test.txt
#                                     needs is installed at exactly its locked version (no network; test.sh
#                                     runs it after installing, so a stale or inconsistent lock fails clearly)
#
# The lock is universal (markers for every platform / Python >= 3.11), so the same file serves
# this CPU machine, a CUDA box and Hugging Face Spaces. torch is held at the release CI runs on
# (a CPU wheel of it is on the CI machines' disk); move it here on purpose, not by accident.
# LOCK=path reads/writes another lock file (the tests use it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOCK=${LOCK:-requirements.lock}
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}

if [ "${1:-}" = "--verify-installed" ]; then
  exec "$PY" - "$LOCK" requirements-test.txt <<'EOF'
"""Walk the installed dependency tree of the requirement files; every package in it must be pinned, and installed as pinned."""
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

lock_file, top_file = sys.argv[1], sys.argv[2]


def requirement_lines(path):
    """(file, requirement text) for each requirement of a requirements file, following -r."""
    for line in Path(path).read_text().splitlines():
        line = line.split(" #")[0].strip()
        if line.startswith("-r "):
            yield from requirement_lines(Path(path).parent / line[3:].strip())
        elif line and not line.startswith(("#", "-")):
            yield path, line


locked = {}
for _, line in requirement_lines(lock_file):
    pin = Requirement(line)
    if pin.marker is None or pin.marker.evaluate():
        locked[canonicalize_name(pin.name)] = Version(next(iter(pin.specifier)).version)

problems, seen = [], set()
todo = [(Requirement(line), Path(path).name) for path, line in requirement_lines(top_file)]
while todo:
    requirement, wanted_by = todo.pop()
    name = canonicalize_name(requirement.name)
    if (name, frozenset(requirement.extras)) in seen:
        continue
    seen.add((name, frozenset(requirement.extras)))
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        problems.append(f"{name} (needed by {wanted_by}) is not installed")
        continue
    installed = Version(dist.version)
    if name not in locked:
        problems.append(f"{name}=={installed} (needed by {wanted_by}) is not pinned in {lock_file}")
    elif installed.public != locked[name].public:
        problems.append(f"{name} is installed at {installed} but {lock_file} pins {locked[name]}")
    elif not requirement.specifier.contains(installed, prereleases=True):
        problems.append(f"{lock_file} pins {name}=={locked[name]}, outside {wanted_by}'s range {requirement.specifier}")
    extras = set(requirement.extras) | {""}
    for text in dist.requires or []:
        child = Requirement(text)
        if child.marker is None or any(child.marker.evaluate({"extra": extra}) for extra in extras):
            todo.append((child, name))

if problems:
    print(f"{lock_file} does not match what is installed ({len(problems)} problems); "
          "refresh it with tools/lock.sh, then run ./test.sh:", file=sys.stderr)
    for problem in sorted(problems):
        print(f"  {problem}", file=sys.stderr)
    sys.exit(1)
print(f"installed = {lock_file}: {len({name for name, _ in seen})} packages, each at its locked version")
EOF
fi

"$PY" -m uv --version >/dev/null 2>&1 || "$PY" -m pip install -q uv
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
# requirements.txt constrains itself with the lock; resolve without it, so new releases are seen.
grep -v '^-c requirements.lock' requirements.txt >"$work/requirements.txt"
sed 's#^-r requirements.txt#-r '"$work"'/requirements.txt#' requirements-test.txt >"$work/requirements-test.txt"
echo "$TORCH_PIN" >"$work/pins.txt"
# --keep: uv prefers the versions already in its output file
[ "${1:-}" = "--keep" ] && grep -v '^#' "$LOCK" >"$work/requirements.lock"
"$PY" -m uv pip compile "$work/requirements-test.txt" -c "$work/pins.txt" --universal --python-version 3.11 \
  --no-header --no-annotate --quiet -o "$work/requirements.lock"
{
  echo "# Generated by tools/lock.sh from requirements.txt + requirements-test.txt ($TORCH_PIN). Do not edit."
  echo "# The exact set CI tested; requirements.txt applies it as constraints (-c)."
  cat "$work/requirements.lock"
} >"$work/new.lock"

if [ "${1:-}" = "--check" ]; then
  if diff -u "$LOCK" "$work/new.lock"; then echo "$LOCK is up to date"; else exit 1; fi
else
  mv "$work/new.lock" "$LOCK"
  echo "wrote $LOCK ($(grep -c '==' "$LOCK") pins)"
fi
