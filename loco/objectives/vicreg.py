"""VICReg (Bardes, Ponce, LeCun 2022): invariance (MSE between the views' embeddings),
variance (a hinge keeping each dimension's std over the batch above 1) and covariance
(off-diagonal covariances pushed to 0). As in the paper's code, variance and covariance
are over the *global* batch (embeddings of all ranks gathered with their gradients),
invariance over this rank's images."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loco.losses import full_precision, gather_with_grad, upcast
from loco.objectives.base import HeadSizes, Objective, register


def variance_term(z: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """mean_d relu(1 - sqrt(Var_d + eps)) (unbiased variance, as the paper)."""
    return F.relu(1 - torch.sqrt(z.var(0) + eps)).mean()


def covariance_term(z: torch.Tensor) -> torch.Tensor:
    """sum_{i != j} Cov_ij^2 / D."""
    z = z - z.mean(0)
    cov = z.T @ z / (z.shape[0] - 1)
    return (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / z.shape[1]


@full_precision
def vicreg_loss(
    z: torch.Tensor, sim: float, std: float, cov: float, gather: bool = True
) -> torch.Tensor:
    """``sim * MSE(z1, z2) + std * (v(z1) + v(z2)) / 2 + cov * (c(z1) + c(z2))`` for
    ``z = [z1; z2]``."""
    z = upcast(z)
    b = z.shape[0] // 2
    invariance = F.mse_loss(z[:b], z[b:])
    z1, z2 = (gather_with_grad(v)[0] if gather else v for v in (z[:b], z[b:]))
    variance = (variance_term(z1) + variance_term(z2)) / 2
    covariance = covariance_term(z1) + covariance_term(z2)
    return sim * invariance + std * variance + cov * covariance


@register
class VICReg(Objective):
    name = "vicreg"
    # paper (ImageNet): expander 3 layers, 8192 wide and out
    head = HeadSizes(mlp_layers=3, hidden_dim=1024, out_dim=1024)

    def loss(self, z, target=None, labels=None) -> torch.Tensor:
        o = self.options
        return vicreg_loss(z, o.sim_coeff, o.std_coeff, o.cov_coeff, self.gather)
