"""What every objective shares: the registry (``OBJECTIVES``, the one list of names), the
head sizes it recommends, and the checks of ``method.objective`` and ``objective.*``.

An objective is the self-supervised loss on the two views' embeddings ``[z1; z2]``; the
*routing* (:mod:`loco.methods`: which loss reaches which module) is independent of it.
Besides its loss it declares what each local module needs: its projector sizes, whether
a predictor follows the projector, and whether the target is a momentum (EMA) copy of the
module and its decoder (:mod:`loco.objectives.momentum`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from loco.config import Config, DecoderConfig, MethodConfig, ObjectiveConfig
from loco.errors import LocoError

OBJECTIVES: dict[str, type[Objective]] = {}  # the one list of objectives: name -> class
# method.* keys read by one objective only (a changed value with another one is an error)
METHOD_KEYS = {"temperature": "simclr", "supervised": "simclr"}
SIZES = ("mlp_layers", "hidden_dim", "out_dim")  # decoder.* keys an objective recommends


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make an objective available as ``method.objective=<cls.name>``."""
    OBJECTIVES[cls.name] = cls
    return cls


@dataclass(frozen=True)
class HeadSizes:
    """The projector an objective recommends: ``mlp_layers`` Linear layers (BN-ReLU between
    them), ``hidden_dim`` wide, ``out_dim`` out (the predictor, where there is one, is
    2 layers, ``hidden_dim`` wide, ``out_dim`` in and out)."""

    mlp_layers: int
    hidden_dim: int
    out_dim: int


class Objective:
    """Base class. Subclasses set the class attributes and implement :meth:`loss`."""

    name: ClassVar[str] = ""
    head: ClassVar[HeadSizes]  # recommended projector at loco's default widths
    predictor: ClassVar[bool] = False  # an online predictor MLP after the projector
    momentum: ClassVar[bool] = False  # the target is a momentum (EMA) copy

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.gather = cfg.method.gather_negatives

    @property
    def options(self) -> Any:
        """This objective's ``objective.<name>`` section (None for simclr, which has none)."""
        return getattr(self.cfg.objective, self.name, None)

    @property
    def base_momentum(self) -> float:
        """Momentum at step 0 (objectives with a momentum target)."""
        return float(self.options.base_momentum)

    @classmethod
    def check(cls, cfg: Config) -> None:
        """Reject impossible values of this objective's options (one-line LocoError)."""

    def loss(
        self, z: torch.Tensor, target: torch.Tensor | None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Loss of the online embeddings ``z = [z1; z2]`` (after the predictor, if any);
        ``target``: the momentum network's ``[t1; t2]`` (a constant), or None."""
        raise NotImplementedError


def head_config(cfg: Config) -> DecoderConfig:
    """``cfg.decoder`` with the objective's recommended sizes: a size (``decoder.mlp_layers``,
    ``hidden_dim``, ``out_dim``) left at its default takes the objective's value; one that
    differs from its default is the user's and wins."""
    head = OBJECTIVES[cfg.method.objective].head
    defaults = DecoderConfig()
    chosen = {
        key: getattr(cfg.decoder, key)
        if getattr(cfg.decoder, key) != getattr(defaults, key)
        else getattr(head, key)
        for key in SIZES
    }
    return dataclasses.replace(cfg.decoder, **chosen)


def build_objective(cfg: Config) -> Objective:
    check_objective_config(cfg)
    return OBJECTIVES[cfg.method.objective](cfg)


def check_objective_config(cfg: Config) -> None:
    """``method.objective`` is registered, and every option that differs from its default
    belongs to it: another objective's ``objective.*`` key (or simclr's
    ``method.temperature`` / ``method.supervised``) is an error naming its owner."""
    name = cfg.method.objective
    if name not in OBJECTIVES:
        close = difflib.get_close_matches(name, list(OBJECTIVES), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise LocoError(
            f"config key 'method.objective' = {name!r} is not one of "
            f"{', '.join(sorted(OBJECTIVES))}{hint}"
        )
    defaults, method_defaults = ObjectiveConfig(), MethodConfig()
    for section in dataclasses.fields(cfg.objective):
        if section.name == name:
            continue
        ours, theirs = getattr(cfg.objective, section.name), getattr(defaults, section.name)
        for f in dataclasses.fields(ours):
            value = getattr(ours, f.name)
            if value != getattr(theirs, f.name):
                raise LocoError(
                    f"objective.{section.name}.{f.name}={value} has no effect with "
                    f"method.objective={name}: it is an option of {section.name}; remove it "
                    f"or set method.objective={section.name}"
                )
    for key, owner in METHOD_KEYS.items():
        value = getattr(cfg.method, key)
        if owner != name and value != getattr(method_defaults, key):
            raise LocoError(
                f"method.{key}={value} has no effect with method.objective={name}: it is an "
                f"option of {owner}; remove it or set method.objective={owner}"
            )
    cls = OBJECTIVES[name]
    options = getattr(cfg.objective, name, None)
    for f in dataclasses.fields(options) if options is not None else ():
        value = getattr(options, f.name)
        if value < 0 or (f.name == "base_momentum" and value > 1):
            bound = "in [0, 1]" if f.name == "base_momentum" else ">= 0"
            raise LocoError(f"objective.{name}.{f.name} must be {bound}, got {value}")
    if cls.momentum and cfg.train.stage_parallel > 1:
        raise LocoError(
            f"method.objective={name} keeps a momentum (EMA) network, which the stage-parallel "
            "trainer does not carry; set train.stage_parallel=1 or choose simclr, barlow or "
            "vicreg"
        )
    cls.check(cfg)


def for_objective(cfg: Config, name: str) -> tuple[MethodConfig, ObjectiveConfig]:
    """``cfg``'s method and objective sections for objective ``name``: the options of
    ``name`` kept, every other objective's at its defaults (``loco bench`` measures several
    objectives with one config); checked like a config."""
    defaults, method_defaults = ObjectiveConfig(), MethodConfig()
    sections = {
        f.name: copy.deepcopy(getattr(cfg.objective if f.name == name else defaults, f.name))
        for f in dataclasses.fields(ObjectiveConfig)
    }
    keep = {
        k: getattr(cfg.method if owner == name else method_defaults, k)
        for k, owner in METHOD_KEYS.items()
    }
    method = dataclasses.replace(cfg.method, objective=name, **keep)
    objective = ObjectiveConfig(**sections)
    check_objective_config(dataclasses.replace(cfg, method=method, objective=objective))
    return method, objective


def cosine_momentum(base: float, step: int, total: int) -> float:
    """BYOL's schedule: ``1 - (1 - base) * (cos(pi * step / total) + 1) / 2``, from ``base``
    at step 0 to 1 at the last step (MoCo v3 uses the same)."""
    import math

    return 1 - (1 - base) * (math.cos(math.pi * step / max(total, 1)) + 1) / 2
