"""Progressive ResNet-50 (PResNet-50) of the LoCo paper (Xiong et al., 2020, appendix).

Six stages res2..res7 whose activation memory and compute are about even, so a local
method holding one stage (greedy) or two adjacent ones (LoCo) keeps a small share of what
end-to-end training keeps. Between stages the map is resized by bilinear interpolation
(56 -> 36 -> 24 -> 16 -> 12 -> 8 at 224 px) instead of a strided convolution; the resize
factors are ratios of the stage resolutions, so any input size works (32-96 px too, with
the small-image stem below for 32-64 px).

Registered with timm's model registry on import (``timm.create_model("presnet50")``);
loco imports this module lazily where it builds a backbone whose name starts with
``presnet``. Keyword arguments (``model.kwargs``):

* ``width``: channel multiplier (0.25 trains on 2 CPU cores); grouped widths are rounded to
  a multiple of their groups.
* ``small_image``: a 3x3 stride-1 stem without max-pool (CIFAR-style, for 32-64 px).
* ``shortcut`` / ``resize_at``: the readings of the paper's table that it leaves open
  (docs/bench.md, "PResNet-50", says which was picked and why).
* ``dense_expand``: res-stages (5, 6, 7) whose last 1x1 stays dense in every block. The
  table groups it after each stage's first block; ``[5, 6]`` is the reading that reproduces
  the paper's FLOPs figures (4.11 G, shares within 0.4 points) against its table.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

__all__ = ["PResNet"]

# stage resolutions at 224 px (res2..res7); each resize scales by the ratio of two of them
RESOLUTIONS = (56, 36, 24, 16, 12, 8)
STEM_WIDTH = 32


class Resize(nn.Module):
    """Bilinear resize by ``scale`` (output side = round(side x scale), at least 1)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            return x
        h, w = x.shape[-2:]
        size = (max(1, round(h * self.scale)), max(1, round(w * self.scale)))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4f}"


def _conv_bn(cin: int, cout: int, k: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)
    )


class Block(nn.Module):
    """A residual block: ``basic`` (3x3, 3x3) or ``bottleneck`` (1x1, 3x3, 1x1), each conv
    with its group count; the first block of a stage resizes (``scale``) and projects.

    ``resize_at`` (first block only): ``input`` resizes the block's input, so the whole
    block runs at the new resolution; ``mid`` runs the first conv (and the projection) at
    the old one and resizes after it, as a ResNet's strided first conv would; ``output`` runs
    the whole block at the old resolution and resizes its output."""

    def __init__(
        self,
        cin: int,
        widths: tuple[int, ...],
        groups: tuple[int, ...],
        scale: float = 1.0,
        shortcut_groups: int = 1,
        resize_at: str = "input",
    ) -> None:
        super().__init__()
        kernels = (3, 3) if len(widths) == 2 else (1, 3, 1)
        chans = (cin, *widths)
        self.convs = nn.ModuleList(
            _conv_bn(a, b, k, g) for a, b, k, g in zip(chans[:-1], chans[1:], kernels, groups)
        )
        self.act = nn.ReLU(inplace=True)
        self.resize = Resize(scale)
        self.resize_at = resize_at
        cout = widths[-1]
        self.shortcut = (
            _conv_bn(cin, cout, 1, shortcut_groups) if cin != cout or scale != 1.0 else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize_at == "input":
            x = self.resize(x)
        h = x
        for i, conv in enumerate(self.convs):
            h = conv(h)
            if i < len(self.convs) - 1:
                h = self.act(h)
            if i == 0 and self.resize_at == "mid":
                h = self.resize(h)
        skip = x if self.shortcut is None else self.shortcut(x)
        if self.resize_at == "mid":
            skip = self.resize(skip)
        out = self.act(h + skip)
        return self.resize(out) if self.resize_at == "output" else out


def decoder_block(ref: Block, channels: int) -> Block:
    """LoCo's decoder conv block on a PResNet module: a first-of-stage block of the module's
    own kind (its widths and groups; the last conv dense, as in a first block) that halves
    the map by a bilinear resize, with a 1x1 projection shortcut."""
    convs = [c[0] for c in ref.convs]
    widths = (*(c.out_channels for c in convs[:-1]), channels)
    groups = (*(c.groups for c in convs[:-1]), 1)
    return Block(channels, widths, groups, scale=0.5)


def _round(c: float, groups: int) -> int:
    return max(groups, int(round(c / groups)) * groups)


# res2..res7: (blocks, conv widths: two = basic block, three = bottleneck, groups of every
# conv but the last, whether the last 1x1 is grouped too after the stage's first block)
STAGES: tuple[tuple[int, tuple[int, ...], int, bool], ...] = (
    (3, (56, 56), 1, False),
    (3, (96, 96), 1, False),
    (3, (144, 144, 576), 1, False),
    (3, (256, 256, 1024), 2, True),
    (3, (512, 512, 2048), 16, True),
    (3, (1024, 1024, 4096), 128, True),
)


class PResNet(nn.Module):
    """PResNet: a ResNet-style stem, six stages joined by bilinear resizes, average pool."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        width: float = 1.0,
        small_image: bool = False,
        shortcut: str = "dense",
        resize_at: str = "input",
        dense_expand: tuple[int, ...] | list[int] = (),
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        **_: Any,
    ) -> None:
        super().__init__()
        if shortcut not in ("dense", "grouped") or resize_at not in ("input", "mid", "output"):
            raise ValueError("shortcut is dense|grouped; resize_at is input|mid|output")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        stem = _round(STEM_WIDTH * width, 8)
        if small_image:
            self.conv1 = nn.Conv2d(in_chans, stem, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_chans, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_image else nn.MaxPool2d(3, 2, 1)
        reduction = 1 if small_image else 4
        self.feature_info: list[dict[str, Any]] = []
        stages, cin, prev = [], stem, RESOLUTIONS[0]
        for s, (depth, widths, g, group_out) in enumerate(STAGES):
            # every width a multiple of this stage's and the next stage's groups
            unit = max(8, g, STAGES[s + 1][2] if s + 1 < len(STAGES) else 1)
            scaled = tuple(_round(c * width, unit) for c in widths)
            blocks = []
            for b in range(depth):
                dense = s + 2 in dense_expand  # res-number: stage 0 is res2
                out_groups = g if group_out and b > 0 and not dense else 1
                blocks.append(
                    Block(
                        cin,
                        scaled,
                        (*(g,) * (len(widths) - 1), out_groups),
                        scale=RESOLUTIONS[s] / prev if b == 0 else 1.0,
                        shortcut_groups=g if shortcut == "grouped" and cin % g == 0 else 1,
                        resize_at=resize_at,
                    )
                )
                cin = scaled[-1]
            reduction_s = reduction * RESOLUTIONS[0] / RESOLUTIONS[s]
            prev = RESOLUTIONS[s]
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(
                {"num_chs": cin, "reduction": reduction_s, "module": f"stages.{s}"}
            )
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = cin
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(cin, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # zero-init the last BN of each residual branch
            if isinstance(m, Block):
                nn.init.zeros_(m.convs[-1][1].weight)

    # -- timm model conventions -----------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (8, 8),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "presnet50.untrained": _cfg(),
        "presnet50_small.untrained": _cfg(
            input_size=(3, 32, 32), pool_size=(5, 5), crop_pct=1.0, first_conv="conv1"
        ),
    }
)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> PResNet:
    return build_model_with_cfg(
        PResNet,
        variant,
        pretrained,
        feature_cfg={"flatten_sequential": True, "out_indices": tuple(range(len(STAGES)))},
        **kwargs,
    )


@register_model
def presnet50(pretrained: bool = False, **kwargs: Any) -> PResNet:
    """PResNet-50 (224 px: 4.2 GMACs, 4096-d features)."""
    return _create("presnet50", pretrained, **kwargs)


@register_model
def presnet50_small(pretrained: bool = False, **kwargs: Any) -> PResNet:
    """PResNet-50 with a 3x3 stride-1 stem and no max-pool, for 32-64 px images."""
    return _create("presnet50_small", pretrained, **{"small_image": True, **kwargs})
