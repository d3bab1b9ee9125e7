"""Synchronised BatchNorm over the whole method: backbone *and* every decoder.

SimCLR's global BN normalises the projection head's BatchNorm over all GPUs too, so
``model.sync_bn=true`` converts every BatchNorm of the method (the MLP's BatchNorm1d, the
decoders' conv blocks, timm's BatchNormAct layers with their activation kept), once, after
the method is built. ``SyncBatchNorm`` refuses CPU tensors once a process group exists, so
on CPU the layers stay plain BatchNorm (per-process statistics) with one warning.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.layers import convert_sync_batchnorm

log = logging.getLogger(__name__)

_warned = False


def sync_batchnorm(module: nn.Module, device: torch.device | str) -> nn.Module:
    """``module`` with every BatchNorm synchronised across the process group, for a run on
    ``device``; unchanged without a process group, and (warning once, on rank 0) on CPU."""
    global _warned
    if not (dist.is_available() and dist.is_initialized()):
        return module
    if torch.device(device).type != "cuda":
        if not _warned and dist.get_rank() == 0:
            log.warning(
                "model.sync_bn=true has no effect on %s: SyncBatchNorm needs CUDA, so each "
                "process normalises over its own batch (plain BatchNorm)",
                torch.device(device).type,
            )
        _warned = True
        return module
    return convert_sync_batchnorm(module)
