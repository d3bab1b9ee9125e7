"""The run directory: its layout, the run of a checkpoint, the run lock, preflight."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_cfg

from loco.cli import main
from loco.config import Config, load_config
from loco.errors import LocoError
from loco.rundir import RunDir
from loco.runlock import RunLock
from loco.train import pretrain


@pytest.mark.parametrize("ckpt", ["checkpoint.pt", "checkpoints/step_00000040.pt"])
def test_run_of_a_checkpoint(tmp_path, ckpt):
    run = tmp_path / "run"
    assert RunDir.from_checkpoint(run / ckpt).root == run.resolve()
    # the relative path of the caller resolves the same
    assert RunDir.from_checkpoint(Path(ckpt)).root == Path.cwd()


def test_layout_names():
    rd = RunDir("RUN")
    assert rd.checkpoint == Path("RUN/checkpoint.pt")
    assert rd.step_checkpoint(40) == Path("RUN/checkpoints/step_00000040.pt")
    assert rd.jobs == Path("RUN/slurm/jobs.jsonl")
    assert (rd.metrics, rd.config, rd.results) == (
        Path("RUN/metrics.jsonl"),
        Path("RUN/config.yaml"),
        Path("RUN/results.json"),
    )


def test_submit_eval_of_a_step_checkpoint_logs_under_the_run(tmp_path, capsys):
    """``loco submit eval --checkpoint RUN/checkpoints/step_N.pt``: the job log and the
    results both go to RUN (the job log used to land in RUN/checkpoints/slurm/)."""
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000040.pt"
    step.parent.mkdir(parents=True)
    torch.save({"config": Config().to_dict(), "step": 40}, step)  # submit reads its header
    argv = ["submit", "eval", "knn", "--checkpoint", str(step), "--profile", "local", "--dry-run"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"{run}/slurm/%j/%j_0_log.err" in text
    assert "checkpoints/slurm" not in text


# -- the run lock ---------------------------------------------------------------------------
def _write_lock(path: Path, **fields) -> None:
    holder = {
        "host": "node7",
        "pid": 4242,
        "job_id": "",
        "restart_count": 0,
        "since": time.time() - 60,
        "heartbeat": time.time(),
        "token": "other",
        **fields,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(holder))


HOLD = """
import sys, time
from loco.runlock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_second_run_refused_then_dead_holder_taken_over(cifar_val_root, tmp_path, caplog):
    """A live run (another process) holds the run dir: the second run stops with one line
    naming it and writes nothing; once that process is killed (-9: no release), its lock is
    provably stale (dead pid on this host) and the next run takes it over."""
    run = RunDir(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run.lock)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        assert holder.stdout.readline().strip() == b"held"
        cfg = tiny_cfg(cifar_val_root, run.root, "optim.max_steps=1")
        with pytest.raises(LocoError) as err:
            pretrain(cfg)
        msg = str(err.value)
        assert "\n" not in msg
        assert f"in use by another run (host {socket.gethostname()}, pid {holder.pid}," in msg
        assert "since 20" in msg and "another train.output_dir" in msg
        assert not run.metrics.exists() and not run.config.exists()
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="loco.runlock"):
        pretrain(cfg)
    assert f"pid {holder.pid} is dead on this host" in caplog.text
    assert [json.loads(ln)["step"] for ln in run.metrics.read_text().splitlines()] == [1]
    assert not run.lock.exists()  # released at the end


def test_requeue_takes_over_but_a_zombie_of_the_same_job_does_not(tmp_path, monkeypatch, caplog):
    lock = RunDir(tmp_path).lock
    _write_lock(lock, job_id="77", restart_count=1)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the same job, not requeued since
    with pytest.raises(
        LocoError, match=r"host node7, pid 4242, Slurm job 77 \(restart 1\).*scancel 77"
    ):
        RunLock(lock).acquire()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # Slurm requeued it: the holder is gone
    with caplog.at_level(logging.WARNING, logger="loco.runlock"):
        held = RunLock(lock).acquire()
    assert "Slurm requeued job 77 (restart 1 -> 2)" in caplog.text
    assert json.loads(lock.read_text())["restart_count"] == 2
    held.release()
    assert not lock.exists()


def test_heartbeat_timeout_and_refresh(tmp_path):
    lock = RunDir(tmp_path).lock
    _write_lock(lock, job_id="88", heartbeat=time.time() - 100)
    with pytest.raises(LocoError, match="heartbeat 100 s ago"):
        RunLock(lock, stale_s=600).acquire()  # another host, 100 s quiet: may be alive
    held = RunLock(lock, heartbeat_s=0.05, stale_s=60).acquire()  # 100 s > 60 s: stale
    first = json.loads(lock.read_text())["heartbeat"]
    deadline = time.time() + 10
    while json.loads(lock.read_text())["heartbeat"] == first and time.time() < deadline:
        time.sleep(0.05)
    assert json.loads(lock.read_text())["heartbeat"] > first  # the holder keeps it fresh
    # another run that took the lock over (ours looked stale to it): we notice at the next beat
    _write_lock(lock, host="node9", pid=9, job_id="99")
    while held.lost is None and time.time() < deadline:
        time.sleep(0.05)
    assert "taken over by host node9, pid 9, Slurm job 99" in held.lost
    held.release()
    assert json.loads(lock.read_text())["token"] == "other"  # not ours: left in place


def test_a_lock_caught_mid_write_is_not_a_takeover(tmp_path):
    """A heartbeat that reads the file while another writer has truncated it must look again
    at the next beat, not declare the lock lost (CI saw this race once)."""
    lock = RunDir(tmp_path).lock
    held = RunLock(lock, heartbeat_s=3600).acquire()
    try:
        lock.write_text("")  # truncated by a writer that has not written yet
        held.refresh()
        assert held.lost is None
        _write_lock(lock, host="node9", pid=9, job_id="99")
        held.refresh()
        assert held.lost is not None and "node9" in held.lost
    finally:
        held.release()


def test_preflight_refuses_a_locked_or_incompatible_run_dir(tmp_path):
    from loco import checkpoint as ckpt
    from loco.rundir import preflight

    run = RunDir(tmp_path / "run")
    cfg = load_config(None, [f"train.output_dir={run.root}", "optim.epochs=100"])
    preflight(cfg)  # a new run dir
    state = {"config": cfg.to_dict(), "meta": {"world_size": 1}, "step": 5}
    ckpt.save_run_checkpoint(run.root, state, 5)
    preflight(cfg)  # the same config: resumes
    longer = load_config(None, [f"train.output_dir={run.root}", "optim.epochs=800"])
    with pytest.raises(LocoError, match="optim.epochs: 100 -> 800.*train.resume=extend"):
        preflight(longer)
    with pytest.raises(LocoError, match="world size: 1 -> 8"):
        preflight(cfg, world_size=8)
    _write_lock(run.lock)  # a live holder on another host
    with pytest.raises(LocoError, match="in use by another run"):
        preflight(cfg)


def test_checkpoint_copied_where_hard_links_fail_and_directory_synced(tmp_path, monkeypatch):
    import errno
    import stat

    from loco import checkpoint as ckpt

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")  # e.g. some FUSE/SMB mounts

    synced = []
    real_fsync = os.fsync

    def record(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(os, "fsync", record)
    run = RunDir(tmp_path)
    ckpt.save_run_checkpoint(run.root, {"step": 3}, 3)
    assert ckpt.load(run.checkpoint)["step"] == 3
    assert run.checkpoint.read_bytes() == run.step_checkpoint(3).read_bytes()
    assert os.stat(run.checkpoint).st_ino != os.stat(run.step_checkpoint(3)).st_ino  # a copy
    assert synced.count(True) >= 2  # checkpoints/ after its rename, the run dir after ours


def test_a_run_whose_lock_was_taken_over_stops(tmp_path):
    """A run frozen past the heartbeat timeout, whose lock another run then took over, stops at
    its next step instead of writing on (all ranks: the check rides on the per-step agreement)."""
    from types import SimpleNamespace

    from loco.train import Pretrainer

    held = RunLock(RunDir(tmp_path).lock, heartbeat_s=3600).acquire()
    trainer = SimpleNamespace(lock=held, step=6, run_dir=tmp_path)
    Pretrainer.check_health(trainer, {"loss/s1": 1.0})  # still ours: goes on
    _write_lock(held.path, host="node9", pid=9, job_id="99")
    held.refresh()
    with pytest.raises(
        LocoError, match="stopped at step 7: the run lock .* taken over by host node9"
    ):
        Pretrainer.check_health(trainer, {"loss/s1": 1.0})
    held.release()
