"""The contrastive losses compute their logits in fp32 even inside bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from loco.losses import nt_xent, supcon


def _loss_and_grad(loss_fn, z: torch.Tensor, autocast: bool) -> tuple[float, torch.Tensor]:
    z = z.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = loss_fn(z)
    loss.backward()
    assert z.grad is not None
    return loss.item(), z.grad


@pytest.mark.parametrize("name", ["nt_xent", "supcon"])
def test_bf16_autocast_gives_the_fp32_loss_and_gradient(name, one_thread):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(64, 128, generator=gen)  # two views of 32 images, 128-d, T = 0.1
    labels = torch.randint(0, 4, (32,), generator=gen)
    fns = {
        "nt_xent": lambda z: nt_xent(z, 0.1, gather=False),
        "supcon": lambda z: supcon(z, labels, 0.1, gather=False),
    }
    ref_loss, ref_grad = _loss_and_grad(fns[name], z, autocast=False)
    loss, grad = _loss_and_grad(fns[name], z, autocast=True)
    # bf16 logits (8 mantissa bits, |logit| <= 10) differ from these by ~1e-4 (measured 2e-4)
    assert abs(loss - ref_loss) <= 1e-5
    assert (grad - ref_grad).abs().max().item() <= 1e-5
    assert grad.dtype == torch.float32


def test_autocast_stays_on_outside_the_loss(one_thread):
    """Only the loss leaves autocast: a layer after it is bf16 again."""
    lin = torch.nn.Linear(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nt_xent(torch.randn(4, 8), 0.5, gather=False)
        assert lin(torch.randn(2, 8)).dtype == torch.bfloat16
