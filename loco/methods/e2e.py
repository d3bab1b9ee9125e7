"""SimCLR (Chen et al. 2020): one NT-Xent loss on the last module, ordinary backprop."""

from __future__ import annotations

import torch

from loco.methods.base import Method, StepOutput, register


@register
class EndToEnd(Method):
    name = "e2e"

    def __init__(self, backbone, cfg) -> None:
        super().__init__(backbone, cfg)
        self.top = backbone.num_modules - 1
        self.heads = self.projection_heads([self.top])

    def training_step(
        self, views: list[torch.Tensor], labels: torch.Tensor | None = None
    ) -> StepOutput:
        h = self.backbone(torch.cat(views))[-1]
        loss = self.head_loss(self.top, h)
        self.backward_loss(loss)
        return StepOutput({f"loss/s{self.top + 1}": loss.detach()}, self.readout(h))
