"""SimCLR views and the evaluation transform (torchvision.transforms.v2, CPU workers).

The view distributions live in :class:`SimCLRParams` so a batched tensor/GPU pipeline can
sample the same ones. Geometry and colour run on PIL images and blur/solarize on uint8
tensors: the fastest split measured on 400x533 JPEG crops to 224 px.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.transforms import v2

from loco.config import DataConfig


@dataclass(frozen=True)
class SimCLRParams:
    """The distribution of one SimCLR view (Chen et al. 2020, appendix A)."""

    size: int
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    flip_prob: float
    jitter_prob: float
    brightness: float
    contrast: float
    saturation: float
    hue: float
    grayscale_prob: float
    blur_prob: float
    blur_kernel: int  # odd, ~10% of the image size
    blur_sigma: tuple[float, float]
    solarize_prob: float
    solarize_threshold: float  # fraction of the value range; pixels >= it are inverted
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_config(cls, cfg: DataConfig) -> SimCLRParams:
        s = cfg.color_jitter_strength
        kernel = max(3, int(0.1 * cfg.image_size))
        return cls(
            size=cfg.image_size,
            crop_scale=(cfg.crop_scale_min, 1.0),
            crop_ratio=(3 / 4, 4 / 3),
            flip_prob=0.5,
            jitter_prob=cfg.color_jitter_prob,
            brightness=0.4 * s,
            contrast=0.4 * s,
            saturation=0.4 * s,
            hue=min(0.1 * s, 0.5),  # torchvision caps hue at 0.5
            grayscale_prob=cfg.grayscale_prob,
            blur_prob=cfg.blur_prob,
            blur_kernel=kernel + 1 - kernel % 2,
            blur_sigma=(0.1, 2.0),
            solarize_prob=cfg.solarize_prob,
            solarize_threshold=0.5,
            mean=tuple(cfg.mean),
            std=tuple(cfg.std),
        )


def _finish(mean: tuple[float, ...], std: tuple[float, ...]) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def build_view(p: SimCLRParams) -> v2.Compose:
    """One random view: PIL image -> normalised float tensor [3, size, size]."""
    ops: list[v2.Transform] = [
        v2.RandomResizedCrop(p.size, scale=p.crop_scale, ratio=p.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(p.flip_prob),
    ]
    if p.jitter_prob > 0:
        jitter = v2.ColorJitter(p.brightness, p.contrast, p.saturation, p.hue)
        ops.append(v2.RandomApply([jitter], p=p.jitter_prob))
    if p.grayscale_prob > 0:
        ops.append(v2.RandomGrayscale(p.grayscale_prob))
    ops.append(v2.ToImage())  # uint8 tensor from here on
    if p.blur_prob > 0:
        blur = v2.GaussianBlur(p.blur_kernel, sigma=p.blur_sigma)
        ops.append(v2.RandomApply([blur], p=p.blur_prob))
    if p.solarize_prob > 0:
        threshold = math.ceil(p.solarize_threshold * 255)  # 128: same pixels as 0.5 on floats
        ops.append(v2.RandomSolarize(threshold, p=p.solarize_prob))
    return v2.Compose(ops + _finish(p.mean, p.std))


class SimCLRTransform:
    """PIL image -> ``num_views`` independently augmented views (list of [3, H, W] floats)."""

    def __init__(self, cfg: DataConfig, num_views: int = 2) -> None:
        self.params = SimCLRParams.from_config(cfg)
        self.num_views = num_views
        self.view = build_view(self.params)

    def __call__(self, image: object) -> list[torch.Tensor]:
        return [self.view(image) for _ in range(self.num_views)]

    def __repr__(self) -> str:
        return f"SimCLRTransform(num_views={self.num_views}, {self.params})"


def eval_resize_size(size: int) -> int:
    """Shorter side before the centre crop: size / 0.875 (224 -> 256); none below 64 px."""
    return int(size / 0.875) if size >= 64 else size


def eval_transform(cfg: DataConfig) -> v2.Compose:
    """Deterministic: resize the shorter side, centre crop, normalise."""
    size = cfg.image_size
    ops = [v2.Resize(eval_resize_size(size), antialias=True), v2.CenterCrop(size), v2.ToImage()]
    return v2.Compose(ops + _finish(tuple(cfg.mean), tuple(cfg.std)))
