"""``loco export``: a pretrained backbone out of loco, loadable without loco.

Three formats, each the backbone only (no decoders, optimizer or probe) with metadata:

* ``timm``: a ``.pth`` state dict that ``timm.create_model(name, num_classes=0,
  checkpoint_path=FILE, **kwargs)`` loads, plus ``FILE.json`` with the metadata;
* ``torchvision`` (ResNets of the stock widths): the same keys, which
  ``torchvision.models.resnet50().load_state_dict(sd, strict=False)`` loads with only
  ``fc.*`` missing (timm's ResNet names its parameters as torchvision does), plus the JSON;
  timm's post-pooling head modules, which a loco backbone does not train (ConvNeXt's
  ``head.norm``), are written at timm's initial values and listed as ``untrained_keys``;
* ``safetensors``: the state dict with the metadata in the file's own header.

A backbone pretrained with the 32 px stem (3x3 stride-1 conv, no max-pool) differs from the
stock model in ``conv1``; the metadata and a log line say the two lines a user adds before
loading. Which weights: the online network's (the only ones loco's methods keep today).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loco import __version__
from loco.errors import LocoError
from loco.rundir import RunDir
from loco.weights import WeightsSource, read_weights

log = logging.getLogger(__name__)

FORMATS = {"timm": ".pth", "torchvision": ".pth", "safetensors": ".safetensors"}
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
SMALL_STEM_RECIPE = (
    "model.conv1 = torch.nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False); "
    "model.maxpool = torch.nn.Identity()"
)


@dataclass
class Exported:
    path: Path
    metadata: dict[str, Any]
    state: dict[str, torch.Tensor]


def _checkpoint_path(source: str | Path) -> Path:
    path = Path(source)
    if path.is_dir():
        path = RunDir(path).checkpoint
    if not path.is_file():
        raise LocoError(f"no checkpoint at '{path}'; give a run directory or a checkpoint file")
    return path


def export_metadata(source: WeightsSource, config_dict: dict[str, Any]) -> dict[str, Any]:
    """What a user of the exported file needs to rebuild and feed the model."""
    from loco.models.backbone import _is_small_image, timm_kwargs

    cfg = source.config
    assert cfg is not None
    backbone = source.build_backbone(cfg.model, cfg.data.image_size)
    stem = _stem_change(backbone.body) if _is_small_image(cfg.model, cfg.data.image_size) else ""
    config_text = json.dumps(config_dict, sort_keys=True)
    return {
        "format_version": 1,
        "timm_model": cfg.model.backbone,
        "timm_kwargs": timm_kwargs(cfg.model, cfg.data.image_size),
        "small_image_stem": bool(stem),
        "stem_change": stem,
        "method": source.method,
        "step": int(source.step or 0),
        "weights": "online",
        "config_hash": hashlib.sha256(config_text.encode()).hexdigest()[:16],
        "image_size": cfg.data.image_size,
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "readout": "global average pool of each local module's output (loco eval's per-stage "
        "features); `stages` names where each module ends: a timm feature_info module, or "
        "forward_features (the last module, with timm's trailing norm/conv head)",
        "stages": _stage_names(backbone),
        "source": str(source.path),
        "loco_version": __version__,
    }


def _stem_change(body: torch.nn.Module) -> str:
    """The lines that turn a stock timm model into loco's 32 px one (before loading)."""
    if isinstance(getattr(body, "maxpool", None), torch.nn.Identity):
        return SMALL_STEM_RECIPE
    stem = getattr(body, "stem", None)
    if isinstance(stem, torch.nn.Sequential):
        c = stem[0]
        bias = c.bias is not None
        return f"model.stem[0] = torch.nn.Conv2d(3, {c.out_channels}, 3, 1, 1, bias={bias})"
    return ""  # the model has no 32 px stem variant: built as stock


def _stage_names(backbone: Any) -> list[str]:
    """Where each local module ends, as a timm ``feature_info`` module name when it ends one
    (``forward_intermediates`` indices), else as the path of its last unit. A last module
    that takes in timm's trailing modules (a ViT's final ``norm``, EfficientNet's
    ``conv_head``) ends where timm's ``forward_features`` does: named so."""
    names = [f["module"] for f in backbone.body.feature_info]
    units = [u.path for g in backbone.groups for u in g]
    out = []
    for group in backbone.groups:
        if any(getattr(u, "trailing", False) for u in group):
            out.append("forward_features")
            continue
        last = group[-1].path
        after = units[units.index(last) + 1 :]
        owner = next(
            (
                n
                for n in names
                if last == n
                or (last.startswith(n + ".") and not any(u.startswith(n + ".") for u in after))
            ),
            last,
        )
        out.append(owner)
    return out


def export(
    source: str | Path, to: str = "timm", out: str | Path | None = None, ema: bool = False
) -> Exported:
    """Write the backbone of ``source`` (a run dir or loco checkpoint) in format ``to``."""

    if to not in FORMATS:
        raise LocoError(f"--to {to!r} unknown; use one of {', '.join(FORMATS)}")
    path = _checkpoint_path(source)
    weights = read_weights(path, ema=ema)  # ema: the momentum backbone (BYOL, MoCo v3)
    if weights.config is None or weights.state is None:
        raise LocoError(
            f"'{path}' is not a loco checkpoint (no config/backbone entries); export takes "
            "loco runs (other toolkits' weights: `loco eval --checkpoint` reads them directly)"
        )
    state = weights.state
    meta = export_metadata(weights, weights.config.to_dict())
    meta["weights"] = "ema" if ema else "online"
    tensors = {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    untrained = _add_untrained_head(meta, tensors)
    meta["untrained_keys"] = untrained
    if to == "torchvision":
        _check_torchvision(meta, tensors)
    dest = Path(out) if out else path.parent / f"{Path(path).parent.name}_{to}{FORMATS[to]}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    if to == "safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise LocoError(
                "--to safetensors needs safetensors: pip install 'loco[export]'"
            ) from None
        header = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
        save_file(tensors, str(tmp), metadata=header)
    else:
        torch.save(tensors, tmp)
        sidecar = dest.with_name(dest.name + ".json")
        sidecar_tmp = sidecar.with_name(f".{sidecar.name}.tmp{os.getpid()}")
        sidecar_tmp.write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(sidecar_tmp, sidecar)
    os.replace(tmp, dest)
    if meta["small_image_stem"]:
        log.warning(
            "%s has loco's 32 px stem; a stock %s needs, before loading: %s",
            dest,
            meta["timm_model"],
            meta["stem_change"],
        )
    return Exported(dest, meta, tensors)


def _add_untrained_head(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[str]:
    """Keys a stock ``timm.create_model(name, num_classes=0)`` has and the backbone lacks:
    timm's post-pooling head (e.g. ConvNeXt's ``head.norm``), which a loco backbone does not
    hold (docs/methods.md). Added at timm's initial values so a strict load works; listed in
    the metadata as untrained."""
    import timm

    stock = timm.create_model(meta["timm_model"], num_classes=0, **meta["timm_kwargs"])
    missing = [k for k in stock.state_dict() if k not in tensors]
    for k in missing:
        tensors[k] = stock.state_dict()[k].contiguous()
    if missing:
        log.info(
            "%d untrained head keys added at timm's initial values: %s",
            len(missing),
            ", ".join(missing),
        )
    return missing


def _check_torchvision(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    name = meta["timm_model"]
    if name not in TORCHVISION_RESNETS:
        raise LocoError(
            f"--to torchvision covers the ResNets torchvision ships ({', '.join(TORCHVISION_RESNETS)}), "
            f"not {name}; use --to timm or --to safetensors"
        )
    import torchvision

    reference = getattr(torchvision.models, name)().state_dict()
    bad = [
        k
        for k, v in tensors.items()
        if k not in reference or (reference[k].shape != v.shape and k != "conv1.weight")
    ]
    if bad or meta["timm_kwargs"]:
        raise LocoError(
            f"this {name} is not torchvision's (model.kwargs={meta['timm_kwargs']}; "
            f"e.g. {', '.join(bad[:3]) or 'widths differ'}); use --to timm or --to safetensors"
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="run dir or checkpoint .pt")
    parser.add_argument(
        "--to",
        default="timm",
        choices=tuple(FORMATS),
        help="timm (.pth + .json), torchvision (ResNets; .pth + .json) or safetensors "
        "(metadata in the header); default timm",
    )
    parser.add_argument("--out", help="output file (default: RUN/<run>_<format>.<ext>)")
    parser.add_argument(
        "--ema",
        action="store_true",
        help="the momentum (EMA) weights, where an objective keeps them",
    )


def run(args: argparse.Namespace) -> int:
    result = export(args.source, args.to, args.out, args.ema)
    meta = result.metadata
    print(
        f"{result.path}: {meta['timm_model']} backbone ({len(result.state)} tensors, "
        f"{meta['weights']} weights, {meta['method']} step {meta['step']})"
    )
    if args.to != "safetensors":
        print(f"metadata: {result.path}.json")
    return 0
