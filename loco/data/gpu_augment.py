"""SimCLR views as batched tensor ops, on the GPU when the images are there.

The same distributions as the PIL path (:func:`loco.data.augment.build_view`), drawn from
the same :class:`SimCLRParams`: random-resized crop (torchvision's 10-attempt rule and
centre-crop fallback, per image size), flip, colour jitter applied with probability
``jitter_prob`` in a random order per sample, grayscale, Gaussian blur with a per-sample
sigma, solarize, normalise. The parameters come from one uniform matrix per sample drawn
with the sample's seed (:class:`EpochSampler`), so a sample's views depend on its seed
only, not on the batch it lands in, the device or a resume.

Pixels differ from the PIL path only by rounding: the PIL path rounds to uint8 after each
step, here everything after the resize stays float (on the GPU, the resize too).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from loco.data.augment import SimCLRParams

CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before the fallback
# columns of the uniforms drawn per sample and view
_AREA = slice(0, CROP_ATTEMPTS)
_LOG_RATIO = slice(CROP_ATTEMPTS, 2 * CROP_ATTEMPTS)
_TOP, _LEFT, _FLIP, _JITTER = 20, 21, 22, 23
_FACTORS = slice(24, 28)  # brightness, contrast, saturation, hue
_ORDER = slice(28, 32)  # argsort -> a uniformly random order of the four jitter ops
_GRAY, _BLUR, _SIGMA, _SOLARIZE = 32, 33, 34, 35
NUM_UNIFORMS = 36

_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision and PIL "L"


@dataclass
class ViewParams:
    """Random parameters of N views (CPU tensors, one row per view)."""

    boxes: torch.Tensor  # [N, 4] int64: top, left, height, width in the source image
    flip: torch.Tensor  # [N] bool
    jitter: torch.Tensor  # [N] bool: colour jitter applied at all
    factors: torch.Tensor  # [N, 4] float: brightness, contrast, saturation, hue shift
    order: torch.Tensor  # [N, 4] int64: jitter op applied at each position (0..3 as factors)
    gray: torch.Tensor  # [N] bool
    blur: torch.Tensor  # [N] bool
    sigma: torch.Tensor  # [N] float
    solarize: torch.Tensor  # [N] bool

    @property
    def crop_area(self) -> torch.Tensor:
        """Crop area in pixels of the source image."""
        return self.boxes[:, 2] * self.boxes[:, 3]

    def __getitem__(self, rows: slice) -> ViewParams:
        return ViewParams(*(getattr(self, f.name)[rows] for f in fields(self)))


def sample_uniforms(seeds: Sequence[int], num_views: int) -> torch.Tensor:
    """[B, num_views, NUM_UNIFORMS] float64 uniforms, row b a function of ``seeds[b]`` only."""
    rows = [np.random.default_rng(int(s)).random((num_views, NUM_UNIFORMS)) for s in seeds]
    if not rows:
        return torch.empty((0, num_views, NUM_UNIFORMS), dtype=torch.float64)
    return torch.from_numpy(np.stack(rows))


def _uniform(u: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return low + u * (high - low)


def crop_boxes(
    p: SimCLRParams, u: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor
) -> torch.Tensor:
    """RandomResizedCrop boxes [N, 4] (top, left, h, w), vectorised over N images.

    All 10 attempts are evaluated at once and the first that fits is kept; an image where
    none fits gets torchvision's fallback (the largest centred box with a ratio in range).
    """
    height = heights.double().unsqueeze(1)
    width = widths.double().unsqueeze(1)
    area = height * width * _uniform(u[:, _AREA], *p.crop_scale)
    log_ratio = (math.log(p.crop_ratio[0]), math.log(p.crop_ratio[1]))
    ratio = torch.exp(_uniform(u[:, _LOG_RATIO], *log_ratio))
    w = torch.round(torch.sqrt(area * ratio))  # round half to even, as Python's round
    h = torch.round(torch.sqrt(area / ratio))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.double().argmax(dim=1, keepdim=True)  # first True (0 if none: unused)
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    height, width = height.squeeze(1), width.squeeze(1)
    top = torch.floor(u[:, _TOP] * (height - h + 1))
    left = torch.floor(u[:, _LEFT] * (width - w + 1))

    # fallback: centre crop, aspect ratio clamped into the range
    in_ratio = width / height
    low, high = min(p.crop_ratio), max(p.crop_ratio)
    fb_w = torch.where(in_ratio > high, torch.round(height * high), width)
    fb_h = torch.where(in_ratio < low, torch.round(width / low), height)
    fb_top = torch.div(height - fb_h, 2, rounding_mode="floor")
    fb_left = torch.div(width - fb_w, 2, rounding_mode="floor")
    none = ~fits.any(dim=1)
    box = torch.stack([top, left, h, w], dim=1)
    fallback = torch.stack([fb_top, fb_left, fb_h, fb_w], dim=1)
    return torch.where(none.unsqueeze(1), fallback, box).long()


def draw_params(
    p: SimCLRParams, u: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor
) -> ViewParams:
    """Map uniforms [N, NUM_UNIFORMS] of N views of images (heights, widths) to parameters."""
    jitter_low = [max(0.0, 1 - p.brightness), max(0.0, 1 - p.contrast), max(0.0, 1 - p.saturation)]
    low = torch.tensor([*jitter_low, -p.hue], dtype=torch.float64)
    high = torch.tensor(
        [1 + p.brightness, 1 + p.contrast, 1 + p.saturation, p.hue], dtype=torch.float64
    )
    return ViewParams(
        boxes=crop_boxes(p, u, heights, widths),
        flip=u[:, _FLIP] < p.flip_prob,
        jitter=u[:, _JITTER] < p.jitter_prob,
        factors=(low + u[:, _FACTORS] * (high - low)).float(),
        order=u[:, _ORDER].argsort(dim=1),
        gray=u[:, _GRAY] < p.grayscale_prob,
        blur=u[:, _BLUR] < p.blur_prob,
        sigma=_uniform(u[:, _SIGMA], *p.blur_sigma).float(),
        solarize=u[:, _SOLARIZE] < p.solarize_prob,
    )


# ---------------------------------------------------------------- batched pixel ops
# x: [n, 3, H, W] float in [0, 1]; per-sample arguments: [n] tensors on x's device


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """[n, 1, H, W] luma."""
    r, g, b = x.unbind(1)
    wr, wg, wb = _GRAY_WEIGHTS
    return (wr * r + wg * g + wb * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other, clamped to [0, 1] (torchvision's _blend)."""
    return torch.lerp(other.expand_as(x), x, _per_sample(factor).expand_as(x)).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return x.mul(_per_sample(factor)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by ``shift`` (fraction of a turn), keeping S and V."""
    r, g, b = x.unbind(1)
    low, value = torch.aminmax(x, dim=1)
    chroma = value - low
    inv = torch.where(chroma > 0, chroma, 1.0).reciprocal_()
    # hue in sixths of a turn plus 6 (all branches positive); ties go to r, then g
    hue = torch.where(
        value == r,
        (g - b).mul_(inv).add_(6.0),
        torch.where(value == g, (b - r).mul_(inv).add_(8.0), (r - g).mul_(inv).add_(10.0)),
    )
    hue = hue.add_(6.0 * shift.view(-1, 1, 1)).remainder_(6.0).unsqueeze(1)
    # HSV -> RGB: channel n (R=5, G=3, B=1) is V - C * clamp(min(k, 4 - k), 0, 1),
    # k = (n + hue) mod 6
    n = (5.0 - 2.0 * torch.arange(3, device=x.device, dtype=x.dtype)).view(1, 3, 1, 1)
    k = (hue + n).remainder_(6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return torch.addcmul(value.unsqueeze(1), chroma.unsqueeze(1), ramp, value=-1.0)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """Separable blur, one sigma per sample (grouped convs), reflect padding (torchvision)."""
    n, c, h, w = x.shape
    half = kernel_size // 2
    t = torch.arange(kernel_size, device=x.device, dtype=torch.float32) - half
    kernel = torch.softmax(-(t**2) / (2 * sigma.float().view(-1, 1) ** 2), dim=1)  # [n, k]
    kernel = kernel.to(x.dtype).repeat_interleave(c, dim=0)  # one per (sample, channel)
    y = F.pad(x.reshape(1, n * c, h, w), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    return y.view(n, c, h, w)


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.where(x >= threshold, 1.0 - x, x)


def resized_crops(
    images: Sequence[torch.Tensor],
    source: Sequence[int],
    boxes: torch.Tensor,
    flip: torch.Tensor,
    size: int,
) -> torch.Tensor:
    """Row r: crop ``boxes[r]`` of ``images[source[r]]`` resized to size x size, flipped.

    Antialiased bilinear resize (torchvision's ``resize(antialias=True)`` filter, which is
    PIL's): uint8 in and out on the CPU (its fast path), float on other devices.
    """
    device = images[0].device if images else torch.device("cpu")
    dtype = torch.uint8 if device.type == "cpu" else torch.float32
    out = torch.empty((len(source), 3, size, size), dtype=dtype, device=device)
    for r, (k, (top, left, h, w), mirror) in enumerate(zip(source, boxes.tolist(), flip.tolist())):
        crop = images[k][:, top : top + h, left : left + w].unsqueeze(0).to(dtype)
        view = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)
        out[r] = view[0].flip(-1) if mirror else view[0]
    return out


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor to ``device`` without waiting for the kernels queued there."""
    return t.to(device, non_blocking=True)


class BatchedSimCLR:
    """``num_views`` SimCLR views of a batch of uint8 [3, H_i, W_i] images (any sizes).

    Runs where the images are. Call it with the images and one seed per image; it returns
    ``num_views`` normalised float32 [B, 3, size, size] tensors on the images' device.
    """

    def __init__(self, params: SimCLRParams, num_views: int = 2, chunk: int | None = None) -> None:
        if len(params.mean) != 3 or len(params.std) != 3:
            raise ValueError("the tensor pipeline works on RGB: mean and std need 3 values")
        self.params = params
        self.num_views = num_views
        # colour ops run on `chunk` views at a time: on the CPU a few MB that stay in cache
        # (and in malloc's free lists), on a GPU the whole batch (fewer kernel launches)
        self.chunk = chunk

    def draw(self, seeds: Sequence[int], sizes: Sequence[tuple[int, int]]) -> ViewParams:
        """Parameters of all views, row ``v * B + b`` = view v of image b."""
        u = sample_uniforms(seeds, self.num_views).transpose(0, 1).reshape(-1, NUM_UNIFORMS)
        hw = torch.tensor([tuple(s) for s in sizes], dtype=torch.int64).view(-1, 2)
        hw = hw.repeat(self.num_views, 1)
        return draw_params(self.params, u, hw[:, 0], hw[:, 1])

    def __call__(
        self, images: Sequence[torch.Tensor], seeds: Sequence[int], return_params: bool = False
    ) -> list[torch.Tensor] | tuple[list[torch.Tensor], ViewParams]:
        p = self.params
        batch = len(images)
        vp = self.draw(seeds, [tuple(im.shape[-2:]) for im in images])
        source = list(range(batch)) * self.num_views
        crops = resized_crops(images, source, vp.boxes, vp.flip, p.size)
        out = torch.empty(crops.shape, dtype=torch.float32, device=crops.device)
        mean = _to(torch.tensor(p.mean).view(1, 3, 1, 1), crops.device)
        std = _to(torch.tensor(p.std).view(1, 3, 1, 1), crops.device)
        chunk = self.chunk or (16 if crops.device.type == "cpu" else max(len(crops), 1))
        for start in range(0, len(crops), chunk):
            rows = slice(start, start + chunk)
            x = crops[rows].float().div_(255.0).clamp_(0.0, 1.0)
            x = self._colour(x, vp[rows])
            torch.div(x.sub_(mean), std, out=out[rows])
        views = list(out.view(self.num_views, batch, 3, p.size, p.size).unbind(0))
        return (views, vp) if return_params else views

    def _colour(self, x: torch.Tensor, vp: ViewParams) -> torch.Tensor:
        p = self.params
        dev = x.device

        def apply(mask: torch.Tensor, fn, *args: torch.Tensor) -> None:
            rows = mask.nonzero().squeeze(1)  # on the CPU: no wait for the device
            if rows.numel():
                on_dev = _to(rows, dev)
                x[on_dev] = fn(x[on_dev], *(_to(a[rows], dev) for a in args))

        strengths = (p.brightness, p.contrast, p.saturation, p.hue)
        for position in range(4):
            for op, fn in enumerate(JITTER_OPS):
                if strengths[op] > 0:
                    chosen = vp.jitter & (vp.order[:, position] == op)
                    apply(chosen, fn, vp.factors[:, op])
        apply(vp.gray, lambda y: grayscale(y).expand(-1, 3, -1, -1))
        apply(vp.blur, lambda y, s: gaussian_blur(y, p.blur_kernel, s), vp.sigma)
        threshold = math.ceil(p.solarize_threshold * 255) / 255  # the PIL path's uint8 128
        apply(vp.solarize, lambda y: solarize(y, threshold))
        return x

    def __repr__(self) -> str:
        return f"BatchedSimCLR(num_views={self.num_views}, {self.params})"
