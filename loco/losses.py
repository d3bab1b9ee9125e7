"""Losses as pure functions: ``embeddings -> scalar``.

``nt_xent`` takes the two views stacked as ``[z_view1; z_view2]`` and, when a process
group is initialised, uses the embeddings of *all* ranks as negatives, with gradients
flowing back to the rank that produced them (the cross-rank mask is the most common bug
in public SimCLR code; here positives are found by global index).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import ParamSpec

import torch
import torch.distributed as dist
import torch.nn.functional as F

# the ranks whose embeddings are negatives (None: all); stage parallelism narrows it to the
# replicas of one stage (loco.parallel), the losses themselves stay group-agnostic
_negatives_group: dist.ProcessGroup | None = None


@contextlib.contextmanager
def negatives_group(group: dist.ProcessGroup | None) -> Iterator[None]:
    """Gather negatives (and send their gradients back) within ``group`` only."""
    global _negatives_group
    old, _negatives_group = _negatives_group, group
    try:
        yield
    finally:
        _negatives_group = old


P = ParamSpec("P")


class _GatherWithGrad(torch.autograd.Function):
    """all_gather (ranks may hold different row counts, e.g. after skipped images) whose
    backward sums the gradients of every rank and returns this rank's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int], start: int, group) -> torch.Tensor:  # type: ignore[override]
        padded = x.new_zeros((max(counts), *x.shape[1:]))
        padded[: x.shape[0]] = x
        out = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(out, padded.contiguous(), group=group)
        ctx.start, ctx.n, ctx.group = start, x.shape[0], group
        return torch.cat([o[:c] for o, c in zip(out, counts)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.start : ctx.start + ctx.n], None, None, None


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Rows of all ranks (rank-major) and the offset of this rank's rows in them."""
    if not (dist.is_available() and dist.is_initialized()):
        return x, 0
    group = _negatives_group
    if dist.get_world_size(group) == 1:
        return x, 0
    sizes = [
        torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size(group))
    ]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device), group=group)
    counts = [int(s) for s in sizes]
    start = sum(counts[: dist.get_rank(group)])
    return _GatherWithGrad.apply(x, counts, start, group), start


def upcast(z: torch.Tensor) -> torch.Tensor:
    """Similarities in at least fp32 (bf16 logits / temperature lose the ranking)."""
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def full_precision(loss: Callable[P, torch.Tensor]) -> Callable[P, torch.Tensor]:
    """Run ``loss`` with autocast off: upcasting ``z`` alone is not enough, because inside
    ``torch.autocast`` the matmul (and normalisation) would run in bf16 again, rounding
    logits up to 1/T in steps of 0.03-0.06. The decoders before it stay in autocast."""

    @functools.wraps(loss)
    def wrapped(*args: P.args, **kwargs: P.kwargs) -> torch.Tensor:
        with contextlib.ExitStack() as stack:
            for device_type in ("cuda", "cpu"):
                if torch.is_autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            return loss(*args, **kwargs)

    return wrapped


@full_precision
def nt_xent(z: torch.Tensor, temperature: float, gather: bool = True) -> torch.Tensor:
    """SimCLR's NT-Xent loss for ``z = [z1; z2]`` (shape [2B, D]).

    Each of the 2B local embeddings is a query; its positive is the other view of the
    same image, its negatives the other 2(B*W)-2 embeddings of all W ranks.
    """
    z = F.normalize(upcast(z), dim=1)
    n = z.shape[0]
    if n % 2:
        raise ValueError("nt_xent expects two views stacked along the batch dimension")
    keys, offset = gather_with_grad(z) if gather else (z, 0)
    b = n // 2
    local = torch.arange(n, device=z.device)
    positives = offset + (local + b) % n
    logits = z @ keys.T / temperature
    logits[local, offset + local] = float("-inf")  # a query is not its own negative
    return F.cross_entropy(logits, positives)


@full_precision
def supcon(
    z: torch.Tensor, labels: torch.Tensor, temperature: float, gather: bool = True
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out) for ``z = [z1; z2]``.

    ``labels`` has one entry per image (length B); every embedding with the same label is a
    positive.
    """
    z = F.normalize(upcast(z), dim=1)
    n = z.shape[0]
    labels = labels.repeat(2)
    keys, offset = gather_with_grad(z) if gather else (z, 0)
    key_labels, _ = gather_with_grad(labels.to(z.dtype)) if gather else (labels.to(z.dtype), 0)
    local = torch.arange(n, device=z.device)
    logits = z @ keys.T / temperature
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[local, offset + local] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    pos = (labels[:, None].to(z.dtype) == key_labels[None, :]) & ~self_mask
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    log_prob = log_prob.masked_fill(self_mask, 0.0)
    return -((log_prob * pos).sum(1) / pos.sum(1).clamp(min=1)).mean()


@full_precision
def reconstruction_bce(logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """InfoPro's reconstruction loss: BCE between sigmoid(logits) and the image in [0, 1]."""
    return F.binary_cross_entropy_with_logits(upcast(logits), images.to(upcast(logits).dtype))
