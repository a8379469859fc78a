#!/usr/bin/env bash
# Create .venv (if missing) and install cmalign with everything: training (torch), the CPU runtime and the dev tools.
# Idempotent: a second run only re-checks the install. Override the interpreter with PYTHON=...,
# the extras with CMALIGN_EXTRAS=train,gpu,dev (never cpu and gpu together).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
EXTRAS="${CMALIGN_EXTRAS:-train,cpu,dev}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# setuptools prints an "Editable installation" notice for every project whose packages are not in a src/
# folder (ours map cli/ and export/ to cmalign.cli and cmalign.export): a notice, not a problem; hide it.
PYTHONWARNINGS="ignore:Editable installation" .venv/bin/python -m pip install --quiet -e ".[${EXTRAS}]"
.venv/bin/cmalign --version
