"""BYOL (Grill et al. 2020): the online predictor's output regresses the momentum target's
projection of the *other* view; no negatives, so nothing is gathered across ranks (the
loss is a per-image mean, and the trainer averages gradients over ranks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loco.losses import full_precision, upcast
from loco.objectives.base import HeadSizes, Objective, register


@full_precision
def byol_loss(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Symmetrised normalised MSE for ``p = [p1; p2]`` (online predictions) and
    ``t = [t1; t2]`` (targets): ``mean ||p1/|p1| - t2/|t2|||^2 + mean ||p2/|p2| - t1/|t1|||^2``,
    i.e. ``2 - 2 cos`` per pair and direction (the paper's L + L~)."""
    p, t = F.normalize(upcast(p), dim=1), F.normalize(upcast(t), dim=1)
    b = p.shape[0] // 2
    swapped = torch.cat([t[b:], t[:b]])  # each view's prediction meets the other's target
    return 2 * (2 - 2 * (p * swapped).sum(dim=1)).mean()


@register
class BYOL(Objective):
    name = "byol"
    # paper (ImageNet): 2 layers, 4096 wide, 256 out; predictor the same
    head = HeadSizes(mlp_layers=2, hidden_dim=512, out_dim=128)
    predictor = True
    momentum = True

    def loss(self, z, target=None, labels=None) -> torch.Tensor:
        assert target is not None, "byol needs the momentum target"
        return byol_loss(z, target)
