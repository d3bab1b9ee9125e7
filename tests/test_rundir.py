"""The run directory: its layout, the run of a checkpoint, the run lock, preflight."""

from __future__ import annotations

from pathlib import Path

import pytest

from loco.cli import main
from loco.rundir import RunDir


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
    argv = ["submit", "eval", "knn", "--checkpoint", str(step), "--profile", "local", "--dry-run"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"{run}/slurm/%j/%j_0_log.err" in text
    assert "checkpoints/slurm" not in text
