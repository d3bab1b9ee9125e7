"""The network under evaluation: weights (:mod:`loco.weights`), the config it is built
with, the stages asked for, and the device it runs on.

A loco checkpoint's saved config gives the architecture; ``key=value`` overrides (data
root, image size, ...) apply on top; a plain state dict takes the architecture from
``--backbone``. Results and feature caches go to the checkpoint's run directory unless
``--out`` says otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from loco.config import Config, _merge, _parse_override, config_from_dict
from loco.errors import LocoError
from loco.models.backbone import StagedBackbone
from loco.rundir import RunDir
from loco.weights import WeightsSource, read_weights


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A copy of ``cfg`` with ``key=value`` overrides applied, validated."""
    data = cfg.to_dict()
    for text in overrides:
        _merge(data, _parse_override(text))
    return config_from_dict(data)


def load_backbone(
    checkpoint: str | Path | None = None,
    *,
    cfg: Config | None = None,
    overrides: Sequence[str] = (),
    backbone_name: str | None = None,
    random_init: bool = False,
    seed: int = 0,
    method_name: str | None = None,
    prefix: str | None = None,
    ema: bool = False,
) -> tuple[Config, StagedBackbone, WeightsSource]:
    """Build the staged backbone to evaluate and the config it was made with.

    The weights come from :func:`loco.weights.read_weights`. A loco checkpoint's saved
    config gives the ``model`` section always (and the rest unless ``cfg`` is given); a
    plain state dict takes the architecture from ``backbone_name`` (or ``cfg.model``);
    ``overrides`` apply last. ``random_init``: the same architecture, seeded by ``seed``.
    ``ema``: the checkpoint's momentum (EMA) backbone (BYOL, MoCo v3) instead of the online one.
    """
    source = read_weights(
        checkpoint,
        random_init=random_init,
        seed=seed,
        method=method_name,
        prefix=prefix,
        ema=ema,
    )
    if source.config is None:
        base = cfg
    elif cfg is None:
        base = source.config
    else:
        base = config_from_dict({**cfg.to_dict(), "model": source.config.to_dict()["model"]})
    cfg = apply_overrides(base or Config(), overrides)
    if backbone_name:
        cfg.model.backbone = backbone_name
    if source.config is None and source.path and not (backbone_name or base):
        source.model_config(None)  # raises: a plain state dict needs --backbone
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = source.build_backbone(cfg.model, cfg.data.image_size)
    return cfg, backbone, source


def parse_stages(stages: str | Sequence[int] | int, num_modules: int) -> list[int]:
    """``"all"``, ``"1,2,4"``, ``"last"``, an int or a list -> sorted 1-based stage numbers."""
    if isinstance(stages, str):
        text = stages.strip().lower()
        if text == "all":
            return list(range(1, num_modules + 1))
        if text == "last":
            return [num_modules]
        try:
            stages = [int(s) for s in text.replace(" ", "").split(",") if s]
        except ValueError:
            raise LocoError(
                f"--stages '{stages}' not understood; use all, last or numbers such as 1,2,3,4"
            ) from None
    elif isinstance(stages, int):
        stages = [stages]
    out = sorted(set(int(s) for s in stages))
    bad = [s for s in out if not 1 <= s <= num_modules]
    if bad or not out:
        raise LocoError(
            f"stage(s) {bad or stages} do not exist: this backbone has stages 1..{num_modules}"
        )
    return out


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LocoError("--device cuda but no CUDA device is visible; use --device auto or cpu")
    return device


def default_out_dir(checkpoint: str | Path | None, out: str | Path | None) -> Path:
    """Where results and the feature cache go: ``out``, else the checkpoint's run directory."""
    if out:
        return Path(out)
    if checkpoint:
        return RunDir.from_checkpoint(checkpoint).root
    raise LocoError(
        "--random-init without --checkpoint needs --out DIR for its results and features"
    )
