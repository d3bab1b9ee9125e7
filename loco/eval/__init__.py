"""Evaluation of frozen backbones per stage: cached features, weighted kNN, linear probes,
``results.json`` and reports.

One path (:func:`~loco.eval.evaluate.evaluate_run`) serves ``loco eval``, ``loco
quickstart``, ``tools/compare.py`` and Python callers. Modules: ``evaluate`` (the
orchestration and its policies), ``network`` (weights + config + stages + device ->
the backbone), ``features`` (the on-disk feature cache), ``knn``, ``linear``,
``results``, ``report``; ``cli`` and ``features_cli`` only parse arguments.
Submodules are imported on first use (``loco --help`` must not import faiss)::

    from loco.eval import evaluate_run, extract_features, knn_evaluate
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EvalOptions": "loco.eval.evaluate",
    "evaluate_run": "loco.eval.evaluate",
    "FeatureSet": "loco.eval.features",
    "extract_features": "loco.eval.features",
    "load_backbone": "loco.eval.network",
    "FeatureBank": "loco.eval.knn",
    "KNNProtocol": "loco.eval.knn",
    "PROTOCOLS": "loco.eval.knn",
    "knn_evaluate": "loco.eval.knn",
    "PRESETS": "loco.eval.linear",
    "linear_probe_augmented": "loco.eval.linear",
    "linear_probe_cached": "loco.eval.linear",
    "preset_for": "loco.eval.linear",
    "format_table": "loco.eval.results",
    "read_results": "loco.eval.results",
    "write_results": "loco.eval.results",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'loco.eval' has no attribute {name!r}")
