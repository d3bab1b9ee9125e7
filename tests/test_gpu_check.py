"""tools/gpu_check.sh without CUDA: every check SKIPs cleanly, exit 0, valid JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_skips_everything_without_cuda(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu_check.sh"), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(out.read_text())
    checks = summary["checks"]
    names = {c["check"] for c in checks}
    assert {"fp32_logits", "channels_last", "tensor_pipeline", "max_batch"} <= names
    assert {"syncbn_decoders", "faiss_gpu", "nccl_2gpu", "bf16_step[loco]"} <= names
    assert all(c["status"] == "SKIP" and c["detail"] == "no CUDA device" for c in checks)
    assert summary["counts"] == {"PASS": 0, "FAIL": 0, "SKIP": len(checks)}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("PASS", "FAIL", "SKIP"))]
    assert len(lines) == len(checks)
    assert json.loads(proc.stdout[proc.stdout.index("\n{") :]) == summary  # the printed JSON
