"""Decoders on top of local modules: projection MLPs, LoCo's conv-block decoder, InfoPro's
reconstruction decoder.

Every local loss sees its module's output through one of these; e2e accepts the same
options so that a comparison between methods compares the learning rule, not the head.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import timm.models._efficientnet_blocks as ir
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm, LayerNorm2d
from timm.models import convnext, regnet, resnet

from loco.config import DecoderConfig
from loco.errors import LocoError
from loco.models import presnet
from loco.models.backbone import StagedBackbone


def pool(h: torch.Tensor) -> torch.Tensor:
    """Global average pool of a feature map [B,C,H,W] or a token sequence [B,N,C]."""
    return h.mean(dim=(2, 3)) if h.dim() == 4 else h.mean(dim=1)


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int) -> nn.Sequential:
    """SimCLR projection head: (Linear-BN-ReLU) x (layers-1), then Linear."""
    mods: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        dim = hidden
    mods.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*mods)


def reference_block(backbone: StagedBackbone, k: int) -> nn.Module | None:
    """The last residual block of local module k (its type and widths are what the decoder's
    conv block copies), or None when module k holds no block of a supported family."""
    for unit in reversed(backbone.groups[k]):
        for m in reversed(list(backbone.unit_module(unit).modules())):
            if isinstance(m, _BLOCK_TYPES):
                return m
    return None


def _resnet_bottleneck(ref: resnet.Bottleneck, channels: int) -> nn.Module:
    """ResNet: a bottleneck (1x1 -> 3x3 stride 2 -> 1x1) with the stage's own bottleneck
    width and groups, and a 1x1 stride-2 projection shortcut."""
    width, groups = ref.conv1.out_channels, ref.conv2.groups
    planes = channels // resnet.Bottleneck.expansion
    # timm derives the width as floor(planes * base_width / 64) * cardinality
    base_width = (64 * (width // groups) + 0.5) / planes
    return resnet.Bottleneck(
        channels,
        planes,
        stride=2,
        downsample=_projection(channels),
        cardinality=groups,
        base_width=base_width,  # type: ignore[arg-type]
    )


def _resnet_basic(ref: resnet.BasicBlock, channels: int) -> nn.Module:
    """ResNet with basic blocks: one basic block (3x3 stride 2 -> 3x3), projection shortcut."""
    return resnet.BasicBlock(channels, channels, stride=2, downsample=_projection(channels))


def _projection(channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 1, stride=2, bias=False), nn.BatchNorm2d(channels)
    )


def _regnet_bottleneck(ref: regnet.Bottleneck, channels: int) -> nn.Module:
    """RegNet: its own first-of-stage block (grouped bottleneck, stride 2, 1x1 projection),
    with the stage's bottleneck ratio, group size and SE ratio."""
    width = ref.conv1.conv.out_channels
    se = ref.se
    return regnet.Bottleneck(
        channels,
        channels,
        stride=2,
        bottle_ratio=width / ref.conv3.conv.out_channels,
        group_size=width // ref.conv2.conv.groups,
        se_ratio=se.fc1.out_channels / ref.conv1.conv.in_channels if hasattr(se, "fc1") else 0.0,
        linear_out=isinstance(ref.act3, nn.Identity),
    )


def _convnext_stage(ref: convnext.ConvNeXtBlock, channels: int) -> nn.Module:
    """ConvNeXt: its downsampling layer (LayerNorm + 2x2 stride-2 conv) followed by one
    ConvNeXt block (7x7 depthwise, MLP, layer scale 1e-6 as in timm)."""
    conv_mlp = ref.use_conv_mlp
    return convnext.ConvNeXtStage(
        channels,
        channels,
        kernel_size=ref.conv_dw.kernel_size[0],
        stride=2,
        depth=1,
        ls_init_value=1e-6,
        conv_mlp=conv_mlp,
        norm_layer=LayerNorm2d,
        norm_layer_cl=LayerNorm2d if conv_mlp else LayerNorm,
    )


def _efficientnet_pair(
    ref: ir.InvertedResidual | ir.DepthwiseSeparableConv, channels: int
) -> nn.Module:
    """EfficientNet / MobileNet: the family downsamples with a stride-2 block of the stage's
    kind (inverted residual or depthwise-separable, which then has no skip), so the analogue
    is that block followed by one stride-1 block with its skip; expansion, kernel,
    activation and SE as in the stage's last block."""
    options: dict[str, Any] = {
        "dw_kernel_size": ref.conv_dw.kernel_size[0],
        "act_layer": type(ref.bn1.act),
        "se_layer": None,
    }
    if isinstance(ref.se, ir.SqueezeExcite):
        options["se_layer"] = functools.partial(
            ir.SqueezeExcite,
            rd_channels=ref.se.conv_reduce.out_channels,
            force_act_layer=type(ref.se.act1),
            gate_layer=type(ref.se.gate),
        )
    if isinstance(ref, ir.InvertedResidual):
        block: type[nn.Module] = ir.InvertedResidual
        mid, out = ref.conv_pw.out_channels, ref.conv_pwl.out_channels
        # the block's own expansion; where the module ends in a wider 1x1 conv (MobileNetV3's
        # last stage), the block's expanded width instead of expanding that width again
        options["exp_ratio"] = mid / (ref.conv_pw.in_channels if out == channels else channels)
    else:
        block = ir.DepthwiseSeparableConv
        options["pw_act"] = not isinstance(ref.bn2.act, nn.Identity)
    return nn.Sequential(
        block(channels, channels, stride=2, **options), block(channels, channels, **options)
    )


# block type of the backbone (or a subclass) -> the decoder's conv block for it
_BUILDERS: dict[type[nn.Module], Callable[[Any, int], nn.Module]] = {
    resnet.Bottleneck: _resnet_bottleneck,
    resnet.BasicBlock: _resnet_basic,
    regnet.Bottleneck: _regnet_bottleneck,
    convnext.ConvNeXtBlock: _convnext_stage,
    ir.InvertedResidual: _efficientnet_pair,
    ir.DepthwiseSeparableConv: _efficientnet_pair,
    presnet.Block: presnet.decoder_block,
}
_BLOCK_TYPES = tuple(_BUILDERS)


def conv_block(backbone: StagedBackbone, k: int) -> nn.Module:
    """LoCo's decoder conv block for module k: one residual block with stride-2 downsampling
    (the paper's Sec. 4.5), built from the backbone's own block family, keeping module k's
    channel count."""
    if backbone.reductions[k] == 0:
        raise LocoError(
            "decoder.conv_block needs feature maps; token backbones use conv_block=false"
        )
    ref = reference_block(backbone, k)
    if ref is None:
        found = type(backbone.unit_module(backbone.groups[k][-1])).__name__
        raise LocoError(
            f"decoder.conv_block has no block for '{backbone.name}' (module S{k + 1} ends in a "
            f"{found}; supported: timm ResNet/ResNeXt, RegNet, ConvNeXt, EfficientNet/MobileNet, PResNet); "
            "use decoder.conv_block=false"
        )
    build = next(b for t, b in _BUILDERS.items() if isinstance(ref, t))
    return build(ref, backbone.channels[k])


class ProjectionDecoder(nn.Module):
    """[optional conv block] -> global average pool -> MLP -> embedding for NT-Xent."""

    def __init__(self, in_channels: int, cfg: DecoderConfig, block: nn.Module | None = None):
        super().__init__()
        if cfg.conv_block and block is None:
            raise ValueError("decoder.conv_block=true needs the conv block (see for_module)")
        self.block = block if cfg.conv_block and block is not None else nn.Identity()
        self.mlp = mlp(in_channels, cfg.hidden_dim, cfg.out_dim, cfg.mlp_layers)

    @classmethod
    def for_module(cls, backbone: StagedBackbone, k: int, cfg: DecoderConfig) -> ProjectionDecoder:
        """The decoder of local module k (its conv block follows the backbone's family)."""
        block = conv_block(backbone, k) if cfg.conv_block else None
        return cls(backbone.channels[k], cfg, block)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(pool(self.block(h)))


class InfoProContrastiveHead(nn.Module):
    """InfoPro's projection: conv3x3 stride 2 + BN + ReLU, pool, MLP (the paper: 2 layers)."""

    def __init__(self, in_channels: int, cfg: DecoderConfig, layers: int = 2) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, 2, 1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
        )
        self.mlp = mlp(in_channels, cfg.hidden_dim, cfg.out_dim, layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(pool(self.conv(h)))


class ReconstructionDecoder(nn.Module):
    """InfoPro's decoder: upsample to the input size, conv-BN-ReLU, conv to RGB (logits).

    Returns logits; the loss applies the sigmoid inside BCE-with-logits, which is the
    numerically stable form of sigmoid + BCE.
    """

    def __init__(self, in_channels: int, image_size: int, hidden: int = 32) -> None:
        super().__init__()
        self.image_size = image_size
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, 1, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 3, 3, 1, 1),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        return self.net(F.interpolate(h, size=size, mode="bilinear", align_corners=False))
