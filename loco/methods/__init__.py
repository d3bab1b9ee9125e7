"""Pretraining methods, by name: ``METHODS["loco"]`` etc. Register new ones with
:func:`loco.methods.base.register`."""

from loco.methods import e2e, greedy, infopro, loco, reference  # noqa: F401  (registration)
from loco.methods.base import (
    METHODS,
    Method,
    StepOutput,
    build_method,
    check_method_config,
    register,
)

__all__ = ["METHODS", "Method", "StepOutput", "build_method", "check_method_config", "register"]
