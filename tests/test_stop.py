"""Stops that save: SIGTERM to the whole process group (DataLoader workers included), as
``scancel``, ``scontrol requeue``, a preemption or ``kill -TERM -- -PGID`` send it.

Each test runs ``loco`` in a new session (its own process group) with ``data.num_workers=2``
and signals the group, so the workers get the signal too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import tiny_val_overrides

from loco import checkpoint as ckpt
from loco.config import load_config
from loco.train import pretrain

REPO = Path(__file__).resolve().parents[1]
STEPS = 20


def tiny(root: Path, out: Path, *extra: str) -> list[str]:
    """With loader worker processes, which a stop must also end."""
    return tiny_val_overrides(root, out, "data.num_workers=2", *extra)


def loco(argv: list[str], log: Path) -> subprocess.Popen:
    """``loco ARGV`` in its own session (process group), one thread, this tree's code."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    code = (
        "import sys, torch; torch.set_num_threads(1); from loco.cli import main; sys.exit(main())"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),  # noqa: SIM115 - the child owns it
        start_new_session=True,
    )


def wait_for(check, proc: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"not reached (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def term_group(proc: subprocess.Popen) -> int:
    os.killpg(proc.pid, signal.SIGTERM)  # the main process and its DataLoader workers
    return proc.wait(timeout=60)


def steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(ln)["step"] for ln in path.read_text().splitlines()] if path.exists() else []


def test_sigterm_to_the_group_saves_the_step_and_resumes_exactly(
    cifar_val_root, tmp_path, one_thread
):
    full = load_config(None, tiny(cifar_val_root, tmp_path / "full", f"optim.max_steps={STEPS}"))
    full.data.num_workers = 0  # the samples do not depend on the workers (loco.data.loaders)
    pretrain(full)

    run = tmp_path / "part"
    argv = tiny(cifar_val_root, run, f"optim.max_steps={STEPS}")
    log = tmp_path / "part.log"
    proc = loco(["pretrain", *argv], log)
    wait_for(lambda: len(steps(run)) >= 2, proc, log)
    status = term_group(proc)
    text = log.read_text()
    assert status == 143 and "stopped by SIGTERM" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    saved = ckpt.load(run / "checkpoint.pt")["step"]
    assert saved == steps(run)[-1] < STEPS  # the step that was running when the signal came

    proc = loco(["pretrain", *argv], log)  # resume=auto, workers again
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert f"resumed from {run / 'checkpoint.pt'} at step {saved}" in log.read_text()
    assert steps(run) == list(range(1, STEPS + 1))  # each step once
    a = ckpt.load(tmp_path / "full" / "checkpoint.pt")["method"]
    b = ckpt.load(run / "checkpoint.pt")["method"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_during_feature_extraction_caches_nothing(cifar_val_root, tmp_path):
    out = tmp_path / "eval"
    argv = [
        "features", "--random-init", "--backbone", "resnet18", "--data", str(cifar_val_root),
        "--split", "val", "--per-class", "60", "--workers", "2", "--batch-size", "16", "--out", str(out),
        "--device", "cpu", "model.kwargs={channels: [8, 16, 32, 64]}", "data.image_size=16",
    ]  # fmt: skip
    log = tmp_path / "features.log"
    proc = loco(argv, log)
    # the progress bar shows batches done: the extraction loop is running
    wait_for(lambda: re.search(r"features val:.*\| *[1-9]\d*/", log.read_text()), proc, log)
    status = term_group(proc)
    text = log.read_text()
    assert status == 143 and "stopped by SIGTERM during feature extraction" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    (cache,) = (out / "features").iterdir()
    assert not (cache / "meta.json").exists()  # what marks a cache complete
    assert not list(cache.glob("*.npy*")), list(cache.iterdir())  # no partial arrays left

    proc = loco(argv, log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["n"] == 600 and sorted(meta["stages"]) == ["1", "2", "3", "4"]
