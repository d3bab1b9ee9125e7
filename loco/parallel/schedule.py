"""What a stage-parallel step should cost: a schedule model.

Each stage's step is a chain of phases, in the order :class:`loco.parallel.stage.StageEngine`
runs them: forward of its module (F), its decoder and local loss, forward and backward (H),
for loco the input-gradient pass that produces the feedback (X, not on stage 0), and the
weight-gradient pass (W). Sends cost ``bytes / bandwidth``. Every step ends with a tiny
all-reduce (all ranks agree on stopping), so steps do not overlap and a step's time is the
latest stage's finish:

* ``sync``: stage k starts when module k-1's output arrives; for loco a stage below the top
  starts W when stage k+1's feedback for the same batch arrives.
* ``pipelined``: every stage starts at once (its input was sent in the previous step);
  loco's W still waits for the feedback stage k+1 computes in the same step.
* sequential (one process): the sum of all phases.

The phases come from measured times (``loco bench --stage-parallel K``) or from FLOPs with a
GPU-like cost model (backward = 2 x forward), which for ResNet-50 ``stages`` with the
paper's FLOP shares 19/25/36/20 % caps greedy's pipelined speed-up near 1/0.36 = 2.8x.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch

from loco.methods.base import Method
from loco.profiling import count_flops


@dataclass
class StageCost:
    forward: float  # F: the module's forward
    head: float  # H: decoder + loss, forward and backward
    input_grad: float  # X: loco's feedback pass (0 on stage 0 and for greedy/infopro)
    weight_grad: float  # W: the module's weight gradients (the top's one pass does X and W)
    out_bytes: int  # the activation sent up (= the cotangent that comes back down)
    saved_bytes: int = 0  # activations one batch's module forward keeps for the backward
    param_bytes: int = 0  # the stage's weights (module, and its decoder where measured)
    head_saved_bytes: int = 0  # the decoder + loss forward's, alive only during its backward

    @property
    def total(self) -> float:
        return self.forward + self.head + self.input_grad + self.weight_grad


def predict(
    costs: list[StageCost],
    feedback: bool,
    schedule: str,
    bandwidth: float = float("inf"),
    step_overhead: float = 0.0,
) -> dict[str, float]:
    """Step time of one replica's K stages, the one-process time, and the speed-up."""
    K = len(costs)
    comm = [c.out_bytes / bandwidth for c in costs]
    start = [0.0] * K
    if schedule == "sync":
        for k in range(1, K):
            start[k] = start[k - 1] + costs[k - 1].forward + comm[k - 1]
    # feedback ready: after F, H and X (the top: after its one backward pass)
    ready = [
        start[k]
        + costs[k].forward
        + costs[k].head
        + costs[k].input_grad
        + (costs[k].weight_grad if k == K - 1 else 0.0)
        for k in range(K)
    ]
    finish = []
    for k, c in enumerate(costs):
        own = start[k] + c.forward + c.head + c.input_grad
        if feedback and k < K - 1:
            w_start = max(own, ready[k + 1] + comm[k])
        else:
            w_start = own
        finish.append(w_start + c.weight_grad)
    step = max(finish) + step_overhead
    sequential = sum(c.total for c in costs)
    busiest = max(range(K), key=lambda k: costs[k].total)
    return {
        "step_s": step,
        "sequential_s": sequential,
        "speedup": sequential / step,
        "bottleneck_stage": busiest + 1,
        "bottleneck_share": costs[busiest].total / sequential,
    }


def memory(
    costs: list[StageCost],
    feedback: bool,
    schedule: str,
    opt_slots: int = 1,
    input_bytes: int = 0,
) -> list[dict]:
    """Bytes per device (stage k), at its peak within a step:

    * weights: parameters + gradients + ``opt_slots`` optimizer tensors per parameter
      (SGD/LARS momentum 1, AdamW 2); pipelined loco below the top adds one stashed copy of
      the module's weights (the batch whose update waits for feedback ran with them);
    * activations: what the module's forward saves, for ``batches_kept`` batches (pipelined
      loco below the top: 2, the batch waiting for its feedback and the one running), plus
      the decoder + loss forward of the batch being run;
    * queued inputs: pipelined, stage k holds the images of the k batches fed but not yet
      due there (``input_bytes`` each; only infopro and the probe read them above stage 0).
    """
    out = []
    for k, c in enumerate(costs):
        deferred = schedule == "pipelined" and feedback and k < len(costs) - 1
        graphs = 2 if deferred else 1
        queued = k if schedule == "pipelined" else 0
        weights = c.param_bytes * (2 + opt_slots + (1 if deferred else 0))
        activations = graphs * c.saved_bytes + c.head_saved_bytes
        out.append(
            {
                "stage": k + 1,
                "weights_bytes": weights,
                "activation_bytes": activations,
                "batches_kept": graphs,
                "queued_batches": queued,
                "queued_bytes": queued * input_bytes,
                "total_bytes": weights + activations + queued * input_bytes,
            }
        )
    return out


def flop_costs(
    module_flops: list[float], head_flops: list[float], feedback: bool
) -> list[StageCost]:
    """A GPU-like cost model: time = FLOPs, backward = 2 x forward, split for loco into an
    input-gradient and a weight-gradient pass of 1 x forward each."""
    costs = []
    for k, (m, h) in enumerate(zip(module_flops, head_flops, strict=True)):
        x = m if feedback and k > 0 else 0.0
        costs.append(StageCost(m, 3 * h, x, 2 * m - x, 0))
    return costs


@torch.no_grad()
def module_and_head_flops(method: Method, image_size: int) -> tuple[list[int], list[int]]:
    """Forward FLOPs of every local module and of its decoder(s), for one 2-image batch."""
    was = method.training
    method.eval()
    try:
        p = next(method.parameters())
        x = torch.zeros(2, 3, image_size, image_size, dtype=p.dtype, device=p.device)
        mods, heads = [], []
        head = getattr(method, "heads", {})
        for k in range(method.backbone.num_modules):
            mods.append(count_flops(functools.partial(method.backbone.forward_module, k, x)))
            x = method.backbone.forward_module(k, x)
            key = str(k)
            heads.append(count_flops(functools.partial(head[key], x)) if key in head else 0)
        return mods, heads
    finally:
        method.train(was)


def stage_bytes(method: Method, image_size: int, images: int) -> list[dict[str, int]]:
    """Per stage, for a batch of ``images`` x 2 views (fp32, train mode): bytes its module's
    forward saves for backward, bytes its decoder + loss forward saves, its output's bytes
    and its parameters' bytes (module + decoder). Measured at 2 images and scaled linearly
    (NT-Xent's 2B x 2B similarities grow faster; they are a small part at these sizes).
    BatchNorm statistics and the random state are left as they were."""
    from loco.parallel.stage import owned_parameter_names
    from loco.profiling import SavedTensorTracker

    measured = 2
    scale = images / measured
    was = method.training
    bn = {n: b.clone() for n, b in method.named_buffers()}
    named = dict(method.named_parameters())
    exclude = [*method.parameters(), *method.buffers()]
    p = next(method.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * measured, 3, image_size, image_size, generator=g).to(p)
    rows = []
    method.train()
    try:
        with torch.random.fork_rng(devices=[]):
            if hasattr(method, "_images"):
                method._images = x  # type: ignore[attr-defined]
            for k in range(method.backbone.num_modules):
                x_in = x.detach().requires_grad_(k > 0)
                with SavedTensorTracker(exclude) as module_saved:
                    h = method.backbone.forward_module(k, x_in)
                    saved = module_saved.live
                with SavedTensorTracker(exclude) as head_saved:
                    loss = method.head_loss(k, h.detach().requires_grad_(True))
                    head = head_saved.live
                del loss
                params = sum(
                    named[n].numel() * named[n].element_size()
                    for n in owned_parameter_names(method, k)
                )
                rows.append(
                    {
                        "saved_bytes": int(saved * scale),
                        "head_saved_bytes": int(head * scale),
                        "out_bytes": int(h.numel() * h.element_size() * scale),
                        "param_bytes": params,
                    }
                )
                x = h.detach()
    finally:
        if hasattr(method, "_images"):
            method._images = None  # type: ignore[attr-defined]
        with torch.no_grad():
            for n, b in method.named_buffers():
                b.copy_(bn[n])
        method.zero_grad(set_to_none=True)
        method.train(was)
    return rows


def placement_report(method: Method, image_size: int) -> str:
    """Which module each stage runs, its share of the step's FLOPs, the bottleneck."""
    mods, heads = module_and_head_flops(method, image_size)
    total = sum(mods) + sum(heads)
    rows = []
    for k, g in enumerate(method.backbone.groups):
        share = (mods[k] + heads[k]) / total
        span = g[0].path if len(g) == 1 else f"{g[0].path} .. {g[-1].path}"
        rows.append(
            f"  S{k + 1}: {span}: {100 * share:.0f}% of the step's FLOPs "
            f"(module {100 * mods[k] / total:.0f}%, decoder {100 * heads[k] / total:.0f}%)"
        )
    shares = [(m + h) / total for m, h in zip(mods, heads, strict=True)]
    worst = max(range(len(shares)), key=shares.__getitem__)
    rows.append(
        f"  expected bottleneck: S{worst + 1} ({100 * shares[worst]:.0f}%): pipelined speed-up "
        f"at most {1 / shares[worst]:.2f}x over one device"
    )
    return "placement (FLOPs, GPU-like cost model):\n" + "\n".join(rows)


def as_dicts(costs: list[StageCost]) -> list[dict]:
    return [asdict(c) for c in costs]
