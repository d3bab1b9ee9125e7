"""What every pretraining method shares: a staged backbone, one decoder per local loss,
and a ``training_step`` that leaves the gradients in ``.grad`` for the optimizer.

The method is the *routing* (which loss may reach which module); what each loss computes
is the objective (:mod:`loco.objectives`, ``method.objective``): its projector sizes, an
optional predictor and an optional momentum (EMA) target, all built here per local loss.

Local methods differ from e2e only in *where gradients may flow*. Each step therefore
runs the backbone one local module at a time and calls autograd explicitly, so that the
routing is visible in the code (and tested against independent computations).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from loco.config import Config, MethodConfig
from loco.errors import LocoError
from loco.models.backbone import StagedBackbone
from loco.models.heads import ProjectionDecoder, mlp, pool
from loco.objectives import MomentumNetwork, build_objective, cosine_momentum, head_config

METHODS: dict[str, type[Method]] = {}  # the one list of methods: name -> class
# method.* keys every method reads (loco.objectives checks those of one objective)
SHARED_OPTIONS = ("name", "objective", "temperature", "gather_negatives")


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available as ``method.name=<cls.name>``."""
    METHODS[cls.name] = cls
    return cls


def check_method_config(m: MethodConfig) -> None:
    """``method.name`` is registered, and the method accepts every ``method.*`` key that
    differs from its default (configs and checkpoints hold every key, so "set" means
    "changed"): a key of another method is an error naming its owner."""
    if m.name not in METHODS:
        close = difflib.get_close_matches(m.name, list(METHODS), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise LocoError(
            f"config key 'method.name' = {m.name!r} is not one of "
            f"{', '.join(sorted(METHODS))}{hint}"
        )
    cls = METHODS[m.name]
    defaults = MethodConfig()
    for f in dataclasses.fields(m):
        value = getattr(m, f.name)
        if f.name in SHARED_OPTIONS or f.name in cls.options or value == getattr(defaults, f.name):
            continue
        owners = sorted(n for n, c in METHODS.items() if f.name in c.options)
        raise LocoError(
            f"method.{f.name}={value} has no effect with method.name={m.name}: it is an option "
            f"of {' and '.join(owners) or 'no method'}; remove it or choose that method"
        )
    cls.check_options(m)


def options_for(m: MethodConfig, name: str) -> MethodConfig:
    """``m`` for method ``name``: the options ``name`` does not read back at their defaults
    (``loco bench`` measures several methods with one config)."""
    own = (*SHARED_OPTIONS, *METHODS[name].options) if name in METHODS else ()
    defaults = MethodConfig()
    kept = {
        f.name: getattr(m if f.name in own else defaults, f.name) for f in dataclasses.fields(m)
    }
    return MethodConfig(**{**kept, "name": name})


def build_method(backbone: StagedBackbone, cfg: Config) -> Method:
    check_method_config(cfg.method)
    return METHODS[cfg.method.name](backbone, cfg)


@dataclass
class StepOutput:
    losses: dict[str, torch.Tensor]  # detached, one per local loss (e.g. "loss/s1")
    features: torch.Tensor  # detached pooled last-module features of both views [2B, C]
    extra: dict[str, float] = field(default_factory=dict)


class Method(nn.Module):
    """Base class. Subclasses set ``name`` and implement ``training_step``."""

    name: ClassVar[str] = ""
    # the method.* keys this method reads besides SHARED_OPTIONS; others must keep defaults
    options: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def check_options(cls, m: MethodConfig) -> None:
        """Reject bad values of this method's own options (one-line LocoError)."""

    def __init__(self, backbone: StagedBackbone, cfg: Config) -> None:
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.temperature = cfg.method.temperature
        self.gather = cfg.method.gather_negatives
        self.loss_scaler: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.objective = build_objective(cfg)
        self.decoder_cfg = head_config(cfg)  # decoder.* with the objective's head sizes
        self.predictors: nn.ModuleDict | None = None  # BYOL / MoCo v3: one per local loss
        # BYOL / MoCo v3: EMA copies of the backbone and the decoders (not the predictors)
        self.momentum = MomentumNetwork(backbone) if self.objective.momentum else None

    # -- building blocks -------------------------------------------------------------
    def projection_heads(
        self, modules: list[int], build: Callable[[int], nn.Module] | None = None
    ) -> nn.ModuleDict:
        """One decoder per local loss, keyed by module index (as a string), and what the
        objective adds to each: a predictor, the decoders' momentum copies."""

        def decoder(k: int) -> nn.Module:
            return ProjectionDecoder.for_module(self.backbone, k, self.decoder_cfg)

        heads = nn.ModuleDict({str(k): (build or decoder)(k) for k in modules})
        if self.objective.predictor:
            d = self.decoder_cfg
            self.predictors = nn.ModuleDict(
                {str(k): mlp(d.out_dim, d.hidden_dim, d.out_dim, 2) for k in modules}
            )
        if self.momentum is not None:
            self.momentum.follow(heads)
        return heads

    def local_loss(
        self, k: int, h: torch.Tensor, x: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss L_k of module k's output ``h``, back-propagated through its decoder only;
        ``x``: module k's input (the momentum target's input, for objectives with one).

        Returns the detached loss and the cotangent dL_k/dh, which the caller routes into
        the backbone; the decoder's own gradients are already accumulated.
        """
        h_leaf = h.detach().requires_grad_(True)
        loss = self.head_loss(k, h_leaf, x)
        self.backward_loss(loss)
        assert h_leaf.grad is not None
        return loss.detach(), h_leaf.grad

    def backward_loss(self, loss: torch.Tensor) -> None:
        """Where every backward pass of a step starts. Under fp16 the trainer sets
        ``loss_scaler`` (a GradScaler's ``scale``): each local loss is scaled by the same
        factor, so the cotangents routed between modules and every ``.grad`` carry it and
        one ``unscale_``/``step`` serves the whole step."""
        (self.loss_scaler(loss) if self.loss_scaler is not None else loss).backward()

    def head_loss(self, k: int, h: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The objective's loss L_k on module k's output ``h``: decoder, predictor (if any),
        and the momentum target computed from ``x``, the detached input of
        :meth:`target_modules` (objectives with a momentum target only)."""
        return self.objective.loss(self.embed(k, h), self.target(k, x))

    def embed(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """The online embedding of loss k: decoder, then the predictor where there is one."""
        z = self.heads[str(k)](h)
        return self.predictors[str(k)](z) if self.predictors is not None else z

    def target_modules(self, k: int) -> range:
        """The modules loss k's momentum target runs: module k's copy (a local routing)."""
        return range(k, k + 1)

    def target(self, k: int, x: torch.Tensor | None) -> torch.Tensor | None:
        """Loss k's momentum target from the input ``x`` of :meth:`target_modules` (a
        constant), or None when the objective has no momentum network."""
        if self.momentum is None:
            return None
        if x is None:
            raise ValueError(f"objective {self.objective.name} needs loss {k}'s input (x)")
        return self.momentum(self.target_modules(k), x, str(k))

    def update_momentum(self, step: int, total: int) -> float | None:
        """After the optimizer step ``step`` (0-based) of ``total``: move the momentum copies
        toward the online weights; returns the momentum used (None without a target)."""
        if self.momentum is None:
            return None
        m = cosine_momentum(self.objective.base_momentum, step, total)
        self.momentum.update(self.backbone, self.heads, m)
        return m

    def module_params(self, k: int) -> list[nn.Parameter]:
        return self.backbone.module_parameters(k)

    @staticmethod
    def readout(h: torch.Tensor) -> torch.Tensor:
        return pool(h.detach()).float()

    # -- the algorithm -------------------------------------------------------------
    def training_step(
        self, views: list[torch.Tensor], labels: torch.Tensor | None = None
    ) -> StepOutput:
        raise NotImplementedError
