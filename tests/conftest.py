"""Shared fixtures: real images from the shipped datasets, extracted once per test session;
and the one builder of tiny-run configs (import it: ``from conftest import tiny_cfg``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from loco.config import Config

TINY_CHANNELS = (8, 16, 32, 64)  # a resnet18 that runs a step in well under a second on CPU


def tiny_overrides(
    root: Path | None,
    out: Path | None,
    *extra: str,
    channels: Sequence[int] | None = TINY_CHANNELS,
    decoder: tuple[int, int] = (32, 16),
    image_size: int = 16,
) -> list[str]:
    """``key=value`` overrides for a run that trains in seconds on 2 CPU cores: a folder
    dataset at ``root``, output in ``out`` (either left out when None), a resnet18 of
    ``channels`` (None: the backbone's own widths, for other backbones), a ``decoder``
    of (hidden, out) dims, batch 8, no warmup, no worker processes, a log row per step;
    ``extra`` comes last, so it overrides any of these."""
    over = ["data.dataset=folder"]
    over += [f"data.root={root}"] if root is not None else []
    over += [f"train.output_dir={out}"] if out is not None else []
    over += [f"model.kwargs={{channels: {list(channels)}}}"] if channels is not None else []
    return [
        *over,
        f"data.image_size={image_size}",
        "data.num_workers=0",
        f"decoder.hidden_dim={decoder[0]}",
        f"decoder.out_dim={decoder[1]}",
        "optim.batch_size=8",
        "optim.warmup_epochs=0",
        "train.progress=false",
        "train.log_every=1",
        *extra,
    ]


def metric_rows(run_dir: Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``, in order."""
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def epoch_batches(loader) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """One pass of a pretraining loader: (views, labels) of each batch."""
    return [(views, labels) for views, labels, _ in loader]


def tiny_val_overrides(root: Path, out: Path, *extra: str) -> list[str]:
    """:func:`tiny_overrides` training on 40 real images (4 per class of ``root``'s val split,
    e.g. ``cifar_val_root``), deterministic: for runs that are compared bit for bit."""
    return tiny_overrides(
        root,
        out,
        "data.train_split=val",
        "data.per_class=4",
        "train.deterministic=true",
        *extra,
        decoder=(64, 32),
    )


def tiny_cfg(root: Path, out: Path, *extra: str) -> Config:
    """The validated config of :func:`tiny_val_overrides`."""
    from loco.config import load_config

    return load_config(None, tiny_val_overrides(root, out, *extra))


@pytest.fixture
def one_thread():
    """One intra-op thread for small tensor work: on a busy 2-core machine OpenMP's waiting
    threads made such tests 10-27x slower (measured: Mask R-CNN inference 0.14 s vs 3.7 s per
    image); no result depends on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cifar_val_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root holding ``val/<class>/*.jpg``: the shipped CIFAR-10 test split (10 x 1000, 32 px),
    extracted by :func:`loco.data.prepare_shipped` into a session temp cache."""
    from loco.data.shipped import prepare_shipped

    return prepare_shipped("cifar10", tmp_path_factory.mktemp("loco-cache"), splits=["val"])


@pytest.fixture(scope="session")
def tiny_folder_root(cifar_val_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageFolder root with ``train/`` (4 per class) and ``val/`` (2 per class): symlinks to
    real CIFAR-10 images, 10 classes, 32 px. Small enough for a forward pass in a second."""
    import os

    root = tmp_path_factory.mktemp("tiny-folder")
    src = cifar_val_root / "val"
    for cls in sorted(os.listdir(src)):
        files = sorted(os.listdir(src / cls))
        for split, chosen in (("train", files[:4]), ("val", files[500:502])):
            (root / split / cls).mkdir(parents=True)
            for name in chosen:
                os.symlink(src / cls / name, root / split / cls / name)
    return root


@pytest.fixture(scope="session")
def coco128(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``coco128-seg/`` (COCO images with RLE instance masks) from ``shared/data``, with
    ``annotations/instances_{train,val}2017.json`` and ``images/``; skips where it is absent."""
    import tarfile

    from loco.data.shipped import find_shared_data
    from loco.errors import LocoError

    try:
        archive = find_shared_data() / "coco128-seg" / "coco128-seg.tar"
    except LocoError as exc:
        pytest.skip(str(exc))
    if not archive.is_file():
        pytest.skip(f"{archive} not found")
    out = tmp_path_factory.mktemp("coco128")
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    return out / "coco128-seg"
