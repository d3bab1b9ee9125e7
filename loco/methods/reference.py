"""Straightforward, unoptimised versions of every method: the ground truth for tests and
the 'naive' row of ``loco bench``.

Each method is a set of local losses. Loss L_k sees module k's output, its gradient flows
down through a *window* of modules (and no further: the window's input is detached), and
it updates some of the modules in that window:

    e2e      L_top   window S_1..S_top      updates all of them
    greedy   L_k     window S_k             updates S_k
    infopro  L_k     window S_k             updates S_k
    loco     L_k     window S_{k-1}, S_k    updates both (``shared_update=upper``: S_{k-1}
                                            only, except at the top; L_1 has window S_1)

:class:`Reference` runs each loss on its own: it recomputes the window's forward pass from
the detached input and calls one full ``backward``. Nothing is shared between losses, so
the code is the definition; it costs more FLOPs (LoCo recomputes every lower stage), and
keeps the same two modules' activations alive as the optimised step.

Every objective (:mod:`loco.objectives`) goes through ``method.head_loss``; a momentum
target of loss L_k runs from the detached input of the modules the method names for it
(module k for a local routing, the whole network for e2e) and is a constant for the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from loco.errors import LocoError
from loco.methods.base import Method, StepOutput, register
from loco.methods.loco import LoCo


@dataclass(frozen=True)
class LossWindow:
    loss: int  # module whose output the loss sees
    window: tuple[int, ...]  # modules the gradient flows through, bottom first
    updates: tuple[int, ...]  # modules whose parameters it updates


def loss_windows(method: Method) -> list[LossWindow]:
    """The local losses of ``method`` as windows, from the method's definition."""
    n, name = method.backbone.num_modules, method.name
    if name == "e2e":
        return [LossWindow(n - 1, tuple(range(n)), tuple(range(n)))]
    if name in ("greedy", "infopro"):
        return [LossWindow(k, (k,), (k,)) for k in range(n)]
    if name == "loco":
        upper = method.cfg.method.shared_update == "upper"
        windows = []
        for k in method.loss_modules:
            window = (k - 1, k) if k > 0 else (k,)
            updates = window if (not upper or k == n - 1) else window[:-1]
            windows.append(LossWindow(k, window, updates))
        return windows
    raise LocoError(f"no reference definition for method '{name}'")


class Reference(Method):
    """Runs ``method``'s losses one at a time, each over its own window (see module doc).

    Shares the backbone and heads of ``method``; ``training_step`` leaves the same
    gradients in ``.grad`` as ``method.training_step`` does.
    """

    name = "reference"

    def __init__(self, method: Method) -> None:
        super().__init__(method.backbone, method.cfg)
        self.method = method
        self.momentum = method.momentum  # shared, like the backbone (no copy of its own)
        self.windows = loss_windows(method)

    def update_momentum(self, step: int, total: int) -> float | None:
        return self.method.update_momentum(step, total)

    def module_params(self, k: int) -> list[nn.Parameter]:
        return self.method.module_params(k)

    def head_parameters(self) -> list[nn.Parameter]:
        backbone = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.method.parameters() if id(p) not in backbone and p.requires_grad]

    def training_step(
        self, views: list[torch.Tensor], labels: torch.Tensor | None = None
    ) -> StepOutput:
        method, bb = self.method, self.backbone
        x = torch.cat(views)
        if hasattr(method, "_images"):  # InfoPro's reconstruction target and labels
            method._images, method._labels = x, labels
        # detached output of every module as soon as some window has computed it
        outputs: dict[int, torch.Tensor] = {-1: x}
        losses = {}
        for w in self.windows:
            h = self._input_of(w.window[0], outputs)
            for k in w.window:
                h = bb.forward_module(k, h)
                outputs[k] = h.detach()
            # a momentum target (BYOL, MoCo v3) runs from the detached input of its modules
            target_input = self._input_of(method.target_modules(w.loss)[0], outputs)
            loss = method.head_loss(w.loss, h, target_input)
            updated = [p for k in w.updates for p in self.module_params(k)]
            torch.autograd.backward(loss, inputs=updated + self.head_parameters())
            losses[f"loss/s{w.loss + 1}"] = loss.detach()
        if hasattr(method, "_images"):
            method._images = method._labels = None
        top = self._input_of(bb.num_modules, outputs)
        return StepOutput(losses, self.readout(top))

    def _input_of(self, k: int, outputs: dict[int, torch.Tensor]) -> torch.Tensor:
        """Detached input of module k (output of k-1), computing missing ones without a graph."""
        known = max(j for j in outputs if j < k)
        h = outputs[known]
        with torch.no_grad():
            for j in range(known + 1, k):
                h = outputs[j] = self.backbone.forward_module(j, h)
        return h.detach()


@register
class NaiveLoCo(Reference):
    """LoCo computed the straightforward way (every unit {S_{k-1}, S_k} recomputes S_{k-1}):
    the same gradients as ``loco`` at more FLOPs; the 'naive' row of ``loco bench``."""

    name = "loco_naive"
    options = LoCo.options
    check_options = LoCo.check_options

    def __init__(self, backbone, cfg) -> None:
        super().__init__(LoCo(backbone, cfg))


def naive_loco(method: Method) -> Reference:
    """The 'naive' LoCo of the bench: every unit {S_{k-1}, S_k} recomputes S_{k-1}."""
    if method.name != "loco":
        raise LocoError(f"naive_loco needs a loco method, got '{method.name}'")
    return Reference(method)
