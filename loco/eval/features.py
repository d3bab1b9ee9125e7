"""``loco features``: frozen per-stage readout features, extracted once and cached on disk.

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

Weights come from a loco checkpoint (any method), a plain timm/torchvision state dict
(``--backbone NAME`` gives the architecture), or a seeded random initialisation of the
same architecture (``--random-init``, the floor every method must beat).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from loco import checkpoint as ckpt
from loco.config import Config, _merge, _parse_override, config_from_dict
from loco.data.augment import eval_resize_size
from loco.data.loaders import build_eval_loader
from loco.data.shipped import resolve_data_root
from loco.errors import LocoError
from loco.filelock import locked
from loco.models.backbone import StagedBackbone, build_backbone
from loco.models.heads import pool
from loco.rundir import RunDir

log = logging.getLogger("loco.eval.features")

CACHE_VERSION = 1


# -- where the weights come from ---------------------------------------------------------
@dataclass
class Source:
    """The weights under evaluation, as results name them."""

    method: str  # pretraining method, "random-init", or a label for an external state dict
    checkpoint: str  # checkpoint file hash, or "random-init-seed<n>"
    path: str | None = None  # the checkpoint file, when there is one
    step: int | None = None  # pretraining step of a loco checkpoint

    @property
    def run_dir(self) -> Path | None:
        """The run directory of a loco checkpoint (``RUN/checkpoint.pt``, ``RUN/checkpoints/x.pt``)."""
        if self.path is None:
            return None
        return RunDir.from_checkpoint(self.path).root


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A copy of ``cfg`` with ``key=value`` overrides applied, validated."""
    data = cfg.to_dict()
    for text in overrides:
        _merge(data, _parse_override(text))
    return config_from_dict(data)


def state_hash(module: torch.nn.Module, n: int = 16) -> str:
    """Hash of a module's state dict (names, shapes, values)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:n]


def load_backbone(
    checkpoint: str | Path | None = None,
    *,
    cfg: Config | None = None,
    overrides: Sequence[str] = (),
    backbone_name: str | None = None,
    random_init: bool = False,
    seed: int = 0,
    method_name: str | None = None,
) -> tuple[Config, StagedBackbone, Source]:
    """Build the staged backbone to evaluate and the config it was made with.

    * loco checkpoint: its saved config (the ``model`` section always; ``data`` and the
      rest unless ``cfg`` is given), then ``overrides``; weights from its ``backbone``.
    * plain timm/torchvision state dict: architecture from ``backbone_name`` (or
      ``cfg.model``); missing/unexpected keys raise one error listing them.
    * ``random_init``: the same architecture with weights seeded by ``seed``.
    """
    state: dict[str, Any] | None = None
    base = cfg
    method, step = method_name, None
    if checkpoint is not None:
        state = ckpt.load(checkpoint)
        saved = state.get("config")
        if isinstance(saved, dict) and "backbone" in state:  # a loco checkpoint
            try:
                saved_cfg = config_from_dict(saved)
            except LocoError as exc:
                raise LocoError(
                    f"checkpoint '{checkpoint}' holds a config this loco cannot read: {exc}"
                ) from None
            if base is None:
                base = saved_cfg
            else:
                base = config_from_dict({**base.to_dict(), "model": saved_cfg.to_dict()["model"]})
            meta = state.get("meta") or {}
            method = method or str(meta.get("method") or saved_cfg.method.name)
            step = int(state["step"]) if isinstance(state.get("step"), int) else None
        elif backbone_name is None and cfg is None:
            raise LocoError(
                f"'{checkpoint}' is a plain state dict without a loco config; pass --backbone NAME "
                "(the timm model it was trained as, e.g. resnet50) and the image size, e.g. data.image_size=224"
            )
        else:
            method = method or Path(checkpoint).stem
    elif not random_init:
        raise LocoError("nothing to evaluate: pass --checkpoint PATH or --random-init")
    cfg = apply_overrides(base or Config(), overrides)
    if backbone_name:
        cfg.model.backbone = backbone_name
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = build_backbone(cfg.model, cfg.data.image_size)
    if random_init:
        source = Source(
            "random-init", f"random-init-seed{seed}", str(checkpoint) if checkpoint else None
        )
        return cfg, backbone, source
    assert state is not None and checkpoint is not None
    ckpt.load_backbone_weights(backbone.body, ckpt.backbone_state(state), str(checkpoint))
    return (
        cfg,
        backbone,
        Source(method or "unknown", ckpt.file_hash(checkpoint), str(checkpoint), step),
    )


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


def parse_stages(stages: str | Sequence[int] | int, num_modules: int) -> list[int]:
    """``"all"``, ``"1,2,4"``, ``"last"``, an int or a list -> sorted 1-based stage numbers."""
    if isinstance(stages, str):
        text = stages.strip().lower()
        if text == "all":
            return list(range(1, num_modules + 1))
        if text == "last":
            return [num_modules]
        try:
            stages = [int(s) for s in text.replace(" ", "").split(",") if s]
        except ValueError:
            raise LocoError(
                f"--stages '{stages}' not understood; use all, last or numbers such as 1,2,3,4"
            ) from None
    elif isinstance(stages, int):
        stages = [stages]
    out = sorted(set(int(s) for s in stages))
    bad = [s for s in out if not 1 <= s <= num_modules]
    if bad or not out:
        raise LocoError(
            f"stage(s) {bad or stages} do not exist: this backbone has stages 1..{num_modules}"
        )
    return out


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


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LocoError("--device cuda but no CUDA device is visible; use --device auto or cpu")
    return device


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
    with torch.inference_mode(), autocast:
        for images, y, bad in bar:
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


# -- command line (shared with `loco eval`) -----------------------------------------------
def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments naming the weights and the data; shared by `loco features` and `loco eval`."""
    g = parser.add_argument_group("weights")
    g.add_argument(
        "--checkpoint",
        help="loco checkpoint (RUN/checkpoint.pt) or a plain timm/torchvision state dict",
    )
    g.add_argument(
        "--backbone",
        help="timm model name for a plain state dict or --random-init without a checkpoint",
    )
    g.add_argument(
        "--random-init",
        action="store_true",
        help="seeded random weights of the same architecture (the floor)",
    )
    g.add_argument(
        "--seed", type=int, default=0, help="random-init seed and subset seed (default 0)"
    )
    g.add_argument(
        "--config",
        "-c",
        help="YAML config for the architecture/data when there is no loco checkpoint",
    )
    g.add_argument("--name", help="method label in results (default: the checkpoint's method)")
    d = parser.add_argument_group("data")
    d.add_argument(
        "--data",
        metavar="DIR",
        help="ImageFolder root with train/ and val/ (sets data.dataset=folder)",
    )
    d.add_argument("--workers", type=int, help="data loader workers (default: the config's)")
    d.add_argument(
        "--batch-size", type=int, default=256, help="images per forward pass (default 256)"
    )
    d.add_argument("--cache-dir", help="feature cache (default: RUN/features, or OUT/features)")
    d.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    d.add_argument(
        "--dtype", default="float16", choices=("float16", "float32"), help="cached feature dtype"
    )
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides applied on top of the checkpoint's config, e.g. data.image_size=224",
    )


def source_from_args(args: argparse.Namespace) -> tuple[Config, StagedBackbone, Source]:
    overrides = list(args.overrides or [])
    if args.data:
        overrides = [f"data.root={args.data}", "data.dataset=folder", *overrides]
    if args.workers is not None:
        overrides.append(f"data.num_workers={args.workers}")
    cfg = None
    if args.config:
        from loco.config import load_config

        cfg = load_config(args.config)
    return load_backbone(
        args.checkpoint,
        cfg=cfg,
        overrides=overrides,
        backbone_name=args.backbone,
        random_init=args.random_init,
        seed=args.seed,
        method_name=args.name,
    )


def default_out_dir(source: Source, out: str | None) -> Path:
    if out:
        return Path(out)
    if source.run_dir is not None:
        return source.run_dir
    raise LocoError(
        "--random-init without --checkpoint needs --out DIR for its results and features"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    parser.add_argument(
        "--split", default="train", help="train | val | a split folder name (default train)"
    )
    parser.add_argument(
        "--stages", default="all", help="1-based stages, e.g. 1,2,3,4 (default all)"
    )
    parser.add_argument(
        "--per-class", type=int, default=0, help="images per class (default 0 = all)"
    )
    parser.add_argument(
        "--out", help="where the cache goes when there is no run dir (OUT/features)"
    )


def run(args: argparse.Namespace) -> int:
    cfg, backbone, source = source_from_args(args)
    cache = (
        Path(args.cache_dir) if args.cache_dir else default_out_dir(source, args.out) / "features"
    )
    sets = extract_features(
        cfg,
        backbone,
        args.split,
        args.stages,
        cache,
        weights_id=source.checkpoint if source.path and source.method != "random-init" else None,
        per_class=args.per_class,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        progress=not args.no_progress,
    )
    print("| stage | n | dim | cached | file |\n|---|---|---|---|---|")
    for s, fs in sets.items():
        print(f"| S{s} | {len(fs)} | {fs.dim} | {'reused' if fs.cached else 'new'} | {fs.path} |")
    return 0


def feature_sets(
    cfg: Config,
    backbone: StagedBackbone,
    source: Source,
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
    weights_id = source.checkpoint if source.method != "random-init" else None
    common = dict(
        weights_id=weights_id,
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
