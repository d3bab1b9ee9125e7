"""Greedy InfoMax on SimCLR (Löwe et al. 2019): every local module is trained by its own
loss only; the input of each module is detached, so no gradient crosses a boundary.

Modules run bottom-up and each graph is freed right after its backward, so at most one
module's activations are alive: the memory saving of local learning.
"""

from __future__ import annotations

import torch

from loco.methods.base import Method, StepOutput, register


@register
class Greedy(Method):
    name = "greedy"

    def __init__(self, backbone, cfg) -> None:
        super().__init__(backbone, cfg)
        self.heads = self.projection_heads(list(range(backbone.num_modules)))

    def training_step(
        self, views: list[torch.Tensor], labels: torch.Tensor | None = None
    ) -> StepOutput:
        x, losses = torch.cat(views), {}
        for k in range(self.backbone.num_modules):
            x_in = x.detach()  # stop-gradient at the boundary
            h = self.backbone.forward_module(k, x_in)  # stop-gradient at the boundary
            losses[f"loss/s{k + 1}"], grad_h = self.local_loss(k, h, x_in)
            torch.autograd.backward(h, grad_h, inputs=self.module_params(k))
            x = h
        return StepOutput(losses, self.readout(x))
