"""Frozen per-stage readout features, extracted once and cached on disk.

The backbone runs in eval mode without augmentation (Resize + CenterCrop at the
configured size, the eval transform of :mod:`loco.data.augment`); the output of each
requested local module is global-average pooled and written, chunk by chunk, into a
memory-mapped ``.npy`` file. kNN and linear evaluations then read the cache instead of
running the backbone again.

Cache layout: ``<cache_dir>/<split>-<key>/`` holding ``stage<k>.npy`` ([N, C], float16
by default), ``labels.npy`` ([N] int64) and ``meta.json`` (checkpoint hash, stages,
transform, classes). ``key`` hashes everything the features depend on: the weights (the
checkpoint file's hash), the architecture, the data root, split and subset, and the
transform. A different checkpoint therefore gets a different folder, and a re-run with
the same inputs reads the existing one. Images changed in place under the same root
are not detected: delete the cache folder then.

Which network runs (weights, config, device) is :mod:`loco.eval.network`'s job; the
``loco features`` command is :mod:`loco.eval.features_cli`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from loco.config import Config
from loco.data.augment import eval_resize_size
from loco.data.loaders import build_eval_loader
from loco.data.shipped import resolve_data_root
from loco.errors import LocoError
from loco.eval.network import parse_stages, resolve_device
from loco.filelock import locked
from loco.models.backbone import StagedBackbone
from loco.models.heads import pool
from loco.stop import StopFlag
from loco.weights import WeightsSource

log = logging.getLogger("loco.eval.features")

CACHE_VERSION = 1


def state_hash(module: torch.nn.Module, n: int = 16) -> str:
    """Hash of a module's state dict (names, shapes, values)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:n]


# -- features ----------------------------------------------------------------------------
@dataclass
class FeatureSet:
    """Pooled features of one stage: ``features`` [N, C] (a read-only memmap when cached)."""

    features: np.ndarray
    labels: np.ndarray
    stage: int = 0
    classes: list[str] = field(default_factory=list)
    path: Path | None = None
    cached: bool = False  # True when read from an existing cache, not computed by this call

    def __post_init__(self) -> None:
        if len(self.features) != len(self.labels):
            raise ValueError(f"{len(self.features)} features but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else int(self.labels.max()) + 1


def split_folder(cfg: Config, split: str) -> str:
    """``train``/``val`` name the configured split folders; anything else is a folder name."""
    return {"train": cfg.data.train_split, "val": cfg.data.val_split}.get(split, split)


def dataset_name(cfg: Config) -> str:
    return Path(cfg.data.root).name if cfg.data.dataset == "folder" else cfg.data.dataset


def cache_descriptor(
    cfg: Config, split: str, weights_id: str, per_class: int, seed: int, dtype: str
) -> dict[str, Any]:
    """Everything the cached features depend on (hashed into the cache folder's name)."""
    data = cfg.data
    root = resolve_data_root(data, splits=[split])
    return {
        "version": CACHE_VERSION,
        "weights": weights_id,
        "model": cfg.to_dict()["model"],
        "data": {"root": str(root.resolve()), "split": split, "per_class": per_class, "seed": seed},
        "transform": {
            "resize": eval_resize_size(data.image_size),
            "center_crop": data.image_size,
            "mean": list(data.mean),
            "std": list(data.std),
        },
        "readout": "global-average-pool",
        "dtype": dtype,
    }


def _read_meta(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def _open_cached(folder: Path, meta: dict[str, Any], stage: int) -> FeatureSet | None:
    info = meta.get("stages", {}).get(str(stage))
    if info is None:
        return None
    try:
        feats = np.load(folder / info["file"], mmap_mode="r")
        labels = np.load(folder / "labels.npy")
    except (OSError, ValueError):
        return None
    if feats.shape != (meta["n"], info["dim"]) or labels.shape != (meta["n"],):
        return None
    return FeatureSet(
        feats, labels, stage, list(meta.get("classes", [])), folder / info["file"], cached=True
    )


def extract_features(
    cfg: Config,
    backbone: StagedBackbone,
    split: str,
    stages: str | Sequence[int] = "all",
    cache_dir: str | Path = "features",
    *,
    weights_id: str | None = None,
    per_class: int = 0,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    dtype: str = "float16",
    progress: bool = True,
) -> dict[int, FeatureSet]:
    """Pooled features of ``stages`` (1-based) on ``split`` ("train", "val" or a folder).

    Reads them from ``cache_dir`` when an extraction with the same inputs is there;
    otherwise runs the frozen backbone (eval mode, no grad, bf16 autocast on CUDA) over the
    split once for all missing stages and writes them. ``weights_id`` names the weights in
    the cache key (pass the checkpoint's :func:`loco.checkpoint.file_hash`); by default a
    hash of the backbone's state dict. ``per_class`` > 0 takes that many images per class
    (seeded by ``seed``).
    """
    if dtype not in ("float16", "float32"):
        raise LocoError(f"feature dtype '{dtype}' unsupported; use float16 or float32")
    wanted = parse_stages(stages, backbone.num_modules)
    folder_name = split_folder(cfg, split)
    weights_id = weights_id or state_hash(backbone)
    desc = cache_descriptor(cfg, folder_name, weights_id, per_class, seed, dtype)
    key = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir) / f"{folder_name}-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    with locked(folder / ".lock"):
        meta = _read_meta(folder) or {}
        found = {s: _open_cached(folder, meta, s) for s in wanted} if meta else {}
        todo = [s for s in wanted if found.get(s) is None]
        if todo:
            meta = _extract(
                cfg,
                backbone,
                folder_name,
                todo,
                folder,
                desc,
                meta,
                per_class,
                seed,
                batch_size,
                resolve_device(device),
                dtype,
                progress,
            )
        out = {}
        for s in wanted:
            fs = found.get(s) or _open_cached(folder, meta, s)
            if fs is None:  # pragma: no cover - written just above
                raise LocoError(f"feature cache '{folder}' is unreadable; delete it and re-run")
            fs.cached = s not in todo
            out[s] = fs
    log.info(
        "features %s stages %s: %d x %s %s (%s)",
        folder_name,
        wanted,
        len(out[wanted[0]]),
        [out[s].dim for s in wanted],
        "reused" if not todo else "extracted",
        folder,
    )
    return out


@contextlib.contextmanager
def _removed_on_error(paths: Iterable[Path]) -> Iterator[None]:
    """Delete ``paths`` when the block raises (or exits on a stop)."""
    try:
        yield
    except BaseException:
        for path in paths:
            path.unlink(missing_ok=True)
        raise


def _stopped(reason: str, split: str) -> SystemExit:
    log.warning(
        "stopped by %s during feature extraction of '%s'; nothing cached for it: run the "
        "same command again",
        reason,
        split,
    )
    return SystemExit(143 if reason == "SIGTERM" else 130)


def _extract(
    cfg: Config,
    backbone: StagedBackbone,
    split: str,
    todo: list[int],
    folder: Path,
    desc: dict[str, Any],
    meta: dict[str, Any],
    per_class: int,
    seed: int,
    batch_size: int,
    device: torch.device,
    dtype: str,
    progress: bool,
) -> dict[str, Any]:
    loader = build_eval_loader(cfg, split, batch_size, per_class=per_class, seed=seed)
    n = len(loader.dataset)
    tmp = {s: folder / f".stage{s}.npy.tmp{os.getpid()}" for s in todo}
    arrays = {
        s: np.lib.format.open_memmap(
            tmp[s], mode="w+", dtype=dtype, shape=(n, backbone.channels[s - 1])
        )
        for s in todo
    }
    labels = np.empty(n, dtype=np.int64)
    was_training = backbone.training
    backbone.eval().to(device)
    last = max(todo)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    skipped: list[str] = []
    i = 0
    bar = tqdm(
        loader, desc=f"features {split}", disable=not progress, dynamic_ncols=True, file=sys.stderr
    )
    # a stop signal ends the extraction after the current batch; the temporary files go and
    # meta.json (written last: what marks a cache complete) is not written: a rerun extracts
    with torch.inference_mode(), autocast, StopFlag() as stop, _removed_on_error(tmp.values()):
        for images, y, bad in bar:
            if stop.reason():
                bar.close()
                raise _stopped(stop.reason(), split)
            skipped += bad
            b = y.numel()
            if b == 0:
                continue
            x = images.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            for k in range(last):
                x = backbone.forward_module(k, x)
                if k + 1 in arrays:
                    arrays[k + 1][i : i + b] = pool(x.float()).cpu().numpy()
            labels[i : i + b] = y.numpy()
            i += b
    bar.close()
    backbone.train(was_training)
    if skipped:
        log.warning(
            "features %s: skipped %d unreadable images (first: %s)",
            split,
            len(skipped),
            ", ".join(skipped[:3]),
        )
    if i == 0:
        raise LocoError(f"no readable images in split '{split}'; check the data folder")
    stages_meta = dict(meta.get("stages", {})) if meta.get("n") == i else {}
    for s, arr in arrays.items():
        arr.flush()
        if i < n:  # unreadable images were skipped: keep only the rows written
            short_path = tmp[s].with_name(tmp[s].name + ".short")
            short = np.lib.format.open_memmap(
                short_path, mode="w+", dtype=dtype, shape=(i, arr.shape[1])
            )
            for a in range(0, i, 65536):
                short[a : min(a + 65536, i)] = arr[a : min(a + 65536, i)]
            short.flush()
            del short
            os.replace(short_path, tmp[s])
        os.replace(tmp[s], folder / f"stage{s}.npy")
        stages_meta[str(s)] = {"file": f"stage{s}.npy", "dim": backbone.channels[s - 1]}
    arrays.clear()
    lab_tmp = folder / f".labels.npy.tmp{os.getpid()}"
    with open(lab_tmp, "wb") as f:
        np.save(f, labels[:i])
    os.replace(lab_tmp, folder / "labels.npy")
    new_meta = {
        **desc,
        "checkpoint": desc["weights"],
        "n": i,
        "classes": list(loader.dataset.classes),
        "stages": dict(sorted(stages_meta.items())),
        "skipped": skipped[:20],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    meta_tmp = folder / f".meta.json.tmp{os.getpid()}"
    meta_tmp.write_text(json.dumps(new_meta, indent=1))
    os.replace(meta_tmp, folder / "meta.json")
    return new_meta


def feature_sets(
    cfg: Config,
    backbone: StagedBackbone,
    source: WeightsSource,
    stages: str | Sequence[int],
    cache_dir: Path,
    *,
    train_per_class: int = 0,
    val_per_class: int = 0,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    dtype: str = "float16",
    progress: bool = True,
) -> tuple[Mapping[int, FeatureSet], Mapping[int, FeatureSet]]:
    """Train and val features of ``stages`` for the weights of ``source``."""
    common = dict(
        weights_id=source.cache_id,
        seed=seed,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        progress=progress,
    )
    train = extract_features(
        cfg, backbone, "train", stages, cache_dir, per_class=train_per_class, **common
    )
    val = extract_features(
        cfg, backbone, "val", stages, cache_dir, per_class=val_per_class, **common
    )
    return train, val
