"""Device-independent measurements of a training step: FLOPs and activation memory.

* :func:`count_flops` - forward + backward FLOPs with ``torch.utils.flop_counter``.
* :class:`SavedTensorTracker` - the largest total size of tensors *saved for backward*
  alive at any moment (the activation memory that local learning saves), counted once per
  storage, parameters and buffers excluded. Tensors saved inside a checkpointed segment
  and recomputed during backward are counted too (see :meth:`SavedTensorTracker.recomputation`).
* :class:`LiveTensorTracker` - the largest total size of *all* tensors a step creates
  (saved activations, activation gradients, temporaries, new ``.grad`` buffers): what a
  caching allocator would report, on any device.
* :func:`state_bytes` - parameters, gradients and optimizer state.

Nothing here depends on CUDA; figures are exact byte and FLOP counts, so ratios between
methods measured in one process are reproducible on any machine.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, flop_registry


# -- FLOPs ---------------------------------------------------------------------------------
class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker: counts go to "Global" only."""

    parents = ("Global",)

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class TotalFlopCounter(FlopCounterMode):
    """``FlopCounterMode`` without its per-module breakdown.

    The breakdown's module tracker puts backward hooks on module inputs, which makes
    ``torch.autograd.grad`` with a leaf input fail ("A leaf node was passed to
    _will_engine_execute_node"); LoCo's input-gradient pass is such a call.
    """

    def __init__(self) -> None:
        super().__init__(
            display=False,
            custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop},
        )
        self.mod_tracker = _GlobalOnly()  # type: ignore[assignment]


_torch_conv_backward_flop = flop_registry[torch.ops.aten.convolution_backward].__wrapped__


def _conv_backward_flop(*args: Any, out_shape: Any, **kwargs: Any) -> int:
    """torch's formula, except for a grouped convolution's weight gradient, which torch
    counts as if the convolution were dense (groups x too many: 129x a forward pass instead
    of 2x for a 128-group conv). The weight gradient costs what the forward costs."""
    grad_out_shape, x_shape, w_shape = args[:3]
    transposed, output_mask = args[7], args[10]
    input_only = [*args[:10], [output_mask[0], False, False]]
    grad_input = _torch_conv_backward_flop(*input_only, out_shape=out_shape, **kwargs)
    weight = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed) if output_mask[1] else 0
    return grad_input + weight


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of everything ``fn`` runs, backward passes (and recomputation) included.

    Counts the ops ``FlopCounterMode`` knows (matmuls, convolutions, attention); element-wise
    ops (BN, ReLU, the optimizer) are not FLOPs in this sense. A multiply-add is 2 FLOPs.
    """
    with TotalFlopCounter() as counter:
        fn()
    return int(counter.get_total_flops())


# -- storages --------------------------------------------------------------------------------
def _storage_key(t: torch.Tensor) -> tuple[str, int, int] | None:
    """(device, address, bytes) of the storage behind ``t``; None if it has no real storage."""
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, nested, fake tensors
        return None
    nbytes = st.nbytes()
    if nbytes == 0 or st.device.type == "meta":
        return None
    return (str(st.device), st.data_ptr(), nbytes)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Total bytes of the distinct storages behind ``tensors``."""
    keys = {_storage_key(t) for t in tensors}
    return sum(k[2] for k in keys if k is not None)


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes of parameters, of their current ``.grad`` buffers and of the optimizer state."""
    params = [p for p in model.parameters()]
    grads = [p.grad for p in params if p.grad is not None]
    opt: list[torch.Tensor] = []
    if optimizer is not None:
        for state in optimizer.state.values():
            opt += [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return {
        "params": tensor_bytes(params),
        "grads": tensor_bytes(grads),
        "optimizer": tensor_bytes(opt),
    }


class _Ledger:
    """Live bytes per storage with a running peak (and what was alive at the peak, by owner)."""

    def __init__(self, owner: Callable[[], str] | None) -> None:
        self.owner = owner
        self.refs: dict[tuple[str, int], list[Any]] = {}  # storage -> [count, bytes, owner]
        self.live = 0
        self.live_by_owner: dict[str, int] = {}
        self.peak = 0
        self.peak_by_owner: dict[str, int] = {}
        self.lock = threading.RLock()  # a finaliser may fire (via gc) inside add()

    def add(self, key: tuple[str, int, int]) -> None:
        with self.lock:
            entry = self.refs.get(key[:2])
            if entry is not None:
                entry[0] += 1
                return
            who = self.owner() if self.owner else "all"
            self.refs[key[:2]] = [1, key[2], who]
            self.live += key[2]
            self.live_by_owner[who] = self.live_by_owner.get(who, 0) + key[2]
            if self.live > self.peak:
                self.peak = self.live
                self.peak_by_owner = dict(self.live_by_owner)

    def release(self, key: tuple[str, int, int]) -> None:
        with self.lock:
            entry = self.refs.get(key[:2])
            if entry is None:
                return
            entry[0] -= 1
            if entry[0] == 0:
                del self.refs[key[:2]]
                self.live -= entry[1]
                self.live_by_owner[entry[2]] -= entry[1]


class _Saved:
    """What the pack hook hands autograd: the tensor plus a ticket that is returned to the
    ledger when autograd frees the saved tensor (the graph node dies, or backward ran)."""

    __slots__ = ("tensor", "key", "ledger")

    def __init__(self, tensor: torch.Tensor, key: tuple[str, int, int], ledger: _Ledger) -> None:
        self.tensor, self.key, self.ledger = tensor, key, ledger
        ledger.add(key)

    def __del__(self) -> None:
        self.ledger.release(self.key)


class _LedgerReadings:
    """A tracker's ``peak`` and ``live`` bytes, from its ledger."""

    _ledger: _Ledger

    @property
    def peak(self) -> int:
        return self._ledger.peak

    @property
    def live(self) -> int:
        return self._ledger.live


class SavedTensorTracker(_LedgerReadings):
    """Context manager: peak bytes of tensors saved for backward, one count per storage.

    ``exclude`` are tensors whose storages are not activations (parameters, buffers).
    ``owner`` names whoever is saving right now (e.g. "S2", "head") so the peak can be
    broken down (:attr:`peak_by_owner`).

    A saved tensor is alive from the op that saves it until autograd frees its graph node:
    after the backward through that node (without ``retain_graph``) or when the graph is
    dropped. The pack hook wraps each tensor in a small object whose finaliser returns its
    bytes, so the ledger follows autograd's own bookkeeping, including in-place ops (the
    storage is what is counted), views, and tensors saved by several nodes.

    Checkpointed segments (``torch.utils.checkpoint``, non-reentrant) save their input
    through this hook; the tensors they recompute during backward bypass user hooks, so
    the backbone enters :meth:`recomputation` around each recomputation and they are
    counted while the checkpoint holds them. (LoCo's :class:`~loco.models.backbone.ModuleGraph`
    recomputes with ordinary autograd, which this hook sees directly.)

    Not counted: tensors that are alive without being saved (a module's output held by the
    caller, activation gradients); :class:`LiveTensorTracker` sees those.
    """

    def __init__(
        self, exclude: Iterable[torch.Tensor] = (), owner: Callable[[], str] | None = None
    ) -> None:
        self._exclude = {k[:2] for k in map(_storage_key, exclude) if k is not None}
        self._ledger = _Ledger(owner)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self.saved_total = 0  # bytes packed over the whole run (each save counted)
        self.recomputed_total = 0  # the same for tensors saved while recomputing checkpoints

    @property
    def peak_by_owner(self) -> dict[str, int]:
        """Bytes alive at the peak by who saved them ("S1".., "head"; "all" without owners)."""
        return {k: v for k, v in self._ledger.peak_by_owner.items() if v}

    def _pack(self, t: torch.Tensor) -> Any:
        key = _storage_key(t)
        if key is None or key[:2] in self._exclude:
            return t
        self.saved_total += key[2]
        # detach: holding an op's output with its grad_fn would make a reference cycle
        return _Saved(t.detach(), key, self._ledger)

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        return packed.tensor if isinstance(packed, _Saved) else packed

    def __enter__(self) -> SavedTensorTracker:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)

    def recomputation(self) -> contextlib.AbstractContextManager:
        """A (re-enterable) context for a checkpoint's recomputation: counts what it keeps.

        The checkpoint's own hook stores each recomputed tensor until backward unpacks it;
        inside this context every saved tensor is passed on to that hook (as the detached
        alias it would store anyway), and that alias's lifetime is followed with a finaliser.
        """
        return _RecomputeTee(self)


class _RecomputeTee:
    def __init__(self, tracker: SavedTensorTracker) -> None:
        self.tracker = tracker
        self.stack: list[Any] = []

    def __enter__(self) -> None:
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if top is None:  # not inside a checkpoint's recomputation: nothing to follow
            hooks: Any = contextlib.nullcontext()
        else:
            inner_pack, inner_unpack = top
            tracker = self.tracker
            ledger, exclude = tracker._ledger, tracker._exclude

            def pack(t: torch.Tensor) -> Any:
                # the checkpoint keeps a detached alias anyway; handing it ours lets us follow
                # it even when the checkpoint stops recomputing right here (early stop raises)
                kept = t.detach()
                key = _storage_key(kept)
                if key is not None and key[:2] not in exclude:
                    tracker.recomputed_total += key[2]
                    ledger.add(key)
                    weakref.finalize(kept, ledger.release, key)
                return inner_pack(kept)

            hooks = torch.autograd.graph.saved_tensors_hooks(pack, inner_unpack)
        hooks.__enter__()
        self.stack.append(hooks)

    def __exit__(self, *exc: Any) -> None:
        self.stack.pop().__exit__(*exc)


# -- every tensor ------------------------------------------------------------------------------
class LiveTensorTracker(_LedgerReadings, TorchDispatchMode):
    """Peak bytes of all storages created while active (freed ones subtracted).

    A storage counts from the op that allocates it until it is freed. Storages that existed
    before (parameters, inputs, earlier ``.grad`` buffers) are not counted; in-place results
    and views add nothing. Unlike :class:`SavedTensorTracker` this sees every recomputation
    and transient buffer, so it is the device-independent analogue of
    ``torch.cuda.max_memory_allocated`` (minus allocator rounding and library workspaces).
    """

    def __init__(self) -> None:
        super().__init__()
        self._ledger = _Ledger(None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # an output sharing an input's storage is a view or an in-place result: no new bytes
        inputs = {k[:2] for k in map(_storage_key, _tensors((args, kwargs))) if k is not None}
        for t in _tensors(out):
            key = _storage_key(t)
            if key is None or key[:2] in inputs or key[:2] in self._ledger.refs:
                continue
            self._ledger.add(key)
            weakref.finalize(t.untyped_storage(), self._ledger.release, key)
        return out


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


# -- a method's step ---------------------------------------------------------------------------
@contextlib.contextmanager
def owner_labels(method: nn.Module) -> Iterator[Callable[[], str]]:
    """Forward hooks naming who runs: "S1".."SK" for backbone modules, "head" for decoders
    (any ``nn.ModuleDict`` of the method), "other" outside both."""
    stack = ["other"]
    handles = []

    def label(name: str) -> tuple[Callable, Callable]:
        def enter(mod: nn.Module, args: Any) -> None:
            stack.append(name)

        def leave(mod: nn.Module, args: Any, out: Any) -> None:
            stack.pop()

        return enter, leave

    bb = method.backbone
    for k, group in enumerate(bb.groups):
        enter, leave = label(f"S{k + 1}")
        for unit in group:
            mod = bb.unit_module(unit)
            handles += [mod.register_forward_pre_hook(enter), mod.register_forward_hook(leave)]
    enter, leave = label("head")
    owner = getattr(method, "method", method)  # a reference step wraps the method it mirrors
    for child in owner.children():
        if isinstance(child, nn.ModuleDict):
            for head in child.values():
                handles += [
                    head.register_forward_pre_hook(enter),
                    head.register_forward_hook(leave),
                ]
    # a checkpointed segment saves its input before any unit runs: label the whole module
    forward_module = bb.forward_module

    def labelled_forward_module(k: int, x: torch.Tensor) -> torch.Tensor:
        stack.append(f"S{k + 1}")
        try:
            return forward_module(k, x)
        finally:
            stack.pop()

    bb.forward_module = labelled_forward_module
    try:
        yield lambda: stack[-1]
    finally:
        del bb.forward_module  # back to the class's method
        for h in handles:
            h.remove()


def track_step(method: nn.Module, views: list[torch.Tensor]) -> SavedTensorTracker:
    """Run one ``training_step`` under a :class:`SavedTensorTracker` (parameters and buffers
    excluded, owners labelled, recomputation followed); gradients are left in ``.grad``."""
    exclude = [*method.parameters(), *method.buffers()]
    method.zero_grad(set_to_none=True)
    with owner_labels(method) as owner:
        saved = SavedTensorTracker(exclude, owner=owner)
        method.backbone.recompute_context = saved.recomputation
        try:
            with saved:
                method.training_step(views)
        finally:
            method.backbone.recompute_context = None
    return saved


def plan_recompute(
    method: nn.Module, views: list[torch.Tensor], budget: int, max_tries: int = 3
) -> list[bool | int]:
    """Recompute segments until the step's peak saved bytes fit ``budget``, paying few FLOPs.

    Greedy and measured: while over budget, the ``max_tries`` modules holding the most
    bytes at the peak are each tried with one more segment recomputed (its lowest not yet
    recomputed: when its backward reaches that segment the segments above are freed, so
    the recomputed activations fit under the peak), and the one that lowers the peak most
    per extra FLOP is kept. Costs one step per try, so plan with a small batch (saved
    bytes scale with it). Sets and returns ``method.backbone.recompute``; if even
    recomputing everything does not fit, returns the plan reached.
    """
    bb = method.backbone

    def measure(plan: list[bool | int]) -> tuple[int, dict[str, int], int]:
        bb.recompute = list(plan)
        with TotalFlopCounter() as flops:
            saved = track_step(method, views)
        method.zero_grad(set_to_none=True)
        return saved.peak, saved.peak_by_owner, int(flops.get_total_flops())

    plan: list[bool | int] = [bb.recomputed_segments(k) for k in range(bb.num_modules)]
    peak, owners, flops = measure(plan)
    while peak > budget:
        tries = []
        holders = [k for k in range(bb.num_modules) if plan[k] < len(bb.segments(k))]
        holders = sorted(holders, key=lambda k: -owners.get(f"S{k + 1}", 0))[:max_tries]
        for k in holders:
            if owners.get(f"S{k + 1}", 0) > 0:
                candidate = list(plan)
                candidate[k] = int(plan[k]) + 1
                tries.append((candidate, *measure(candidate)))
        if not tries:
            break
        better = [t for t in tries if t[1] < peak]
        if better:  # most bytes saved per extra FLOP
            best = max(better, key=lambda t: (peak - t[1]) / max(t[3] - flops, 1))
        else:  # nothing helps alone yet (a segment's input may be kept anyway): go lowest
            best = min(tries, key=lambda t: (t[1], t[3]))
        plan, peak, owners, flops = best
    bb.recompute = list(plan)
    return bb.recompute
