#!/usr/bin/env bash
# Set up appliance. Local mode (the default) needs only python3 >= 3.11:
#   ./install.sh               virtual environment in ./.venv with pinned dependencies
#   ./install.sh --dev         ... plus the test and lint tools
#   ./install.sh --prefix DIR  the virtual environment in DIR instead
# Running it again is safe: it reuses the environment and re-applies the pins.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
prefix="$here/.venv"
dev=0
python="${PYTHON:-python3}"

die() { echo "install.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --dev) dev=1 ;;
    --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; prefix="$2"; shift ;;
    --prefix=*) prefix="${1#--prefix=}" ;;
    --server|--agent|--bundle|--server=*|--agent=*|--bundle=*)
      die "${1%%=*}: cluster mode (k3s + MinIO, offline bundles) is not available yet; run without it for local mode" ;;
    -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (try --help)" ;;
  esac
  shift
done

command -v "$python" >/dev/null 2>&1 || die "$python not found; install Python 3.11 or newer"
"$python" - <<'PY' || die "Python 3.11 or newer is required (found $("$python" --version 2>&1))"
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

if [ ! -x "$prefix/bin/python" ]; then
  echo "==> creating virtual environment in $prefix"
  "$python" -m venv "$prefix"
fi

pip=("$prefix/bin/python" -m pip install --disable-pip-version-check -q -c "$here/constraints.txt")
# torch first and pinned, so nothing below resolves a different (CUDA, GBs) build of it.
"${pip[@]}" "torch==2.13.0"
if [ "$dev" = 1 ]; then
  echo "==> installing appliance (editable) with test tools"
  "${pip[@]}" -e "$here[dev]"
else
  echo "==> installing appliance"
  "${pip[@]}" "$here"
fi

"$prefix/bin/appliance" version >/dev/null
echo "==> installed appliance $("$prefix/bin/appliance" version) in $prefix"
echo "next: $prefix/bin/appliance quickstart"
