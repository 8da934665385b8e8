#!/usr/bin/env bash
# Create .venv and install olr_ray with its test extras (idempotent; fast when already installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
.venv/bin/python -c "import olr_ray, ray, torch; print(f'olr_ray {olr_ray.__version__}, ray {ray.__version__}, torch {torch.__version__}')"
