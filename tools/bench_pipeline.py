#!/usr/bin/env python3
"""Throughput of the two SimCLR input pipelines: PIL workers vs the batched tensor path.

Measures images/s (each image gives 2 views) through ``build_pretrain_loader`` with
``data.pipeline=pil`` and ``data.pipeline=tensor`` on real JPEGs (default: the shipped
clothing set, 400x533 px, extracted once with ``prepare_shipped('clothing')``), plus the
stages on their own in this process: decode (PIL vs ``decode_jpeg``, and nvjpeg batched on
a GPU) and augmentation (SimCLRTransform vs BatchedSimCLR). Prints one JSON object::

    python tools/bench_pipeline.py                      # 224 px, CPU, all cores as workers
    python tools/bench_pipeline.py --device cuda        # tensor path decodes/augments on GPU
    python tools/bench_pipeline.py --root /data/imagenet --set data.train_split=train

Throughput is taken after ``--warmup`` batches (worker start-up) over ``--batches``
batches, best and median of ``--repeats`` runs; on a shared machine the best is the
steadier number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from loco.config import load_config
from loco.data.augment import SimCLRParams, SimCLRTransform
from loco.data.folder import ImageFolderDataset, load_rgb
from loco.data.gpu_augment import BatchedSimCLR
from loco.data.jpeg_loader import EncodedImages, decode_on_device
from loco.data.loaders import build_pretrain_loader, set_loader_epoch
from loco.data.shipped import prepare_shipped


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="", help="ImageFolder root (default: shipped clothing)")
    ap.add_argument("--size", type=int, default=224, help="view size in px")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=6, help="timed batches per run")
    ap.add_argument("--warmup", type=int, default=1, help="untimed batches first")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--pipelines", default="pil,tensor")
    ap.add_argument("--stage-images", type=int, default=64, help="images for stage timings")
    ap.add_argument("--no-stages", action="store_true")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override (default data.blur_prob=0.5: the SimCLR ImageNet recipe)",
    )
    ap.add_argument("--out", default="", help="also write the JSON here")
    return ap.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _summary(rates: list[float]) -> dict[str, float]:
    return {"best": round(max(rates), 1), "median": round(statistics.median(rates), 1)}


def bench_loader(cfg: Any, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """img/s through the pretraining loader (a fresh loader, so fresh workers, per run)."""
    rates = []
    for run in range(args.repeats):
        loader = build_pretrain_loader(cfg, device=device)
        set_loader_epoch(loader, run)
        it = iter(loader)
        for _ in range(args.warmup):
            next(it)
        _sync(device)
        start, images = time.perf_counter(), 0
        for _ in range(args.batches):
            views, labels, _ = next(it)
            images += len(labels)
        _sync(device)
        rates.append(images / (time.perf_counter() - start))
        del it, loader
    return {"img_per_s": _summary(rates), "runs": [round(r, 1) for r in rates]}


def _rate(fn: Any, count: int, device: torch.device, repeats: int) -> dict[str, float]:
    rates = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        rates.append(count / (time.perf_counter() - start))
    return _summary(rates)


def bench_stages(cfg: Any, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Decode and augmentation alone, in this process (img/s; 2 views per image)."""
    base = ImageFolderDataset(Path(cfg.data.root) / cfg.data.train_split)
    n = min(args.stage_images, len(base))
    paths = [base.path(i) for i in range(n)]
    seeds = list(range(n))
    out: dict[str, Any] = {"images": n}
    out["decode_pil_cpu"] = _rate(lambda: [load_rgb(p) for p in paths], n, device, args.repeats)
    encoded = EncodedImages(base, decode=False)
    cpu_decoded = EncodedImages(base, decode=True)
    out["decode_jpeg_cpu"] = _rate(
        lambda: [cpu_decoded[i] for i in range(n)], n, device, args.repeats
    )
    pil_images = [load_rgb(p) for p in paths]
    transform = SimCLRTransform(cfg.data)
    out["augment_pil_cpu"] = _rate(
        lambda: [transform(im) for im in pil_images], n, device, args.repeats
    )
    augment = BatchedSimCLR(SimCLRParams.from_config(cfg.data))
    tensors = [cpu_decoded[i].image for i in range(n)]
    out["augment_tensor_cpu"] = _rate(lambda: augment(tensors, seeds), n, device, args.repeats)
    if device.type == "cuda":
        items = [encoded[i] for i in range(n)]
        decode_on_device(items, device)  # nvjpeg start-up
        out["decode_nvjpeg_batched"] = _rate(
            lambda: decode_on_device(items, device), n, device, args.repeats
        )
        on_gpu = [t.to(device) for t in tensors]
        augment(on_gpu, seeds)
        out["augment_tensor_cuda"] = _rate(lambda: augment(on_gpu, seeds), n, device, args.repeats)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    root = args.root or str(prepare_shipped("clothing", splits=["train"]))
    overrides = [
        "data.dataset=folder",
        f"data.root={root}",
        f"data.image_size={args.size}",
        f"data.num_workers={args.workers}",
        f"optim.batch_size={args.batch_size}",
        "data.blur_prob=0.5",
        *args.set,
    ]
    cfg = load_config(None, overrides)
    torch.set_num_threads(1)  # stage timings per core; loader workers are single-threaded too
    result: dict[str, Any] = {
        "root": root,
        "size": args.size,
        "views": 2,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "device": str(device),
        "host": {
            "cpus": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
        "overrides": args.set,
        "loader": {},
    }
    for name in args.pipelines.split(","):
        cfg.data.pipeline = name
        result["loader"][name] = bench_loader(cfg, device, args)
    if not args.no_stages:
        result["stages_one_core"] = bench_stages(cfg, device, args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
