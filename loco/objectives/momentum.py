"""The momentum (EMA) target of BYOL and MoCo v3, for every routing.

One frozen copy of the backbone and of each local loss's decoder (not the predictor).
Under a local routing the target of loss k is module k's copy and decoder k's copy, run
on module k's own (detached) input; under e2e it is the whole network's copy run on the
images. Its output is a constant for the loss (computed without a graph). After each
optimizer step every copied parameter moves toward the online one,
``ema <- m * ema + (1 - m) * online``, with the cosine schedule of
:func:`loco.objectives.base.cosine_momentum`; the copies' BatchNorm statistics follow
their own forward passes (the target runs in training mode, as in BYOL).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

if TYPE_CHECKING:  # keeps `import loco.objectives` free of timm (spawned test workers)
    from loco.models.backbone import StagedBackbone


def frozen_copy(module: nn.Module) -> nn.Module:
    out = copy.deepcopy(module)
    for p in out.parameters():
        p.requires_grad_(False)
    return out


class MomentumNetwork(nn.Module):
    """EMA copies of ``backbone`` and (after :meth:`follow`) of the decoders."""

    def __init__(self, backbone: StagedBackbone) -> None:
        super().__init__()
        self.backbone = frozen_copy(backbone)
        self.heads = nn.ModuleDict()

    def follow(self, heads: nn.ModuleDict) -> None:
        """Start the copies of the decoders (called once, when the method builds them)."""
        self.heads = frozen_copy(heads)

    @torch.no_grad()
    def forward(self, modules: Iterable[int], x: torch.Tensor, key: str) -> torch.Tensor:
        """Decoder ``key``'s copy on the output of ``modules``' copies, from input ``x``."""
        h = x.detach()
        for k in modules:
            h = self.backbone.forward_module(k, h)
        return self.heads[key](h).detach()

    @torch.no_grad()
    def update(self, backbone: nn.Module, heads: nn.ModuleDict, momentum: float) -> None:
        """``ema <- m * ema + (1 - m) * online`` for every parameter of the copies."""
        pairs = [(self.backbone, backbone), (self.heads, heads)]
        ema = [p for mine, _ in pairs for p in mine.parameters()]
        online = [p for _, theirs in pairs for p in theirs.parameters()]
        assert len(ema) == len(online)
        torch._foreach_lerp_(ema, online, 1 - momentum)
