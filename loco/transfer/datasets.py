"""COCO-format datasets for Detectron2: registration by path, and seeded image subsets.

- :func:`register_coco_json`: any COCO instances json + image folder, under a name derived
  from the json path (registering the same files twice returns the same name).
- :func:`check_files`: the files a registered dataset reads exist (one-line error if not).
- :func:`subsample_coco`: keep ``n`` images (and their annotations) of a COCO json, chosen
  with a seeded RNG among the images that have at least one annotation; categories and
  every other top-level entry are kept. ``coco_2017_train_10k`` and ``coco_2017_train_1k``
  (optionally ``_seed<S>``, default seed 0) are built this way on first use from
  ``$DETECTRON2_DATASETS/coco/annotations/instances_train2017.json`` and cached.

Subsampling needs no Detectron2; registration imports it when called.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loco.errors import LocoError

log = logging.getLogger(__name__)

SUBSET_NAME = re.compile(r"^coco_2017_train_(\d+)(k?)(?:_seed(\d+))?$")


def read_coco_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise LocoError(f"COCO annotation file '{path}' not found")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise LocoError(f"'{path}' is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= set(data):
        raise LocoError(
            f"'{path}' is not a COCO instances file (needs images, annotations, categories)"
        )
    return data


def subsample_coco(
    src: str | Path, dst: str | Path, n_images: int, seed: int = 0, annotated_only: bool = True
) -> dict[str, int]:
    """Write the COCO json ``dst`` holding ``n_images`` images of ``src``, chosen with ``seed``.

    The choice depends only on ``src``'s image ids and ``seed``; images keep their order
    in ``src``. Returns ``{"images": n, "annotations": m}``.
    """
    data = read_coco_json(src)
    annotated = {a["image_id"] for a in data["annotations"]}
    pool = sorted(im["id"] for im in data["images"] if not annotated_only or im["id"] in annotated)
    if not 0 < n_images <= len(pool):
        raise LocoError(
            f"cannot take {n_images} images from '{src}': it has {len(pool)}"
            f"{' annotated' if annotated_only else ''} images"
        )
    keep = set(random.Random(seed).sample(pool, n_images))
    out = dict(data)
    out["images"] = [im for im in data["images"] if im["id"] in keep]
    out["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    info = dict(data.get("info") or {})
    info["loco_subset"] = {"source": str(src), "n_images": n_images, "seed": seed}
    out["info"] = info
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, dst)
    return {"images": len(out["images"]), "annotations": len(out["annotations"])}


def num_categories(json_file: str | Path) -> int:
    return len(read_coco_json(json_file)["categories"])


def has_rle_masks(json_file: str | Path) -> bool:
    """True if a non-crowd instance mask is RLE (Detectron2 then needs INPUT.MASK_FORMAT bitmask)."""
    return any(
        isinstance(a.get("segmentation"), dict)
        for a in read_coco_json(json_file)["annotations"]
        if not a.get("iscrowd", 0)
    )


def _categories(json_file: str | Path) -> list[tuple[int, str]]:
    return sorted((c["id"], c["name"]) for c in read_coco_json(json_file)["categories"])


def check_same_categories(train_json: str | Path, val_json: str | Path) -> None:
    """The detector's class indices come from the training json: the val json must agree."""
    if _categories(train_json) != _categories(val_json):
        raise LocoError(
            f"'{train_json}' and '{val_json}' list different categories; a detector trained on "
            "one cannot be scored on the other (use the same categories list in both)"
        )


def register_coco_json(json_file: str | Path, image_root: str | Path, split: str) -> str:
    """Register a COCO instances json + image folder; returns the dataset name."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    json_file, image_root = Path(json_file).resolve(), Path(image_root).resolve()
    read_coco_json(json_file)
    if not image_root.is_dir():
        raise LocoError(f"image folder '{image_root}' not found")
    digest = hashlib.sha1(f"{json_file}|{image_root}".encode()).hexdigest()[:8]
    name = f"loco_{split}_{json_file.stem}_{digest}"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, str(json_file), str(image_root))
        log.info("dataset %s: %s (images %s)", name, json_file, image_root)
    MetadataCatalog.get(name)  # exists either way
    return name


def check_files(names: Sequence[str], split: str) -> None:
    """Every annotation file and image folder the datasets ``names`` read must exist.

    Detectron2 would find out only when its data loader starts, after the model is built,
    with a long traceback; this says in one line where it looked and how to point elsewhere.
    ``split`` (``train`` or ``val``) names the matching ``--<split>-json`` option.
    """
    from detectron2.data import MetadataCatalog

    for name in names:
        meta = MetadataCatalog.get(name)
        wanted = [meta.get("json_file"), meta.get("image_root")]
        missing = [str(Path(p).resolve()) for p in wanted if p and not Path(p).exists()]
        if not missing:
            continue
        root = os.getenv("DETECTRON2_DATASETS")
        where = (
            f"DETECTRON2_DATASETS={root}"
            if root
            else f"DETECTRON2_DATASETS unset, so ./datasets in {Path.cwd()}"
        )
        raise LocoError(
            f"dataset '{name}' reads {' and '.join(missing)}, which "
            f"{'do' if len(missing) > 1 else 'does'} not exist ({where}); set "
            f"DETECTRON2_DATASETS to the folder holding coco/, or pass --{split}-json and "
            f"--{split}-images"
        )


def _datasets_root() -> Path:
    return Path(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")))


def _subset_cache() -> Path:
    from loco.data.shipped import default_cache_dir

    return default_cache_dir() / "coco-subsets"


def ensure_registered(name: str) -> None:
    """Register ``coco_2017_train_<N>[k][_seed<S>]`` on first use; others must exist."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    if name in DatasetCatalog.list():
        return
    match = SUBSET_NAME.match(name)
    if match is None:
        raise LocoError(
            f"dataset '{name}' is not registered: use a Detectron2 builtin name (e.g. "
            "coco_2017_train under $DETECTRON2_DATASETS), coco_2017_train_10k / _1k[_seed<S>], "
            "or pass --train-json/--train-images and --val-json/--val-images"
        )
    n = int(match.group(1)) * (1000 if match.group(2) else 1)
    seed = int(match.group(3) or 0)
    full = _datasets_root() / "coco" / "annotations" / "instances_train2017.json"
    images = _datasets_root() / "coco" / "train2017"
    subset = _subset_cache() / f"instances_train2017_{n}_seed{seed}.json"
    if not subset.is_file():
        if not full.is_file():
            raise LocoError(
                f"'{name}' is built from '{full}', which does not exist; set $DETECTRON2_DATASETS "
                "to the folder holding coco/annotations and coco/train2017"
            )
        stats = subsample_coco(full, subset, n, seed)
        log.info(
            "%s: %d images, %d annotations -> %s",
            name,
            stats["images"],
            stats["annotations"],
            subset,
        )
    base = MetadataCatalog.get("coco_2017_train").as_dict()
    meta = {
        k: v
        for k, v in base.items()
        if k not in ("name", "json_file", "image_root", "evaluator_type")
    }
    register_coco_instances(name, meta, str(subset), str(images))
