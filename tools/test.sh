#!/usr/bin/env bash
# The README's test command: installs loco with its test extras into .venv, the Detectron2
# route (tools/install_detectron2.py), starts the local Slurm cluster (slurm/local-cluster.sh,
# needs root: its tests skip otherwise), then runs ruff and the whole pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n==> %s\n' "$*"; }

step "python environment (.venv)"
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 -e '.[test]' 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true
.venv/bin/python -c "import loco, torch, timm, faiss, submitit; print('loco', loco.__version__, '| torch', torch.__version__, '| timm', timm.__version__)"

step "Detectron2 (optional extra, for transfer tests)"
.venv/bin/python tools/install_detectron2.py

step "local Slurm cluster (for tests marked slurm)"
if [ "$(id -u)" = 0 ]; then
  bash slurm/local-cluster.sh start
else
  echo "not root: the local Slurm cluster cannot start here; tests marked slurm will be skipped"
fi

step "lint"
.venv/bin/ruff check .
.venv/bin/ruff format --check .

step "tests"
.venv/bin/python -m pytest -q "$@"
