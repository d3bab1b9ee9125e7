"""InfoPro (Wang et al., ICLR 2021): gradient-isolated local modules, each trained by
lambda1_k * reconstruction + lambda2_k * contrastive loss.

The reconstruction term keeps early modules from discarding information about the input
that later modules need; its weight fades linearly from the first to the last module
(CIFAR example in the paper: 5 -> 0), while the contrastive weight grows (0 -> 1 there).
With ``method.supervised=true`` the contrastive term is SupCon on the labels, as in the
paper's supervised setting.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from loco.losses import nt_xent, reconstruction_bce, supcon
from loco.methods.base import Method, StepOutput, register
from loco.models.heads import InfoProContrastiveHead, ReconstructionDecoder


def interpolate(first: float, last: float, k: int, n: int) -> float:
    return first if n == 1 else first + (last - first) * k / (n - 1)


@register
class InfoPro(Method):
    name = "infopro"
    options = (
        "lambda1_first",
        "lambda1_last",
        "lambda2_first",
        "lambda2_last",
        "supervised",
    )

    def __init__(self, backbone, cfg) -> None:
        super().__init__(backbone, cfg)
        n, m = backbone.num_modules, cfg.method
        self.lambdas = [
            (
                interpolate(m.lambda1_first, m.lambda1_last, k, n),
                interpolate(m.lambda2_first, m.lambda2_last, k, n),
            )
            for k in range(n)
        ]
        if any(c == 0 for c in backbone.reductions):
            from loco.errors import LocoError

            raise LocoError("method.name=infopro needs a convolutional backbone (feature maps)")
        self.heads = nn.ModuleDict(
            {str(k): InfoProContrastiveHead(backbone.channels[k], cfg.decoder) for k in range(n)}
        )
        self.decoders = nn.ModuleDict(
            {
                str(k): ReconstructionDecoder(backbone.channels[k], backbone.image_size)
                for k in range(n)
                if self.lambdas[k][0] > 0
            }
        )
        mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
        std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.supervised = m.supervised
        self._images: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None

    def head_loss(self, k: int, h: torch.Tensor) -> torch.Tensor:
        lam_rec, lam_con = self.lambdas[k]
        z = self.heads[str(k)](h)
        if self.supervised:
            con = supcon(z, self._labels, self.temperature, gather=self.gather)
        else:
            con = nt_xent(z, self.temperature, gather=self.gather)
        loss = lam_con * con
        if lam_rec > 0:
            target = (self._images * self.std + self.mean).clamp(0, 1)
            loss = loss + lam_rec * reconstruction_bce(self.decoders[str(k)](h), target)
        return loss

    def training_step(
        self, views: list[torch.Tensor], labels: torch.Tensor | None = None
    ) -> StepOutput:
        if self.supervised and labels is None:
            raise ValueError("method.supervised=true needs labels")
        x, losses = torch.cat(views), {}
        self._images, self._labels = x, labels
        for k in range(self.backbone.num_modules):
            h = self.backbone.forward_module(k, x.detach())
            losses[f"loss/s{k + 1}"], grad_h = self.local_loss(k, h)
            torch.autograd.backward(h, grad_h, inputs=self.module_params(k))
            x = h
        self._images = self._labels = None
        return StepOutput(losses, self.readout(x))
