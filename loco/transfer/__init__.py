"""Detectron2 transfer: pretrained loco backbones in Mask R-CNN.

Importing this package never imports Detectron2, so ``loco --help`` works without it.
The names below load their module on first use; :func:`require_detectron2` turns a
missing Detectron2 into a one-line :class:`~loco.errors.LocoError` naming the installer.

- :mod:`loco.transfer.backbone`: ``LocoBackbone`` (any timm model, ``res2..res5``),
  ``build_loco_fpn_backbone`` (registered in ``BACKBONE_REGISTRY``), ``add_loco_config``.
- :mod:`loco.transfer.train`: config setup, ``LocoTrainer``, ``train_main``/``eval_main``.
- :mod:`loco.transfer.datasets`: COCO-format registration and seeded subsets (COCO-10K/1K).
- :mod:`loco.transfer.convert`: loco ResNet checkpoint -> Detectron2 ``R-50`` ``.pkl``.
- :mod:`loco.transfer.cli`: the ``loco transfer`` command (imports Detectron2 only to run).
"""

from __future__ import annotations

import importlib
from typing import Any

from loco.errors import LocoError

INSTALL_HINT = "python tools/install_detectron2.py"

_LAZY = {
    "LocoBackbone": "loco.transfer.backbone",
    "add_loco_config": "loco.transfer.backbone",
    "build_loco_backbone": "loco.transfer.backbone",
    "build_loco_fpn_backbone": "loco.transfer.backbone",
    "LocoTrainer": "loco.transfer.train",
    "setup_cfg": "loco.transfer.train",
    "train_main": "loco.transfer.train",
    "eval_main": "loco.transfer.train",
    "subsample_coco": "loco.transfer.datasets",
    "register_coco_json": "loco.transfer.datasets",
    "timm_resnet_to_detectron2": "loco.transfer.convert",
}

__all__ = ["INSTALL_HINT", "require_detectron2", *_LAZY]


def require_detectron2() -> None:
    """Import Detectron2 or raise a one-line LocoError naming the installer."""
    try:
        importlib.import_module("detectron2")
    except ImportError as exc:
        raise LocoError(
            f"Detectron2 is not installed ({exc}); install it with `{INSTALL_HINT}`"
        ) from None


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'loco.transfer' has no attribute '{name}'")
    if module != "loco.transfer.convert" and name not in ("subsample_coco",):
        require_detectron2()
    return getattr(importlib.import_module(module), name)
