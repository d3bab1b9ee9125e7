"""One rank's share of stage-parallel local learning: local module k, its decoder(s) and
its optimizer updates.

The rank receives module k-1's output from the rank below (stage 0 reads the images),
sends its own output up, trains module k with its local loss and, for ``loco``, sends the
cotangent dL_k/dh_{k-1} down and waits for dL_{k+1}/dh_k from above. ``greedy`` and
``infopro`` send nothing down. The building blocks are the method's own
(``StagedBackbone.forward_graph``, ``Method.local_loss``), so a stage computes exactly what
the single-process ``training_step`` computes for that module.

Schedules (batch t = the t-th batch of this replica, counted from 0):

``sync``
    Stage k works on batch t in optimizer step t, as the single-process step does: its
    gradient is the same (float64: equal to rounding), so are the weights after N steps.
    Upper stages start as soon as the activation arrives, so greedy/infopro already
    overlap module k's backward with module k+1's forward.

``pipelined``
    Stage k works on batch t in step t + k: batch t+1 enters module k-1 while module k
    works on batch t; after a fill of K-1 steps every stage is busy.
    * greedy / infopro: no feedback, so nothing is stale: every update equals the
      single-process one (the pipeline only changes *when* it happens).
    * loco: the feedback dL_{k+1}/dh_k(t) for batch t is computed by stage k+1 while stage k
      already runs batch t+1. A stage below the top therefore applies the update of batch
      t one step late, after its forward of batch t+1, and computes it at the weights it
      ran batch t with (they are kept for that: weight stashing). With W_k^(n) the weights
      of module k and its decoder after n updates (batches 0..n-1), a stage k < K-1 runs
      batch t at W_k^(t-1) (W^(0) for t = 0), and
          W_k^(t+1) = W_k^(t) - lr_t * grad_t,
          grad_t = d/dW [ L_k(t) ] + J_k(t)^T fb_k(t) at W_k^(t-1) (own loss and decoder too),
      where fb_k(t) = dL_{k+1}/dh_k for batch t, computed by stage k+1 with the weights it
      ran batch t with. The top stage runs batch t at W^(t) (no delay): its input comes
      from the stashed weights below. A drain (before a checkpoint, on a stop signal, at
      the end) applies every outstanding update; the batch after it runs at W^(t) again.
      ``simulate_pipelined`` in tests/test_stage_parallel.py is this schedule in one process.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.func import functional_call

from loco.distributed import average_gradients
from loco.losses import negatives_group
from loco.methods.base import Method
from loco.models.backbone import ModuleGraph
from loco.parallel.layout import StageGroups, StageLayout

_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def owned_parameter_names(method: Method, k: int) -> list[str]:
    """Names (in ``method.named_parameters()``) of module k and of its decoder(s): every
    decoder ModuleDict of a method is keyed by the module it sits on."""
    backbone_ids = {id(p) for p in method.backbone.module_parameters(k)}
    names = []
    for name, p in method.named_parameters():
        if name.startswith("backbone."):
            if id(p) in backbone_ids:
                names.append(name)
        elif name.split(".")[1:2] == [str(k)]:
            names.append(name)
    return names


def owned_state_names(method: Method, k: int) -> set[str]:
    """Keys of ``method.state_dict()`` that stage k trains: its parameters and the buffers
    (BatchNorm statistics) of its units and decoders."""
    names = set(owned_parameter_names(method, k))
    units = [u.path for u in method.backbone.groups[k]]
    for name, _ in method.named_buffers():
        if name.startswith("backbone.body."):
            path = name.removeprefix("backbone.body.")
            if any(path.startswith(u + ".") for u in units):
                names.add(name)
        elif name.split(".")[1:2] == [str(k)]:
            names.add(name)
    return names & set(method.state_dict())


class _Call(nn.Module):
    """Runs a closure under ``functional_call`` so that module k's forward and backward see
    stashed weights (the backbone's own parameters stay untouched)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, fn: Callable[[], Any]) -> Any:
        return fn()


@dataclass
class _Pending:
    """A batch whose update waits for the feedback from above (loco, below the top)."""

    t: int
    graph: ModuleGraph
    own: torch.Tensor
    stash: dict[str, torch.Tensor] | None  # backbone weights it ran with (pipelined)
    head_grads: list[torch.Tensor | None] = field(default_factory=list)


class StageEngine:
    """Feeds batches through this rank's stage and applies its optimizer updates."""

    def __init__(
        self,
        method: Method,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        layout: StageLayout,
        rank: int,
        groups: StageGroups,
        schedule: str = "sync",
        grad_clip: float = 0.0,
        probe: nn.Module | None = None,
        scaler: Any = None,
    ) -> None:
        if schedule not in ("sync", "pipelined"):
            raise ValueError(f"unknown schedule {schedule!r}")
        if scaler is not None and schedule != "sync":
            raise ValueError("a gradient scaler needs the sync schedule (one step on all stages)")
        self.method, self.backbone = method, method.backbone
        self.optimizer, self.scheduler = optimizer, scheduler
        self.groups, self.grad_clip, self.probe = groups, grad_clip, probe
        # fp16 (sync only): a scaler whose unscale_ agrees on inf/NaN across every rank
        # (ShardedGradScaler over the world), so all stages keep one scale and skip together
        self.scaler = scaler
        self.k, self.top = layout.stage_of(rank), layout.stages - 1
        self.up = rank + 1 if self.k < self.top else None
        self.down = rank - 1 if self.k > 0 else None
        self.feedback = method.name == "loco"
        self.own_loss = self.k in getattr(method, "loss_modules", range(layout.stages))
        self.upper_only = bool(getattr(method, "upper_only", False))
        self.pipelined = schedule == "pipelined"
        self.lag = self.k if self.pipelined else 0
        self.defer = self.pipelined and self.feedback and self.k < self.top
        names = set(owned_parameter_names(method, self.k))
        named = dict(method.named_parameters())
        self.params = [named[n] for n in sorted(names)]
        self.stash_names = {
            n.removeprefix("backbone."): named[n] for n in names if n.startswith("backbone.")
        }
        self.head_params = [named[n] for n in sorted(names) if not n.startswith("backbone.")]
        self._call = _Call(self.backbone)
        self.queue: deque[tuple[int, list[torch.Tensor], torch.Tensor | None]] = deque()
        self.pending: _Pending | None = None
        self.sends: list[tuple[Any, torch.Tensor]] = []
        self.fed = 0  # batches given to this stage
        self.applied = 0  # optimizer updates done
        self.values: dict[str, float] = {}  # latest losses / probe metrics of this stage

    # -- point to point ----------------------------------------------------------------
    def _send(self, t: torch.Tensor, dst: int) -> None:
        t = t.detach().contiguous()
        header = torch.zeros(8, dtype=torch.long, device=t.device)
        header[0], header[1] = _DTYPES.index(t.dtype), t.dim()
        header[2 : 2 + t.dim()] = torch.tensor(t.shape)
        for x in (header, t):
            self.sends.append((dist.isend(x, dst, group=self.groups.p2p), x))

    def _recv(self, src: int, device: torch.device) -> torch.Tensor:
        header = torch.empty(8, dtype=torch.long, device=device)
        dist.recv(header, src, group=self.groups.p2p)
        dtype, ndim = _DTYPES[int(header[0])], int(header[1])
        out = torch.empty(header[2 : 2 + ndim].tolist(), dtype=dtype, device=device)
        dist.recv(out, src, group=self.groups.p2p)
        return out

    def _wait_sends(self) -> None:
        for work, _ in self.sends:
            work.wait()
        self.sends.clear()

    # -- the schedule ------------------------------------------------------------------
    def feed(self, views: list[torch.Tensor], labels: torch.Tensor | None) -> None:
        """One optimizer step's batch enters the pipeline; the stage works on the batch
        that is due (this one in ``sync``, the one k steps older in ``pipelined``)."""
        self._wait_sends()  # the previous step's sends (their receivers are due first)
        self.queue.append((self.fed, views, labels))
        self.fed += 1
        while len(self.queue) > self.lag:
            self._process(*self.queue.popleft())

    def drain(self) -> None:
        """Finish every batch fed so far (all ranks call it at the same step)."""
        while self.queue:
            self._process(*self.queue.popleft())
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._finish(pending)
        self._wait_sends()

    @property
    def idle(self) -> bool:
        return not self.queue and self.pending is None

    def _with_weights(self, stash: dict[str, torch.Tensor] | None, fn: Callable[[], Any]) -> Any:
        if stash is None:
            return fn()
        return functional_call(self._call, {f"backbone.{n}": w for n, w in stash.items()}, (fn,))

    def _process(self, t: int, views: list[torch.Tensor], labels: torch.Tensor | None) -> None:
        with negatives_group(self.groups.stage):
            self._process_batch(t, views, labels)

    def _process_batch(
        self, t: int, views: list[torch.Tensor], labels: torch.Tensor | None
    ) -> None:
        k, method = self.k, self.method
        images = torch.cat(views)
        device = images.device
        if hasattr(method, "_images"):  # infopro's reconstruction target and SupCon labels
            method._images, method._labels = images, labels  # type: ignore[attr-defined]
        x = images if self.down is None else self._recv(self.down, device)
        x_in = x.detach().requires_grad_(self.feedback and k > 0)
        passes = 2 if self.feedback and 0 < k < self.top else 1
        stash = (
            {n: p.detach().clone().requires_grad_(True) for n, p in self.stash_names.items()}
            if self.defer
            else None
        )
        graph = self._with_weights(stash, lambda: self.backbone.forward_graph(k, x_in, passes))
        h = graph.output
        if self.up is not None:
            self._send(h, self.up)
        if self.own_loss:
            loss, own = method.local_loss(k, h)
            self.values[f"loss/s{k + 1}"] = float(loss)
        else:
            own = torch.zeros_like(h)
        if self.k == self.top and self.probe is not None and labels is not None:
            self.values.update(self.probe.step(method.readout(h), labels.repeat(len(views))))
        if self.feedback and k > 0:
            if k == self.top:
                fb = graph.backward(own, input_grad=True)
            else:
                fb = self._with_weights(stash, lambda: graph.input_grad(own))
            assert fb is not None
            self._send(fb, self.down)  # type: ignore[arg-type]
        if self.feedback and k < self.top:
            item = _Pending(t, graph, own, stash)
            if self.defer:  # the decoder's gradient of batch t waits with the module's
                item.head_grads = [p.grad for p in self.head_params]
                for p in self.head_params:
                    p.grad = None
                previous, self.pending = self.pending, item
                if previous is not None:
                    self._finish(previous)
            else:
                self._finish(item)
        else:
            if not (self.feedback and k == self.top):
                graph.backward(own)
            self._apply(t)
        if hasattr(method, "_images"):
            method._images = method._labels = None  # type: ignore[attr-defined]

    def _finish(self, item: _Pending) -> None:
        """Batch ``item.t``'s update once dL_{k+1}/dh_k has come down."""
        fb = self._recv(self.up, item.own.device)  # type: ignore[arg-type]
        if item.head_grads:
            for p, g in zip(self.head_params, item.head_grads, strict=True):
                p.grad = g
        cotangent = fb if self.upper_only else item.own + fb
        with negatives_group(self.groups.stage):
            self._with_weights(item.stash, lambda: item.graph.backward(cotangent))
        if item.stash is not None:
            for n, w in item.stash.items():
                p = self.stash_names[n]
                if w.grad is not None:
                    p.grad = w.grad if p.grad is None else p.grad + w.grad
        self._apply(item.t)

    def _apply(self, t: int) -> None:
        """Average within the stage group, clip, step with batch t's learning rate. With a
        scaler: unscale first; an inf/NaN on any rank skips this step on every rank (sync:
        each rank applies exactly once per step, so the agreement is one all-reduce)."""
        average_gradients(self.params, self.groups.stage)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip > 0:
            self._clip()
        self.scheduler.step_update(t)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.values["loss_scale"] = float(self.scaler.get_scale())
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.applied += 1

    def _clip(self) -> None:
        """``sync``: the global norm over all stages, as the single process clips;
        ``pipelined``: each stage clips its own gradient (its stages' updates belong to
        different batches, so there is no common norm to take)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        sq = torch.stack([g.detach().double().pow(2).sum() for g in grads]).sum()
        if not self.pipelined:
            dist.all_reduce(sq, group=self.groups.replica)
        scale = (self.grad_clip / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.to(g.dtype))
