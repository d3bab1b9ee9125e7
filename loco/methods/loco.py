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
The top module gets nothing from above, so there both come from one backward pass. With
activation recomputation (``train.recompute``), a recomputed segment of a middle module
keeps its activations through the first pass and is recomputed once, for the second
(:class:`loco.models.backbone.ModuleGraph`).
"""

from __future__ import annotations

import torch

from loco.errors import LocoError
from loco.methods.base import Method, StepOutput, register


@register
class LoCo(Method):
    name = "loco"
    options = ("first_stage_loss", "shared_update")

    @classmethod
    def check_options(cls, m) -> None:
        if m.shared_update not in ("both", "upper"):
            raise LocoError(
                f"config key 'method.shared_update' = {m.shared_update!r} is not one of both, upper"
            )

    def __init__(self, backbone, cfg) -> None:
        super().__init__(backbone, cfg)
        first = 0 if cfg.method.first_stage_loss else 1
        if backbone.num_modules < 2:
            raise LocoError(
                "method.name=loco needs at least 2 local modules; use a finer model.split"
            )
        self.loss_modules = list(range(first, backbone.num_modules))
        self.heads = self.projection_heads(self.loss_modules)
        self.upper_only = cfg.method.shared_update == "upper"

    def training_step(
        self, views: list[torch.Tensor], labels: torch.Tensor | None = None
    ) -> StepOutput:
        x, losses = torch.cat(views), {}
        top = self.backbone.num_modules - 1
        below = None  # (graph, own cotangent) of module k-1, waiting for L_k's feedback
        for k in range(top + 1):
            x_in = x.detach().requires_grad_(k > 0)  # L_k may reach module k-1, not further
            # middle modules are backpropagated twice (input gradient now, weights later)
            graph = self.backbone.forward_graph(k, x_in, passes=1 if k in (0, top) else 2)
            h = graph.output
            if k in self.loss_modules:
                losses[f"loss/s{k + 1}"], own = self.local_loss(k, h, x_in.detach())
            else:
                own = torch.zeros_like(h)
            if below is not None:
                # nothing comes from above the top: one pass gives its weights and the feedback
                feedback = (
                    graph.backward(own, input_grad=True) if k == top else graph.input_grad(own)
                )
                graph_below, own_below = below
                graph_below.backward(feedback if self.upper_only else own_below + feedback)
            below = (graph, own)
            x = h
        return StepOutput(losses, self.readout(x))
