"""InfoPro (Wang et al., ICLR 2021): gradient-isolated local modules, each trained by
lambda1_k * reconstruction + lambda2_k * contrastive loss (the objective's loss:
``method.objective``; NT-Xent with simclr, as in the paper).

The reconstruction term keeps early modules from discarding information about the input
that later modules need; its weight fades linearly from the first to the last module
(CIFAR example in the paper: 5 -> 0), while the contrastive weight grows (0 -> 1 there).
With ``method.supervised=true`` the contrastive term is SupCon on the labels, as in the
paper's supervised setting.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from loco.losses import reconstruction_bce
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
        # the paper's 2-layer MLP under simclr; other objectives get their projector depth
        layers = 2 if self.objective.name == "simclr" else self.decoder_cfg.mlp_layers
        self.heads = self.projection_heads(
            list(range(n)),
            lambda k: InfoProContrastiveHead(backbone.channels[k], self.decoder_cfg, layers),
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

    def head_loss(self, k: int, h: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        lam_rec, lam_con = self.lambdas[k]
        labels = self._labels if self.supervised else None  # SupCon (objective simclr)
        con = self.objective.loss(self.embed(k, h), self.target(k, x), labels)
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
            x_in = x.detach()
            h = self.backbone.forward_module(k, x_in)
            losses[f"loss/s{k + 1}"], grad_h = self.local_loss(k, h, x_in)
            torch.autograd.backward(h, grad_h, inputs=self.module_params(k))
            x = h
        self._images = self._labels = None
        return StepOutput(losses, self.readout(x))
