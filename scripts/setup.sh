#!/usr/bin/env bash
# Create .venv and install olr_ray with its test extras (idempotent; fast when already installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  # A fresh environment takes about 7 GB (pip installs torch's CUDA build on x86_64). Say so up front
  # rather than leave pip's "No space left on device" half-way through the install.
  free_kb=$(df -Pk . | awk 'NR == 2 {print $4}')
  if [ "${free_kb:-0}" -lt $((8 * 1024 * 1024)) ]; then
    echo "setup.sh: only $((free_kb / 1024 / 1024)) GB free under $(pwd); .venv needs about 7 GB." >&2
    echo "setup.sh: free some disk or clone elsewhere, then rerun. Installing anyway." >&2
  fi
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
.venv/bin/python -c "import olr_ray, ray, torch; print(f'olr_ray {olr_ray.__version__}, ray {ray.__version__}, torch {torch.__version__}')"
