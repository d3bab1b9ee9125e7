"""Representation quality while pretraining runs: an online linear probe, a kNN monitor
and a collapse check.

The probe trains on detached last-module features with its own optimizer, so it never
changes the backbone's gradients; its running accuracy tells a user, hours into a
multi-day run, whether the representation is improving. Non-contrastive objectives (BYOL,
VICReg, Barlow Twins) can collapse to a constant embedding while their loss still falls:
:func:`collapse_std` shows it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

COLLAPSE_FLOOR = 0.05  # collapse/std below this: (nearly) collapsed (docs/methods.md)


def collapse_std(features: torch.Tensor) -> float:
    """Spread of the representation: the per-dimension std over the batch of the
    L2-normalised backbone readout (pooled last-module features, what kNN compares),
    averaged over the d dimensions and scaled by sqrt(d). About 1 for embeddings spread
    evenly over the sphere (isotropic), 0 for a collapsed, constant embedding."""
    z = F.normalize(features.detach().float(), dim=1)
    return float(z.std(dim=0).mean() * z.shape[1] ** 0.5)


class OnlineProbe(nn.Module):
    def __init__(self, in_dim: int, num_classes: int, lr: float = 1e-3) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(in_dim, affine=False)
        self.fc = nn.Linear(in_dim, num_classes)
        self.opt = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=0.0)

    def step(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        self.train()
        logits = self.fc(self.norm(features.detach().float()))
        loss = F.cross_entropy(logits, labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        acc = (logits.argmax(1) == labels).float().mean()
        return {"online/loss": loss.item(), "online/acc": acc.item()}

    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        return {"module": super().state_dict(*args, **kwargs), "opt": self.opt.state_dict()}

    def load_state_dict(self, state, strict: bool = True):  # type: ignore[override]
        super().load_state_dict(state["module"], strict=strict)
        self.opt.load_state_dict(state["opt"])


class KNNMonitor:
    """Every ``monitor.knn_every`` steps: kNN top-1 (DINO weighting) of the last module on a
    small fixed labelled subset, so a run's representation quality is visible in its logs."""

    def __init__(self, cfg, device: torch.device) -> None:
        from loco.data.loaders import build_eval_loader

        m = cfg.monitor
        self.k = m.knn_k
        self.device = device
        self.train = build_eval_loader(
            cfg, cfg.data.train_split, 256, per_class=m.knn_train_per_class
        )
        self.val = build_eval_loader(cfg, cfg.data.val_split, 256, per_class=m.knn_val_per_class)

    @torch.no_grad()
    def _features(self, backbone, loader) -> tuple[torch.Tensor, torch.Tensor]:
        from loco.models.heads import pool

        feats, labels = [], []
        for images, y, _ in loader:
            feats.append(pool(backbone(images.to(self.device))[-1]).float().cpu())
            labels.append(y)
        return torch.cat(feats), torch.cat(labels)

    def __call__(self, backbone) -> dict[str, float]:
        from loco.eval.knn import knn_evaluate

        was_training = backbone.training
        backbone.eval()
        try:
            xt, yt = self._features(backbone, self.train)
            xv, yv = self._features(backbone, self.val)
        finally:
            backbone.train(was_training)
        k = min(self.k, len(yt))
        (result,) = knn_evaluate(xt.numpy(), yt.numpy(), xv.numpy(), yv.numpy(), "dino", ks=[k])
        return {"monitor/knn_top1": result.top1}
