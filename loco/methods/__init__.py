"""Pretraining methods, by name: ``METHODS["loco"]`` etc. The registry is the one list of
method names (config validation, the CLI and ``loco bench`` ask it); register new ones
with :func:`loco.methods.base.register`. Each method lists the ``method.*`` keys it
reads in ``options`` and checks their values in ``check_options``; a key changed from its
default for a method that ignores it is rejected (:func:`check_method_config`).
``loco_naive`` is LoCo computed the straightforward way (:mod:`loco.methods.reference`)."""

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
