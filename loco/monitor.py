"""Representation quality while pretraining runs: an online linear probe.

The probe trains on detached last-module features with its own optimizer, so it never
changes the backbone's gradients; its running accuracy tells a user, hours into a
multi-day run, whether the representation is improving.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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
