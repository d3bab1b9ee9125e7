"""LoCo (Xiong, Ren, Urtasun, NeurIPS 2020): local learning with overlapping units.

Our reading (no official code exists): units {S_{k-1}, S_k} overlap, so the loss L_k at
module k's output trains module k *and* module k-1, and stops at module k-1's input.
Every middle module is therefore updated by its own loss and by the loss above it, and
feedback reaches down one module per loss. This equals the paper's Figure 1 with the
four decoders of its appendix; ``method.first_stage_loss=false`` drops L_1 as drawn in
Figure 1.

The step runs the forward pass once, bottom-up, keeping at most two modules' graphs
alive. For module k-1 it needs two cotangents, its own dL_{k-1}/dh_{k-1} and the one L_k
sends down through module k, so its backward waits until module k has run. Module k's
backward is split in two (as zero-bubble pipeline schedules do): an input-gradient pass
with L_k's cotangent only (that is all that may cross the boundary), and one
weight-gradient pass with the summed cotangents, so no weight gradient is computed twice.
"""

from __future__ import annotations

import torch

from loco.methods.base import Method, StepOutput, register


@register
class LoCo(Method):
    name = "loco"

    def __init__(self, backbone, cfg) -> None:
        super().__init__(backbone, cfg)
        first = 0 if cfg.method.first_stage_loss else 1
        if backbone.num_modules < 2:
            from loco.errors import LocoError

            raise LocoError("method.name=loco needs at least 2 local modules; use a finer model.split")
        self.loss_modules = list(range(first, backbone.num_modules))
        self.heads = self.projection_heads(self.loss_modules)
        self.upper_only = cfg.method.shared_update == "upper"

    def training_step(self, views: list[torch.Tensor], labels: torch.Tensor | None = None) -> StepOutput:
        x, losses = torch.cat(views), {}
        below = None  # (output, own cotangent) of module k-1, waiting for L_k's feedback
        for k in range(self.backbone.num_modules):
            x_in = x.detach().requires_grad_(k > 0)  # L_k may reach module k-1, not further
            h = self.backbone.forward_module(k, x_in)
            if k in self.loss_modules:
                losses[f"loss/s{k + 1}"], own = self.local_loss(k, h)
            else:
                own = torch.zeros_like(h)
            if below is not None:
                h_below, own_below = below
                (feedback,) = torch.autograd.grad(h, x_in, own, retain_graph=True)
                weight_cot = feedback if self.upper_only else own_below + feedback
                torch.autograd.backward(h_below, weight_cot, inputs=self.module_params(k - 1))
            below = (h, own)
            x = h
        h_top, own_top = below
        torch.autograd.backward(h_top, own_top, inputs=self.module_params(self.backbone.num_modules - 1))
        return StepOutput(losses, self.readout(x))
