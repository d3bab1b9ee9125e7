"""Optimizer and per-iteration schedule, from timm.

LARS follows SimCLR: biases and normalisation parameters get neither weight decay nor
layer-wise adaptation (timm's Lars adapts only groups with weight decay, and
``filter_bias_and_bn`` puts those parameters in a group without it).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from loco.config import OptimConfig


def scaled_lr(cfg: OptimConfig, world_size: int) -> float:
    """lr = base_lr * global_batch / 256 (Goyal et al. 2017, as in SimCLR)."""
    return cfg.base_lr * cfg.batch_size * world_size / 256


def build_optimizer(model: nn.Module, cfg: OptimConfig, world_size: int) -> torch.optim.Optimizer:
    kwargs = {"momentum": cfg.momentum} if cfg.name in ("lars", "sgd") else {}
    return create_optimizer_v2(
        model,
        opt=cfg.name,
        lr=scaled_lr(cfg, world_size),
        weight_decay=cfg.weight_decay,
        filter_bias_and_bn=True,
        **kwargs,
    )


def build_scheduler(
    opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, steps_per_epoch: int
) -> CosineLRScheduler:
    """Linear warm-up then cosine decay, stepped every iteration (``step_update``)."""
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
    base = opt.param_groups[0]["lr"]
    with _QuietSingleStepCosine():
        return CosineLRScheduler(
            opt,
            t_initial=max(total_steps - warmup, 1),
            lr_min=base * cfg.min_lr_ratio,
            warmup_t=warmup,
            warmup_lr_init=base * 1e-3 if warmup else base,
            warmup_prefix=True,
            t_in_epochs=False,
        )


class _QuietSingleStepCosine(logging.Filter):
    """timm warns "Cosine annealing scheduler will have no effect" when one step follows the
    warm-up (short runs): true and expected there, so not worth a warning in every such run."""

    logger = logging.getLogger("timm.scheduler.cosine_lr")

    def filter(self, record: logging.LogRecord) -> bool:
        return "will have no effect" not in str(record.msg)

    def __enter__(self) -> None:
        self.logger.addFilter(self)

    def __exit__(self, *exc: object) -> None:
        self.logger.removeFilter(self)
