"""SimCLR (Chen et al. 2020): NT-Xent over both views, negatives from all ranks; SupCon
(Khosla et al. 2020) with labels under InfoPro's ``method.supervised``. The loss functions
live in :mod:`loco.losses` (InfoPro's reconstruction shares their fp32 rule)."""

from __future__ import annotations

import torch

from loco.losses import nt_xent, supcon
from loco.objectives.base import HeadSizes, Objective, register


@register
class SimCLR(Objective):
    name = "simclr"
    head = HeadSizes(mlp_layers=2, hidden_dim=512, out_dim=128)  # loco's defaults

    def loss(self, z, target=None, labels=None) -> torch.Tensor:
        t = self.cfg.method.temperature
        if self.cfg.method.supervised and labels is not None:
            return supcon(z, labels, t, gather=self.gather)
        return nt_xent(z, t, gather=self.gather)
