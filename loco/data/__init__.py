"""Datasets (shipped sets, any ImageFolder tree), SimCLR/eval transforms and loaders.

Names are imported on first use, so ``loco data --help`` (which imports ``loco.data.cli``,
and so this package) does not pay for importing torch and torchvision.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SimCLRParams": "augment",
    "SimCLRTransform": "augment",
    "eval_transform": "augment",
    "ImageFolderDataset": "folder",
    "SkippedImages": "folder",
    "SkipUnreadable": "folder",
    "load_rgb": "folder",
    "subset_per_class": "folder",
    "DatasetView": "loaders",
    "EpochSampler": "loaders",
    "build_eval_loader": "loaders",
    "build_pretrain_loader": "loaders",
    "set_loader_epoch": "loaders",
    "steps_per_epoch": "loaders",
    "BatchedSimCLR": "gpu_augment",
    "TensorPipelineLoader": "jpeg_loader",
    "SHIPPED": "shipped",
    "prepare_shipped": "shipped",
    "resolve_data_root": "shipped",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'loco.data' has no attribute '{name}'")
    return getattr(importlib.import_module(f"loco.data.{_EXPORTS[name]}"), name)
