"""Decoders on top of local modules: projection MLPs, LoCo's conv-block decoder, InfoPro's
reconstruction decoder.

Every local loss sees its module's output through one of these; e2e accepts the same
options so that a comparison between methods compares the learning rule, not the head.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from loco.config import DecoderConfig


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


class ResidualDownBlock(nn.Module):
    """One basic residual block with stride 2 (LoCo's decoder conv block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential(
            nn.Conv2d(channels, channels, 1, 2, bias=False), nn.BatchNorm2d(channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x), inplace=True)


class ProjectionDecoder(nn.Module):
    """[optional conv block] -> global average pool -> MLP -> embedding for NT-Xent."""

    def __init__(self, in_channels: int, cfg: DecoderConfig) -> None:
        super().__init__()
        self.block = ResidualDownBlock(in_channels) if cfg.conv_block else nn.Identity()
        self.mlp = mlp(in_channels, cfg.hidden_dim, cfg.out_dim, cfg.mlp_layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() == 3 and not isinstance(self.block, nn.Identity):
            raise ValueError(
                "decoder.conv_block needs feature maps; token backbones use conv_block=false"
            )
        return self.mlp(pool(self.block(h)))


class InfoProContrastiveHead(nn.Module):
    """InfoPro's projection: conv3x3 stride 2 + BN + ReLU, pool, 2-layer MLP."""

    def __init__(self, in_channels: int, cfg: DecoderConfig) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, 2, 1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
        )
        self.mlp = mlp(in_channels, cfg.hidden_dim, cfg.out_dim, 2)

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
