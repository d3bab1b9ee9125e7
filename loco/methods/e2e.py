"""End-to-end (SimCLR, Chen et al. 2020, with objective simclr): one loss on the last
module, ordinary backprop. A momentum target is one EMA copy of the whole network."""

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

    def target_modules(self, k: int) -> range:
        return range(0, k + 1)  # the whole network's copy, from the images

    def training_step(
        self, views: list[torch.Tensor], labels: torch.Tensor | None = None
    ) -> StepOutput:
        x = torch.cat(views)
        h = self.backbone(x)[-1]
        loss = self.head_loss(self.top, h, x)
        self.backward_loss(loss)
        return StepOutput({f"loss/s{self.top + 1}": loss.detach()}, self.readout(h))
