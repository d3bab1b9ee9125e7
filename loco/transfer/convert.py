"""A loco ResNet checkpoint (timm ``resnet18/34/50/101/152`` keys) as a Detectron2 model.

Detectron2's own ResNet (``build_resnet_backbone``, the stock ``R-50`` configs) names the
same tensors differently::

    conv1 / bn1                       -> stem.conv1 / stem.conv1.norm
    layer{i}.{j}.conv{k} / bn{k}      -> res{i+1}.{j}.conv{k} / res{i+1}.{j}.conv{k}.norm
    layer{i}.{j}.downsample.0 / .1    -> res{i+1}.{j}.shortcut / res{i+1}.{j}.shortcut.norm

``num_batches_tracked`` and a classifier (``fc.*``) are dropped; any other key is an
error, so a checkpoint is either converted completely or not at all. timm puts the
stride of a bottleneck on its 3x3 conv, so the Detectron2 config needs
``MODEL.RESNETS.STRIDE_IN_1X1: False``. loco backbones see RGB input normalised with the
checkpoint's ``data.mean/std``: either keep ``INPUT.FORMAT: RGB`` with those statistics
(x255), or convert with ``input_format="BGR"``, which reverses conv1's input channels
so that the stock BGR configs work with the same statistics listed in BGR order.

Stock Detectron2 builds ResNet-50/101/152 at any width that doubles per stage, but
ResNet-18/34 only at full width (``RES2_OUT_CHANNELS: 64``): anything else is refused here
with a pointer to the registered loco backbone (``build_loco_fpn_backbone``), which runs
any timm CNN.

No Detectron2 import: the ``.pkl`` is plain numpy.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loco.config import DataConfig
from loco.errors import LocoError
from loco.weights import read_weights

_BN = r"(weight|bias|running_mean|running_var)"
_RULES = [
    (re.compile(r"^conv1\.weight$"), lambda m: "stem.conv1.weight"),
    (re.compile(rf"^bn1\.{_BN}$"), lambda m: f"stem.conv1.norm.{m[1]}"),
    (
        re.compile(r"^layer(\d)\.(\d+)\.conv(\d)\.weight$"),
        lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight",
    ),
    (
        re.compile(rf"^layer(\d)\.(\d+)\.bn(\d)\.{_BN}$"),
        lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}",
    ),
    (
        re.compile(r"^layer(\d)\.(\d+)\.downsample\.0\.weight$"),
        lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.weight",
    ),
    (
        re.compile(rf"^layer(\d)\.(\d+)\.downsample\.1\.{_BN}$"),
        lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}",
    ),
]
_DROPPED = re.compile(r"(\.num_batches_tracked$|^fc\.)")
_DEPTHS = {
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
    ((3, 8, 36, 3), True): 152,
}


def detectron2_key(key: str) -> str | None:
    """Detectron2 ResNet name of a timm ResNet key (None: not a ResNet weight)."""
    for pattern, name in _RULES:
        m = pattern.match(key)
        if m:
            return name(m)
    return None


def timm_resnet_to_detectron2(
    state: dict[str, torch.Tensor], input_format: str = "RGB"
) -> dict[str, np.ndarray]:
    """Rename every weight of a timm ResNet state dict; raise if any key is left over."""
    if input_format not in ("RGB", "BGR"):
        raise LocoError(f"input format must be RGB or BGR, not {input_format!r}")
    out: dict[str, np.ndarray] = {}
    leftover = []
    for key, value in state.items():
        new = detectron2_key(key)
        if new is None:
            if not _DROPPED.search(key):
                leftover.append(key)
            continue
        out[new] = value.detach().cpu().float().numpy()
    if leftover:
        few = ", ".join(leftover[:4]) + (
            f" (+{len(leftover) - 4} more)" if len(leftover) > 4 else ""
        )
        raise LocoError(
            f"not a plain timm ResNet: no Detectron2 name for {few}; only resnet18/34/50/101/152 "
            "(deep-stem or avg-down variants excepted) convert to Detectron2's ResNet"
        )
    stem = out.get("stem.conv1.weight")
    if stem is None or stem.shape[1:] != (3, 7, 7):
        shape = None if stem is None else tuple(stem.shape)
        raise LocoError(
            f"conv1 has shape {shape}, Detectron2's stem needs a 7x7 conv on 3 channels; "
            "checkpoints pretrained with a small-image stem (model.small_image) do not convert"
        )
    if input_format == "BGR":
        out["stem.conv1.weight"] = np.ascontiguousarray(stem[:, ::-1])
    return out


def resnet_settings(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The ``MODEL.RESNETS`` values that make Detectron2's ResNet match these weights."""
    blocks = []
    for layer in range(1, 5):
        ids = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{layer}.")}
        blocks.append(len(ids))
    bottleneck = "layer1.0.conv3.weight" in state
    depth = _DEPTHS.get((tuple(blocks), bottleneck))
    if depth is None:
        raise LocoError(
            f"ResNet with blocks {blocks} matches no Detectron2 depth (18/34/50/101/152)"
        )
    last = "conv3" if bottleneck else "conv2"
    widths = [int(state[f"layer{i}.0.{last}.weight"].shape[0]) for i in range(1, 5)]
    inner = [int(state[f"layer{i}.0.conv1.weight"].shape[0]) for i in range(1, 5)]
    check_stock_detectron2(depth, widths, inner)
    return {
        "DEPTH": depth,
        "STEM_OUT_CHANNELS": int(state["conv1.weight"].shape[0]),
        "RES2_OUT_CHANNELS": widths[0],
        "WIDTH_PER_GROUP": inner[0],
        "STRIDE_IN_1X1": False,
        "NORM": "FrozenBN",
    }


def check_stock_detectron2(depth: int, widths: list[int], inner: list[int]) -> None:
    """Refuse what stock Detectron2's ``build_resnet_backbone`` cannot build.

    It builds ResNet-18/34 only with ``RES2_OUT_CHANNELS: 64`` (it asserts so), and every
    depth with widths that double from stage to stage. So: ResNet-50/101/152 at any width
    that doubles per stage (timm's default and its ``channels`` multiples do), ResNet-18/34
    at full width only. The rest run as the registered loco backbone, which takes any timm CNN.
    """
    problem = None
    if depth in (18, 34) and widths[0] != 64:
        problem = (
            f"res2 has {widths[0]} channels and stock Detectron2 builds ResNet-{depth} only "
            "with RES2_OUT_CHANNELS 64"
        )
    elif any(w != widths[0] * 2**i for i, w in enumerate(widths)) or any(
        c != inner[0] * 2**i for i, c in enumerate(inner)
    ):
        problem = (
            f"stage widths {widths} (inner {inner}) do not double per stage as stock "
            "Detectron2's ResNet requires"
        )
    if problem:
        raise LocoError(
            f"this ResNet-{depth} does not convert to stock Detectron2: {problem}; use the "
            "registered loco backbone instead: loco transfer train --checkpoint CKPT (any "
            "transfer/configs config, MODEL.BACKBONE.NAME build_loco_fpn_backbone)"
        )


def convert_checkpoint(
    path: str | Path, input_format: str = "RGB"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the ``.pkl`` payload, the config values it needs) for a loco ResNet checkpoint."""
    source = read_weights(path)
    assert source.state is not None
    state = source.state
    model = timm_resnet_to_detectron2(state, input_format)
    data = source.config.data if source.config else DataConfig()
    mean = [round(m * 255, 3) for m in data.mean]
    std = [round(s * 255, 3) for s in data.std]
    if input_format == "BGR":
        mean, std = mean[::-1], std[::-1]
    settings = {
        "MODEL.RESNETS": resnet_settings(state),
        "MODEL.PIXEL_MEAN": mean,
        "MODEL.PIXEL_STD": std,
        "INPUT.FORMAT": input_format,
    }
    payload = {"model": model, "__author__": "loco", "matching_heuristics": True}
    return payload, settings


def write_pkl(payload: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        pickle.dump(payload, f)
    return out


def settings_yaml(settings: dict[str, Any]) -> str:
    """The settings as the YAML lines to paste into a Detectron2 config."""
    r = settings["MODEL.RESNETS"]
    lines = [
        "MODEL:",
        f"  PIXEL_MEAN: {settings['MODEL.PIXEL_MEAN']}",
        f"  PIXEL_STD: {settings['MODEL.PIXEL_STD']}",
        "  RESNETS:",
        *[f"    {k}: {v}" for k, v in r.items()],
        "INPUT:",
        f'  FORMAT: "{settings["INPUT.FORMAT"]}"',
    ]
    return "\n".join(lines)
