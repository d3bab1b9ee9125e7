"""Barlow Twins (Zbontar et al. 2021): the cross-correlation of the two views' embeddings,
each dimension standardised over the *global* batch, is pushed to the identity. The
embeddings of all ranks are gathered (gradients flow back), so every rank computes the
loss of the whole batch."""

from __future__ import annotations

import torch

from loco.losses import full_precision, gather_with_grad, upcast
from loco.objectives.base import HeadSizes, Objective, register


def standardise(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-dimension zero mean, unit (biased) variance over the batch, as BatchNorm1d
    without affine parameters does in the paper's code."""
    return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + eps)


@full_precision
def barlow_loss(
    z: torch.Tensor, lambd: float, scale: float = 1.0, gather: bool = True
) -> torch.Tensor:
    """``sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2`` for ``z = [z1; z2]``, with
    ``C = std(z1)^T std(z2) / N`` over the N images of all ranks."""
    z = upcast(z)
    b = z.shape[0] // 2
    z1, z2 = (gather_with_grad(v)[0] if gather else v for v in (z[:b], z[b:]))
    c = standardise(z1).T @ standardise(z2) / z1.shape[0]
    on = (1 - torch.diagonal(c)).pow(2).sum()
    off = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return scale * (on + lambd * off)


@register
class BarlowTwins(Objective):
    name = "barlow"
    # paper (ImageNet): 3 layers, 8192 wide and out; the loss wants a wide embedding
    head = HeadSizes(mlp_layers=3, hidden_dim=1024, out_dim=1024)

    def loss(self, z, target=None, labels=None) -> torch.Tensor:
        o = self.options
        return barlow_loss(z, o.lambd, o.scale_loss, self.gather)
