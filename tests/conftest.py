"""Shared fixtures: real images from the shipped datasets, extracted once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


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
