"""The run directory: the one place that knows its layout.

A run directory (``train.output_dir``) holds::

    config.yaml          the resolved config of the latest start
    metrics.jsonl        one JSON line per logged step
    checkpoint.pt        the newest complete checkpoint (a hard link into checkpoints/)
    checkpoints/         step_XXXXXXXX.pt, the last ``train.keep_checkpoints`` of them
    results.json         evaluation rows (``loco eval`` merges into it)
    slurm/jobs.jsonl     the Slurm jobs ``loco submit`` started for it (logs in slurm/<job>/)
    .loco.lock           held by the run training in it (see :mod:`loco.runlock`)

Code elsewhere asks :class:`RunDir` for these paths instead of spelling the names, and
finds the run of a checkpoint with :meth:`RunDir.from_checkpoint`.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loco.config import Config

CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory (nothing is created here)."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> RunDir:
        """The run of ``RUN/checkpoint.pt`` or ``RUN/checkpoints/step_N.pt``: RUN for both."""
        parent = Path(path).resolve().parent
        return cls(parent.parent if parent.name == CHECKPOINTS else parent)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def wandb_id(self) -> Path:
        """The Weights & Biases run id, so a requeued job logs into the same W&B run."""
        return self.root / "wandb_id"

    @property
    def checkpoint(self) -> Path:
        """The newest complete checkpoint (what ``train.resume=auto`` resumes from)."""
        return self.root / "checkpoint.pt"

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    def step_checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:08d}.pt"

    def step_checkpoints(self) -> list[Path]:
        """Existing step checkpoints, oldest first."""
        return sorted(self.checkpoints.glob("step_*.pt"))

    @property
    def slurm(self) -> Path:
        return self.root / "slurm"

    @property
    def jobs(self) -> Path:
        """``loco submit``'s record of the run's Slurm jobs (one JSON line per job)."""
        return self.slurm / "jobs.jsonl"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def results_lock(self) -> Path:
        """Held (:func:`loco.filelock.locked`) while rows are merged into ``results.json``."""
        return self.root / ".results.json.lock"

    @property
    def lock(self) -> Path:
        """The run lock: present while a run trains in this directory."""
        return self.root / ".loco.lock"


def git_revision() -> str:
    """HEAD's short hash, ``-dirty`` when code or configs differ from it (docs do not count:
    writing a results page must not mark the runs behind it dirty)."""

    def git(*args: str) -> str:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "-C", str(here), *args], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip()

    try:
        rev = git("rev-parse", "--short", "HEAD")
        if not rev:
            return "unknown"
        changed = git(
            "status", "--porcelain", "--untracked-files=no", "--", ":/loco", ":/tools", ":/configs"
        )
        return f"{rev}-dirty" if changed else rev
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def preflight(cfg: Config, world_size: int | None = None) -> None:
    """Raise the one-line LocoError a pretraining run with ``cfg`` would stop with at its
    start: the run dir is locked by a live run, or its checkpoint cannot be resumed under
    ``cfg`` (the rules of :mod:`loco.resume`; ``world_size`` when known). ``loco submit``
    calls it, so that such a job is not queued."""
    from loco import checkpoint, resume
    from loco.runlock import check_free

    rd = RunDir(cfg.train.output_dir)
    check_free(rd.lock)
    if resume.weights_source(cfg) is not None:
        return
    path = checkpoint.find_resume(rd.root, cfg.train.resume)
    if path is not None:
        mode = "extend" if cfg.train.resume == "extend" else "exact"
        resume.check(path, checkpoint.load(path, mmap=True), cfg, world_size, mode)
