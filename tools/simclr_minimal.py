"""A minimal SimCLR written independently of loco: the reference the small comparison
(``tools/compare.py``, docs/results.md) checks loco's ``e2e`` against.

Chen et al. 2020 (SimCLR) from the paper, with plain torch, torchvision transforms and the
same timm backbone, and nothing from ``loco``: its own class-balanced subset, augmentations,
projection head, NT-Xent, LARS, warm-up + cosine schedule, loop, checkpoint/resume and a
weighted-kNN readout. If loco's e2e and this loop disagree by more than the seed-to-seed
spread at the same budget, one of them is wrong.

    python tools/simclr_minimal.py --root ~/.cache/loco/data/cifar10 --steps 150 \\
        --out runs/simclr_minimal --knn-train-per-class 500 --knn-val-per-class 200

The backbone is saved as ``<out>/simclr_independent.pt`` (a plain timm state dict), which
``loco eval all --checkpoint ... --config configs/small/e2e.yaml`` reads. Re-running the
same command resumes from ``<out>/checkpoint.pt`` (same data order; augmentations are
redrawn after a resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms


@dataclass
class Settings:
    """Defaults = configs/small/base.yaml (the comparison passes its own values)."""

    root: str = "~/.cache/loco/data/cifar10"  # ImageFolder root: <train_split>/<class>/*
    train_split: str = "train"
    val_split: str = "val"
    per_class: int = 1000  # training images per class (0 = all)
    image_size: int = 32
    backbone: str = "resnet18"
    model_kwargs: dict[str, Any] = field(default_factory=lambda: {"channels": [16, 32, 64, 128]})
    small_stem: bool = True  # 3x3 stride-1 first conv, no max-pool (CIFAR ResNet)
    hidden_dim: int = 512
    out_dim: int = 128
    temperature: float = 0.2
    batch_size: int = 128
    steps: int = 150
    warmup_steps: int = 15
    base_lr: float = 1.0  # peak lr = base_lr * batch / 256
    weight_decay: float = 1e-6
    momentum: float = 0.9
    trust_coefficient: float = 1e-3
    crop_scale_min: float = 0.08
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    seed: int = 0
    num_workers: int = 1
    ckpt_every: int = 100
    out: str = "runs/simclr_minimal"


# -- data -----------------------------------------------------------------------------------
def balanced_indices(targets: list[int], per_class: int, seed: int) -> list[int]:
    """``per_class`` random images of every class (all if 0), in folder order."""
    targets_np = np.asarray(targets)
    if per_class <= 0:
        return list(range(len(targets_np)))
    rng = np.random.RandomState(seed)
    picked = [
        rng.choice(np.flatnonzero(targets_np == c), per_class, replace=False)
        if (targets_np == c).sum() > per_class
        else np.flatnonzero(targets_np == c)
        for c in np.unique(targets_np)
    ]
    return sorted(int(i) for i in np.concatenate(picked))


class TwoViews:
    def __init__(self, view: transforms.Compose) -> None:
        self.view = view

    def __call__(self, image: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view(image), self.view(image)


def simclr_view(s: Settings) -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(s.image_size, scale=(s.crop_scale_min, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.RandomApply([transforms.ColorJitter(*s.jitter)], p=s.jitter_prob),
            transforms.RandomGrayscale(p=s.grayscale_prob),
            transforms.ToTensor(),
            transforms.Normalize(s.mean, s.std),
        ]
    )


def plain_view(s: Settings) -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.Resize(s.image_size),
            transforms.CenterCrop(s.image_size),
            transforms.ToTensor(),
            transforms.Normalize(s.mean, s.std),
        ]
    )


def epoch_loader(data: Subset, s: Settings, epoch: int, skip_batches: int) -> DataLoader:
    """One epoch in an order fixed by (seed, epoch); the first ``skip_batches`` left out."""
    order = torch.randperm(
        len(data), generator=torch.Generator().manual_seed(s.seed * 100_003 + epoch)
    )
    usable = len(data) // s.batch_size * s.batch_size
    order = order[skip_batches * s.batch_size : usable].tolist()
    return DataLoader(
        data,
        batch_size=s.batch_size,
        sampler=order,
        num_workers=s.num_workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(s.seed * 7919 + epoch * 31 + skip_batches),
    )


# -- model ----------------------------------------------------------------------------------
def make_backbone(s: Settings) -> nn.Module:
    """The timm ResNet, classifier removed; CIFAR stem if ``small_stem``. Outputs pooled features."""
    net = timm.create_model(s.backbone, num_classes=0, **s.model_kwargs)
    if s.small_stem:
        old = net.conv1
        net.conv1 = nn.Conv2d(
            old.in_channels, old.out_channels, kernel_size=3, stride=1, padding=1, bias=False
        )
        net.maxpool = nn.Identity()
    return net


def make_projection(in_dim: int, hidden: int, out: int) -> nn.Sequential:
    """SimCLR's g(.): Linear - BN - ReLU - Linear."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Linear(hidden, out),
    )


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over 2N embeddings: for row i the positive is its other view, the other 2N-2
    rows are negatives; mean over all 2N rows."""
    n = a.shape[0]
    z = F.normalize(torch.cat([a, b]), dim=1)
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio (You et al. 2017), as SimCLR uses it:
    groups with ``lars=False`` (biases, BN) get plain momentum SGD without weight decay."""

    def __init__(
        self, groups: list[dict[str, Any]], lr: float, momentum: float, trust: float
    ) -> None:
        super().__init__(
            groups,
            {"lr": lr, "momentum": momentum, "trust": trust, "weight_decay": 0.0, "lars": True},
        )

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=group["weight_decay"])
                if group["lars"]:
                    w_norm, d_norm = torch.linalg.norm(p), torch.linalg.norm(d)
                    if w_norm > 0 and d_norm > 0:
                        d = d.mul(group["trust"] * w_norm / d_norm)
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(d, alpha=group["lr"])
                p.sub_(buf)


def lr_at(step: int, s: Settings) -> float:
    """Linear warm-up from 0, then half-cosine to 0 over the remaining steps."""
    peak = s.base_lr * s.batch_size / 256
    if step < s.warmup_steps:
        return peak * (step + 1) / (s.warmup_steps + 1)
    t = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return peak * 0.5 * (1 + math.cos(math.pi * t))


def make_optimizer(modules: list[nn.Module], s: Settings) -> LARS:
    decay, plain = [], []
    for m in modules:
        for p in m.parameters():
            (decay if p.ndim > 1 else plain).append(p)
    groups = [
        {"params": decay, "weight_decay": s.weight_decay, "lars": True},
        {"params": plain, "weight_decay": 0.0, "lars": False},
    ]
    return LARS(groups, lr=lr_at(0, s), momentum=s.momentum, trust=s.trust_coefficient)


# -- loop -----------------------------------------------------------------------------------
def _save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _essential(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings a resumed run must share with the interrupted one."""
    return {
        k: v for k, v in settings.items() if k not in ("root", "out", "num_workers", "ckpt_every")
    }


def train(s: Settings, log_every: int = 10) -> dict[str, Any]:
    """Train (or resume, or return if finished); returns ``done.json``'s content."""
    out = Path(s.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    done_file = out / "done.json"
    if done_file.is_file():
        done = json.loads(done_file.read_text())
        if done.get("steps") == s.steps:
            return done
    torch.manual_seed(s.seed)
    np.random.seed(s.seed)
    root = Path(s.root).expanduser()
    base = datasets.ImageFolder(str(root / s.train_split), transform=TwoViews(simclr_view(s)))
    data = Subset(base, balanced_indices(base.targets, s.per_class, s.seed))
    per_epoch = len(data) // s.batch_size
    if per_epoch == 0:
        raise SystemExit(f"{len(data)} images are fewer than one batch of {s.batch_size}")
    backbone = make_backbone(s)
    with torch.no_grad():
        dim = backbone(torch.zeros(2, 3, s.image_size, s.image_size)).shape[1]
    head = make_projection(dim, s.hidden_dim, s.out_dim)
    opt = make_optimizer([backbone, head], s)
    step, elapsed = 0, 0.0
    ckpt_file = out / "checkpoint.pt"
    if ckpt_file.is_file():
        state = torch.load(ckpt_file, map_location="cpu", weights_only=False)
        if _essential(state["settings"]) != _essential(dataclasses.asdict(s)):
            raise SystemExit(f"{ckpt_file} was made with other settings; use another --out")
        backbone.load_state_dict(state["backbone"])
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step, elapsed = state["step"], state["elapsed"]
        print(f"simclr_minimal: resumed at step {step}/{s.steps}", flush=True)

    def checkpoint() -> None:
        _save(
            {
                "backbone": backbone.state_dict(),
                "head": head.state_dict(),
                "optimizer": opt.state_dict(),
                "rng": torch.get_rng_state(),
                "step": step,
                "elapsed": elapsed,
                "settings": dataclasses.asdict(s),
            },
            ckpt_file,
        )

    backbone.train()
    head.train()
    metrics = open(out / "metrics.jsonl", "a")
    t_start = time.perf_counter()
    try:
        while step < s.steps:
            epoch, within = divmod(step, per_epoch)
            for (v1, v2), _ in epoch_loader(data, s, epoch, within):
                lr = lr_at(step, s)
                for g in opt.param_groups:
                    g["lr"] = lr
                loss = nt_xent(head(backbone(v1)), head(backbone(v2)), s.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if not math.isfinite(loss.item()):
                    raise SystemExit(f"non-finite loss at step {step}")
                if step % log_every == 0 or step == s.steps:
                    print(
                        f"simclr_minimal step {step}/{s.steps} loss {loss.item():.4f} lr {lr:.4f}",
                        flush=True,
                    )
                    metrics.write(json.dumps({"step": step, "loss": loss.item(), "lr": lr}) + "\n")
                    metrics.flush()
                if step % s.ckpt_every == 0 or step == s.steps:
                    elapsed += time.perf_counter() - t_start
                    t_start = time.perf_counter()
                    checkpoint()
                if step >= s.steps:
                    break
    except KeyboardInterrupt:
        elapsed += time.perf_counter() - t_start
        checkpoint()
        print(f"simclr_minimal: interrupted, checkpoint at step {step}", flush=True)
        raise
    finally:
        metrics.close()
    _save(backbone.state_dict(), out / "simclr_independent.pt")
    done = {
        "steps": s.steps,
        "train_s": elapsed,
        "s_per_step": elapsed / max(step, 1),
        "images": len(data),
    }
    done_file.write_text(json.dumps(done, indent=1) + "\n")
    return done


# -- readout --------------------------------------------------------------------------------
@torch.no_grad()
def features(
    backbone: nn.Module, s: Settings, split: str, per_class: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    base = datasets.ImageFolder(str(Path(s.root).expanduser() / split), transform=plain_view(s))
    data = Subset(base, balanced_indices(base.targets, per_class, seed))
    feats, labels = [], []
    for x, y in DataLoader(data, batch_size=512, num_workers=s.num_workers):
        feats.append(F.normalize(backbone(x), dim=1))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_top1(
    s: Settings,
    weights: str | Path,
    train_per_class: int,
    val_per_class: int,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Weighted kNN (Wu et al. 2018): the k nearest training features by cosine vote with
    weight exp(sim / T); top-1 in percent on the val split, last-layer pooled features."""
    backbone = make_backbone(s)
    backbone.load_state_dict(torch.load(weights, map_location="cpu"))
    backbone.eval()
    xtr, ytr = features(backbone, s, s.train_split, train_per_class, s.seed)
    xva, yva = features(backbone, s, s.val_split, val_per_class, s.seed)
    k = min(k, len(ytr))
    num_classes = int(ytr.max()) + 1
    correct = 0
    for a in range(0, len(yva), 1024):
        sim, idx = (xva[a : a + 1024] @ xtr.t()).topk(k, dim=1)
        votes = torch.zeros(len(idx), num_classes).scatter_add_(
            1, ytr[idx], (sim / temperature).exp()
        )
        correct += int((votes.argmax(1) == yva[a : a + 1024]).sum())
    return 100.0 * correct / len(yva)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for f in dataclasses.fields(Settings):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, type=lambda v: v.lower() in ("1", "true", "yes"), default=default)
        elif isinstance(default, dict):
            p.add_argument(flag, type=json.loads, default=default, help="JSON")
        elif isinstance(default, tuple):
            p.add_argument(
                flag, type=lambda v: tuple(float(x) for x in v.split(",")), default=default
            )
        else:
            p.add_argument(flag, type=type(default), default=default)
    p.add_argument(
        "--knn-train-per-class", type=int, default=0, help="kNN readout after training (0 = none)"
    )
    p.add_argument("--knn-val-per-class", type=int, default=200)
    args = vars(p.parse_args(argv))
    knn_train, knn_val = args.pop("knn_train_per_class"), args.pop("knn_val_per_class")
    s = Settings(**args)
    done = train(s)
    print(json.dumps(done))
    if knn_train:
        top1 = knn_top1(s, Path(s.out).expanduser() / "simclr_independent.pt", knn_train, knn_val)
        print(f"kNN (k=20, T=0.07) top-1 on the last stage: {top1:.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
