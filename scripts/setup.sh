#!/usr/bin/env bash
# Set up a fresh clone: the Fashion-MNIST data (Debian package) and a virtual environment
# in .venv with kdcache and everything its tests and demo use. Safe to rerun: steps that
# are already done are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

# Real data comes from Debian packages, never from the network at run time:
#   dataset-fashion-mnist  the images of the main job (/usr/share/datasets/fashion-mnist)
#   fortunes               English text for the language-model job (/usr/share/games/fortunes)
DEB_PACKAGES=(dataset-fashion-mnist fortunes)
missing=()
for pkg in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing Debian packages: ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for candidate in python3.11 python3.12 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PY=$candidate; break; fi
  done
fi
"$PY" -c 'import sys; assert sys.version_info >= (3, 10), "kdcache needs Python >= 3.10"'

STAMP=.venv/.kdcache-installed
WANT=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $PY"
  "$PY" -m venv .venv
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "== installing kdcache and its dependencies into .venv (a few minutes the first time)"
  LOG=.venv/install.log
  pip_install() {
    if ! .venv/bin/python -m pip install "$@" >>"$LOG" 2>&1; then
      tail -n 40 "$LOG" >&2
      echo "setup: 'pip install $*' failed; the full log is $LOG" >&2
      exit 1
    fi
  }
  : > "$LOG"
  pip_install --upgrade pip
  # The CPU build of torch first: a bare `torch` requirement could pull a multi-GB CUDA build.
  pip_install "torch==2.13.0"
  pip_install -e ".[dev]"
  echo "$WANT" > "$STAMP"
fi
