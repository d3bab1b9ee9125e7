"""Linear probes on a frozen backbone, per stage; two protocols.

``cached`` (the fast default; MAE, He et al. 2022, after Goyal et al. 2019; the sweep as in
DINOv2's linear eval): a linear classifier behind ``BatchNorm1d(affine=False)`` on cached
features. One pass over the feature batches trains a head for every (stage, learning
rate) pair at once, each in its own optimizer param group (SGD, momentum 0.9, no weight
decay, cosine schedule). The learning rate is chosen per stage on a held-out part of the
training split (10 %, seeded, class-stratified); the chosen head's val top-1/top-5 is
reported with the winning lr.

``augmented`` (the paper's protocol; LoCo, Xiong et al. 2020, following MoCo): the
frozen backbone (eval mode, no grad) sees a RandomResizedCrop + horizontal flip of every
training image each epoch; one linear layer per stage is trained with SGD, lr 30 for
256 images, no momentum, no weight decay, 100 epochs, lr x0.1 at 30/60/90 % of training
(``step``) or cosine (``cosine``); val images are resized and centre-cropped.

ResNet and ViT features want learning rates orders of magnitude apart, so both protocols
take their numbers from a per-architecture :data:`PRESETS` entry (``--preset``, or chosen
from the backbone's name).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from tqdm import tqdm

from loco.config import Config, DataConfig
from loco.data.folder import ImageFolderDataset, SkipUnreadable, subset_per_class
from loco.data.loaders import DatasetView, EpochSampler, build_eval_loader
from loco.data.shipped import resolve_data_root
from loco.errors import LocoError
from loco.eval.features import FeatureSet
from loco.eval.network import parse_stages, resolve_device
from loco.models.backbone import StagedBackbone
from loco.models.heads import pool
from loco.stop import worker_init

log = logging.getLogger("loco.eval.linear")


@dataclass(frozen=True)
class ProbePreset:
    """Linear-probe hyper-parameters of one architecture family."""

    name: str
    lrs: tuple[float, ...]  # cached: the swept learning rates (features are BN-normalised)
    epochs: int  # cached
    aug_lr: float  # augmented: lr for 256 images, scaled linearly with the batch size
    aug_momentum: float
    aug_weight_decay: float
    aug_schedule: str  # "step" (x0.1 at 30/60/90 %) or "cosine"
    aug_epochs: int
    reference: str


PRESETS: dict[str, ProbePreset] = {
    "resnet": ProbePreset(
        "resnet",
        (0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
        100,
        aug_lr=30.0,
        aug_momentum=0.0,
        aug_weight_decay=0.0,
        aug_schedule="step",
        aug_epochs=100,
        reference="LoCo / MoCo linear eval: SGD lr 30, no momentum, 100 epochs, x0.1 at 30/60/90",
    ),
    "vit": ProbePreset(
        "vit",
        (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1),
        100,
        aug_lr=1e-3,
        aug_momentum=0.9,
        aug_weight_decay=0.0,
        aug_schedule="cosine",
        aug_epochs=100,
        reference="DINO linear eval: SGD lr 1e-3 x batch/256, momentum 0.9, cosine, 100 epochs",
    ),
}
_VIT_NAMES = ("vit", "deit", "beit", "eva", "swin", "xcit", "cait")


def preset_for(backbone: str, name: str | None = None) -> ProbePreset:
    """``name`` if given, else ``vit`` for transformer backbones and ``resnet`` otherwise."""
    if name is None:
        name = "vit" if any(v in backbone.lower() for v in _VIT_NAMES) else "resnet"
    if name not in PRESETS:
        raise LocoError(f"linear preset '{name}' unknown; use one of {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass(frozen=True)
class LinearResult:
    protocol: str  # "linear-cached", "linear-aug-step", "linear-aug-cosine"
    stage: int
    lr: float  # the chosen (cached) or used (augmented) learning rate
    top1: float  # percent, on val
    top5: float
    epochs: int
    holdout_top1: float | None = None  # cached: accuracy of the chosen head on held-out train
    sweep: dict[str, float] | None = None  # cached: held-out top-1 of every lr
    n_train: int = 0  # training images (cached: fit + held-out)
    n_val: int = 0


def stratified_holdout(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) indices: ``fraction`` of each class held out (at least one image of
    every class with two or more), chosen with ``seed``; both sorted."""
    if not 0 < fraction < 1:
        raise LocoError(f"held-out fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    hold: list[np.ndarray] = []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        take = min(max(1, round(fraction * len(idx))), len(idx) - 1) if len(idx) > 1 else 0
        hold.append(idx[:take])
    held = np.sort(np.concatenate(hold)) if hold else np.empty(0, dtype=np.int64)
    if len(held) == 0:
        raise LocoError(
            "too few training images to hold any out for choosing the lr; use >= 2 per class"
        )
    fit = np.setdiff1d(np.arange(len(labels)), held)
    return fit, held


def _to_device(
    x: np.ndarray, device: torch.device, dtype: torch.dtype, chunk: int = 65536
) -> torch.Tensor:
    """Copy a (memmapped) array to ``device`` in chunks, without a second host copy."""
    out = torch.empty(tuple(x.shape), dtype=dtype, device=device)
    for a in range(0, len(x), chunk):
        out[a : a + chunk] = torch.from_numpy(np.array(x[a : a + chunk], copy=True)).to(
            device, dtype
        )
    return out


def _topk_correct(logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = top == y[:, None]
    return int(hit[:, 0].sum()), int(hit.any(dim=1).sum())


class _CachedProbe(nn.Module):
    """One BN(affine=False) per stage feeding one linear head per (stage, lr).

    The BN has no parameters and sees the same batches for every lr, so one per stage
    equals one per head at a fraction of the cost.
    """

    def __init__(self, dims: Mapping[int, int], num_classes: int, n_lrs: int) -> None:
        super().__init__()
        self.norms = nn.ModuleDict(
            {str(s): nn.BatchNorm1d(d, affine=False) for s, d in dims.items()}
        )
        self.heads = nn.ModuleDict()
        for s, d in dims.items():
            for j in range(n_lrs):
                head = nn.Linear(d, num_classes)
                nn.init.normal_(head.weight, std=0.01)
                nn.init.zeros_(head.bias)
                self.heads[f"s{s}_lr{j}"] = head

    def forward(self, s: int, x: torch.Tensor, n_lrs: int) -> list[torch.Tensor]:
        z = self.norms[str(s)](x)
        return [self.heads[f"s{s}_lr{j}"](z) for j in range(n_lrs)]


def linear_probe_cached(
    train: Mapping[int, FeatureSet],
    val: Mapping[int, FeatureSet],
    lrs: Sequence[float] = PRESETS["resnet"].lrs,
    *,
    epochs: int = 100,
    batch_size: int = 256,
    holdout: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    num_classes: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> list[LinearResult]:
    """Train a BN + linear head per (stage, lr) on cached features in one pass; per stage,
    choose the lr on a held-out ``holdout`` fraction of train and report its val accuracy."""
    stages = sorted(train)
    if not stages or sorted(val) != stages:
        raise LocoError(f"linear probe: train stages {stages} and val stages {sorted(val)} differ")
    y_np = np.asarray(train[stages[0]].labels, dtype=np.int64)
    yv_np = np.asarray(val[stages[0]].labels, dtype=np.int64)
    for s in stages:
        if not np.array_equal(train[s].labels, y_np) or not np.array_equal(val[s].labels, yv_np):
            raise LocoError(
                "linear probe: stages were extracted from different images; re-extract them together"
            )
    lrs = [float(lr) for lr in lrs]
    if not lrs or min(lrs) <= 0 or epochs < 1:
        raise LocoError(
            f"linear probe needs positive lrs and epochs >= 1, got lrs={lrs} epochs={epochs}"
        )
    C = num_classes or int(max(y_np.max(), yv_np.max())) + 1
    fit, held = stratified_holdout(y_np, holdout, seed)
    dev = resolve_device(device)
    store = torch.float16 if dev.type == "cuda" else torch.float32
    X = {s: _to_device(train[s].features, dev, store) for s in stages}
    y = torch.from_numpy(y_np).to(dev)
    fit_t = torch.from_numpy(fit).to(dev)
    L = len(lrs)

    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        probe = _CachedProbe({s: train[s].dim for s in stages}, C, L).to(dev)
    groups = [
        {"params": probe.heads[f"s{s}_lr{j}"].parameters(), "lr": lr, "base_lr": lr}
        for s in stages
        for j, lr in enumerate(lrs)
    ]
    opt = torch.optim.SGD(groups, lr=lrs[0], momentum=momentum, weight_decay=weight_decay)
    bs = min(batch_size, len(fit))
    steps = max(1, len(fit) // bs)  # full batches only: BN needs > 1 sample
    total = epochs * steps
    gen = torch.Generator().manual_seed(seed)
    probe.train()
    t = 0
    bar = tqdm(
        total=total,
        desc="linear (cached)",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    for _ in range(epochs):
        perm = fit_t[torch.randperm(len(fit), generator=gen).to(dev)]
        for b in range(steps):
            idx = perm[b * bs : (b + 1) * bs]
            scale = 0.5 * (1 + math.cos(math.pi * t / total))
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * scale
            yb = y[idx]
            loss = sum(
                F.cross_entropy(logits, yb)
                for s in stages
                for logits in probe(s, X[s][idx].float(), L)
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            t += 1
            bar.update(1)
    bar.close()

    probe.eval()
    results = []
    with torch.no_grad():
        held_t = torch.from_numpy(held).to(dev)
        for s in stages:
            correct = np.zeros(L)
            for a in range(0, len(held), 8192):
                idx = held_t[a : a + 8192]
                for j, logits in enumerate(probe(s, X[s][idx].float(), L)):
                    correct[j] += _topk_correct(logits, y[idx])[0]
            acc = 100.0 * correct / len(held)
            best = int(np.argmax(acc))  # first of equals: the smaller lr
            c1 = c5 = 0
            Xv = val[s].features
            for a in range(0, len(yv_np), 8192):
                xv = torch.from_numpy(np.array(Xv[a : a + 8192], copy=True)).to(dev, torch.float32)
                yv = torch.from_numpy(yv_np[a : a + 8192]).to(dev)
                logits = probe.heads[f"s{s}_lr{best}"](probe.norms[str(s)](xv))
                d1, d5 = _topk_correct(logits, yv)
                c1, c5 = c1 + d1, c5 + d5
            results.append(
                LinearResult(
                    "linear-cached",
                    s,
                    lrs[best],
                    100.0 * c1 / len(yv_np),
                    100.0 * c5 / len(yv_np),
                    epochs,
                    holdout_top1=float(acc[best]),
                    sweep={f"{lr:g}": float(v) for lr, v in zip(lrs, acc)},
                    n_train=len(y_np),
                    n_val=len(yv_np),
                )
            )
            log.info(
                "linear (cached) S%d: lr %g chosen (held-out %.2f%%), val top-1 %.2f%%",
                s,
                lrs[best],
                acc[best],
                results[-1].top1,
            )
    return results


# -- the augmented protocol ----------------------------------------------------------------
def probe_train_transform(data: DataConfig) -> v2.Compose:
    """RandomResizedCrop (scale 0.08-1) + horizontal flip, normalised."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(data.image_size, scale=(0.08, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(data.mean), list(data.std)),
        ]
    )


def _lr_factor(schedule: str, epoch: float, epochs: int) -> float:
    """Multiplier of the base lr at (fractional) ``epoch``."""
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    milestones = [round(f * epochs) for f in (0.3, 0.6, 0.9)]
    return 0.1 ** sum(int(epoch) >= m for m in milestones if m > 0)


def _readout(
    backbone: StagedBackbone, x: torch.Tensor, stages: Sequence[int]
) -> dict[int, torch.Tensor]:
    feats = {}
    for k in range(max(stages)):
        x = backbone.forward_module(k, x)
        if k + 1 in stages:
            feats[k + 1] = pool(x.float())
    return feats


def linear_probe_augmented(
    cfg: Config,
    backbone: StagedBackbone,
    stages: str | Sequence[int] = "last",
    *,
    lr: float = 30.0,
    schedule: str = "step",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    epochs: int = 100,
    batch_size: int = 256,
    train_per_class: int = 0,
    val_per_class: int = 0,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> list[LinearResult]:
    """The paper's linear evaluation: augmented images through the frozen backbone.

    The backbone stays in eval mode (BN statistics frozen) and runs without gradients; one
    linear layer per stage trains on the same batches with SGD at ``lr * batch_size / 256``.
    """
    if schedule not in ("step", "cosine"):
        raise LocoError(f"linear schedule '{schedule}' unknown; use step or cosine")
    if epochs < 1 or lr <= 0:
        raise LocoError(f"linear probe needs epochs >= 1 and lr > 0, got {epochs}, {lr}")
    stages = parse_stages(stages, backbone.num_modules)
    dev = resolve_device(device)
    data = cfg.data
    root = resolve_data_root(data, splits=[data.train_split, data.val_split])
    base = ImageFolderDataset(root / data.train_split, transform=probe_train_transform(data))
    indices = subset_per_class(base, train_per_class, seed) if train_per_class else None
    view = DatasetView(base, indices)
    sampler = EpochSampler(len(view), seed=seed)
    size = data.image_size
    loader = DataLoader(
        view,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=data.num_workers,
        collate_fn=SkipUnreadable(base.skipped, (3, size, size)),
        pin_memory=dev.type == "cuda",
        persistent_workers=data.num_workers > 0,
        worker_init_fn=worker_init(),  # loco.stop: workers outlive a stop signal
    )
    C = len(base.classes)
    was_training = backbone.training
    backbone.eval().to(dev)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        heads = nn.ModuleDict({str(s): nn.Linear(backbone.channels[s - 1], C) for s in stages}).to(
            dev
        )
    for head in heads.values():
        nn.init.normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)
    base_lr = lr * batch_size / 256
    opt = torch.optim.SGD(
        heads.parameters(), lr=base_lr, momentum=momentum, weight_decay=weight_decay
    )
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if dev.type == "cuda"
        else contextlib.nullcontext()
    )
    n_batches = max(1, len(loader))
    bar = tqdm(
        total=epochs * n_batches,
        desc=f"linear (augmented, {schedule})",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    unreadable: set[str] = set()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        heads.train()
        for b, (images, y, bad) in enumerate(loader):
            bar.update(1)
            unreadable.update(bad)
            if y.numel() == 0:
                continue
            factor = _lr_factor(
                schedule, epoch + b / n_batches if schedule == "cosine" else epoch, epochs
            )
            for g in opt.param_groups:
                g["lr"] = base_lr * factor
            x, y = images.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            with torch.no_grad(), autocast:
                feats = _readout(backbone, x, stages)
            loss = sum(F.cross_entropy(heads[str(s)](feats[s]), y) for s in stages)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    bar.close()

    heads.eval()
    val_loader = build_eval_loader(
        cfg, data.val_split, batch_size, per_class=val_per_class, seed=seed
    )
    c1 = dict.fromkeys(stages, 0)
    c5 = dict.fromkeys(stages, 0)
    n = 0
    with torch.no_grad():
        for images, y, _bad in val_loader:
            if y.numel() == 0:
                continue
            x, y = images.to(dev), y.to(dev)
            with autocast:
                feats = _readout(backbone, x, stages)
            for s in stages:
                d1, d5 = _topk_correct(heads[str(s)](feats[s]), y)
                c1[s] += d1
                c5[s] += d5
            n += y.numel()
    backbone.train(was_training)
    if n == 0:
        raise LocoError("no readable validation images")
    return [
        LinearResult(
            f"linear-aug-{schedule}",
            s,
            lr,
            100.0 * c1[s] / n,
            100.0 * c5[s] / n,
            epochs,
            n_train=len(view) - len(unreadable),
            n_val=n,
        )
        for s in stages
    ]
