#!/usr/bin/env bash
# The GPU check (see scripts/gpu_check.py): bash scripts/gpu_check.sh OUT_DIR [--smoke]
# On a GPU machine it takes at most about 8 minutes on an H100 and needs no Hub; --smoke runs tiny shapes anywhere.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bash scripts/gpu_check.sh OUT_DIR [--smoke]"; exit 2; }
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
exec "$PY" scripts/gpu_check.py "$@"
