"""What every pretraining method shares: a staged backbone, one decoder per local loss,
and a ``training_step`` that leaves the gradients in ``.grad`` for the optimizer.

Local methods differ from e2e only in *where gradients may flow*. Each step therefore
runs the backbone one local module at a time and calls autograd explicitly, so that the
routing is visible in the code (and tested against independent computations).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from loco.config import Config
from loco.errors import LocoError
from loco.losses import nt_xent
from loco.models.backbone import StagedBackbone
from loco.models.heads import ProjectionDecoder, pool

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available as ``method.name=<cls.name>``."""
    METHODS[cls.name] = cls
    return cls


def build_method(backbone: StagedBackbone, cfg: Config) -> Method:
    name = cfg.method.name
    if name not in METHODS:
        raise LocoError(f"unknown method '{name}'; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name](backbone, cfg)


@dataclass
class StepOutput:
    losses: dict[str, torch.Tensor]  # detached, one per local loss (e.g. "loss/s1")
    features: torch.Tensor  # detached pooled last-module features of both views [2B, C]
    extra: dict[str, float] = field(default_factory=dict)


class Method(nn.Module):
    """Base class. Subclasses set ``name`` and implement ``training_step``."""

    name: ClassVar[str] = ""

    def __init__(self, backbone: StagedBackbone, cfg: Config) -> None:
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.temperature = cfg.method.temperature
        self.gather = cfg.method.gather_negatives

    # -- building blocks -------------------------------------------------------------
    def projection_heads(self, modules: list[int]) -> nn.ModuleDict:
        """One decoder per local loss, keyed by module index (as a string)."""
        return nn.ModuleDict(
            {
                str(k): ProjectionDecoder.for_module(self.backbone, k, self.cfg.decoder)
                for k in modules
            }
        )

    def contrastive_loss(self, head: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return nt_xent(head(h), self.temperature, gather=self.gather)

    def local_loss(self, k: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss L_k of module k's output ``h``, back-propagated through its decoder only.

        Returns the detached loss and the cotangent dL_k/dh, which the caller routes into
        the backbone; the decoder's own gradients are already accumulated.
        """
        h_leaf = h.detach().requires_grad_(True)
        loss = self.head_loss(k, h_leaf)
        loss.backward()
        assert h_leaf.grad is not None
        return loss.detach(), h_leaf.grad

    def head_loss(self, k: int, h: torch.Tensor) -> torch.Tensor:
        return self.contrastive_loss(self.heads[str(k)], h)

    def module_params(self, k: int) -> list[nn.Parameter]:
        return self.backbone.module_parameters(k)

    @staticmethod
    def readout(h: torch.Tensor) -> torch.Tensor:
        return pool(h.detach()).float()

    # -- the algorithm -------------------------------------------------------------
    def training_step(
        self, views: list[torch.Tensor], labels: torch.Tensor | None = None
    ) -> StepOutput:
        raise NotImplementedError
