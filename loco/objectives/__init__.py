"""Self-supervised objectives, by name: ``OBJECTIVES["byol"]`` etc. The registry is the one
list of objective names (config validation, ``loco bench`` and the docs ask it). Any
objective combines with any routing (``method.name``): the objective says what each local
loss computes, the method which modules its gradient reaches."""

from loco.objectives import barlow, byol, mocov3, simclr, vicreg  # noqa: F401  (registration)
from loco.objectives.base import (
    OBJECTIVES,
    HeadSizes,
    Objective,
    build_objective,
    check_objective_config,
    cosine_momentum,
    for_objective,
    head_config,
    register,
)
from loco.objectives.momentum import MomentumNetwork

__all__ = [
    "OBJECTIVES",
    "HeadSizes",
    "MomentumNetwork",
    "Objective",
    "build_objective",
    "check_objective_config",
    "cosine_momentum",
    "for_objective",
    "head_config",
    "register",
]
