#!/usr/bin/env bash
# Runs every CUDA path of loco once (bf16 steps of every method with fp32 contrastive logits,
# channels_last, the nvJPEG tensor pipeline vs PIL, `loco bench --max-batch` on ResNet-50,
# SyncBN over the decoders, faiss-gpu, NCCL on 2 GPUs): one PASS/FAIL/SKIP line each, then a
# JSON summary (also written to --out, default gpu_check.json). At most 5 minutes on one H200;
# without CUDA every check is SKIP and it exits 0. Exit 1 if a check FAILs.
#   bash tools/gpu_check.sh [--out FILE] [--only CHECK,CHECK]      (PYTHON=... to pick python)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 300 "${PYTHON:-python3}" "$root/tools/gpu_check.py" "$@"
