"""MoCo v3 (Chen, Xie, He 2021): symmetric InfoNCE between the online predictor's queries
and the momentum encoder's keys of the other view; the keys of all ranks are the
candidates (the batch is the dictionary), this rank's own images the positives."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loco.losses import full_precision, gather_with_grad, upcast
from loco.objectives.base import HeadSizes, Objective, register


@full_precision
def mocov3_loss(
    q: torch.Tensor, k: torch.Tensor, temperature: float, gather: bool = True
) -> torch.Tensor:
    """``ctr(q1, k2) + ctr(q2, k1)`` for ``q = [q1; q2]``, ``k = [k1; k2]`` (keys constant);
    ``ctr(q, k)`` is cross-entropy over ``q . k_all / T`` with the same image's key as the
    positive, times ``2 T`` (the paper's scaling)."""
    q, k = F.normalize(upcast(q), dim=1), F.normalize(upcast(k.detach()), dim=1)
    b = q.shape[0] // 2
    total = q.new_zeros(())
    for queries, keys in ((q[:b], k[b:]), (q[b:], k[:b])):
        all_keys, offset = gather_with_grad(keys) if gather else (keys, 0)
        labels = offset + torch.arange(b, device=q.device)
        total = total + F.cross_entropy(queries @ all_keys.T / temperature, labels)
    return total * 2 * temperature


@register
class MocoV3(Objective):
    name = "mocov3"
    # paper (ImageNet, ResNet-50): projector 3 layers 4096 wide, 256 out; predictor 2 layers
    head = HeadSizes(mlp_layers=3, hidden_dim=512, out_dim=128)
    predictor = True
    momentum = True

    def loss(self, z, target=None, labels=None) -> torch.Tensor:
        assert target is not None, "mocov3 needs the momentum keys"
        return mocov3_loss(z, target, self.options.temperature, self.gather)

    @classmethod
    def check(cls, cfg) -> None:
        from loco.errors import LocoError

        if cfg.objective.mocov3.temperature <= 0:
            raise LocoError("objective.mocov3.temperature must be > 0")
