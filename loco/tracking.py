"""Experiment tracking beyond metrics.jsonl and TensorBoard: Weights & Biases.

The W&B run id is stored in the run directory (``RunDir.wandb_id``) the first time, and
reused with ``resume="allow"`` on every later start, so a preempted and requeued Slurm job
continues the same W&B run instead of opening a new one. ``WANDB_MODE=offline`` works with
no network (``wandb sync RUN/wandb/offline-run-*`` uploads later).
"""

from __future__ import annotations

import os
import secrets
from typing import Any

from loco.config import Config
from loco.errors import LocoError
from loco.rundir import RunDir


class WandbRun:
    """Logs the scalars the trainer writes to metrics.jsonl, at the same steps."""

    def __init__(self, run: RunDir, cfg: Config) -> None:
        try:
            import wandb
        except ImportError:
            raise LocoError("train.wandb=true needs wandb: pip install 'loco[wandb]'") from None
        if run.wandb_id.is_file():
            run_id = run.wandb_id.read_text().strip()
        else:
            run_id = secrets.token_hex(8)  # W&B ids: [a-z0-9], up to 64 characters
            tmp = run.wandb_id.with_name(f".{run.wandb_id.name}.tmp{os.getpid()}")
            tmp.write_text(run_id + "\n")
            os.replace(tmp, run.wandb_id)
        t = cfg.train
        self.run = wandb.init(
            project=t.wandb_project,
            entity=t.wandb_entity or None,
            tags=list(t.wandb_tags) or None,
            name=run.root.resolve().name,
            id=run_id,
            resume="allow",
            dir=str(run.root),
            config=cfg.to_dict(),
        )

    def log(self, step: int, values: dict[str, Any]) -> None:
        scalars = {k: v for k, v in values.items() if isinstance(v, int | float)}
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()
