"""Pretraining on images without classes: a flat folder, a nested one, a list of paths."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from conftest import metric_rows, tiny_overrides

from loco.config import load_config
from loco.data.loaders import build_eval_loader, build_pretrain_loader, pretrain_images
from loco.errors import LocoError
from loco.train import pretrain

TINY = tiny_overrides(None, None, "optim.max_steps=2", "monitor.knn_every=1")


def _real_images(cifar_val_root: Path, n: int) -> list[Path]:
    src = cifar_val_root / "val"
    return [
        src / cls / name
        for cls in sorted(os.listdir(src))
        for name in sorted(os.listdir(src / cls))[: n // 10]
    ]


@pytest.fixture
def flat_folder(cifar_val_root: Path, tmp_path: Path) -> Path:
    """20 real CIFAR-10 images directly in one folder, no classes."""
    root = tmp_path / "flat"
    root.mkdir()
    for i, path in enumerate(_real_images(cifar_val_root, 20)):
        os.symlink(path, root / f"img{i:03d}.jpg")
    return root


def test_flat_folder_pretrains_with_monitors_off(flat_folder, tmp_path, caplog):
    cfg = load_config(
        None, [f"data.root={flat_folder}", f"train.output_dir={tmp_path / 'run'}", *TINY]
    )
    dataset = pretrain_images(cfg)
    assert len(dataset) == 20 and dataset.classes == []
    with caplog.at_level(logging.INFO, logger="loco.train"):
        run = pretrain(cfg)
    assert "online linear probe and kNN monitor are off" in caplog.text
    rows = metric_rows(run)
    assert [r["step"] for r in rows if "loss/s4" in r] == [1, 2]
    assert not any(k.startswith(("probe/", "monitor/")) for r in rows for k in r)


def test_nested_folder_without_classes_needs_labels_false(cifar_val_root, tmp_path):
    """data.labels=false reads every image below the train split, however nested; the same
    tree read with labels would have taken the first folder level as classes."""
    root = tmp_path / "nested"
    images = _real_images(cifar_val_root, 30)
    for i, path in enumerate(images):
        dest = root / "train" / f"shard{i % 3}" / f"part{i % 2}"
        dest.mkdir(parents=True, exist_ok=True)
        os.symlink(path, dest / f"{i}.jpg")
    base = [f"data.root={root}", *TINY]
    labelled = pretrain_images(load_config(None, base))
    assert labelled.classes == ["shard0", "shard1", "shard2"]
    unlabelled = pretrain_images(load_config(None, [*base, "data.labels=false"]))
    assert unlabelled.classes == [] and len(unlabelled) == 30
    assert set(unlabelled.targets) == {-1}
    assert sorted(unlabelled.path(i) for i in range(30)) == sorted(
        str(p) for p in (root / "train").rglob("*.jpg")
    )


def test_list_file_of_paths(flat_folder, tmp_path):
    names = sorted(os.listdir(flat_folder))[:12]
    listing = tmp_path / "train.txt"
    listing.write_text(
        "# a comment\n"
        + "\n".join(names[:6])
        + "\n\n"
        + "\n".join(str(flat_folder / n) for n in names[6:])
        + "\n"
    )
    cfg = load_config(None, [f"data.list={listing}", f"data.root={flat_folder}", *TINY])
    dataset = pretrain_images(cfg)
    assert [os.path.basename(dataset.path(i)) for i in range(len(dataset))] == names
    views, labels, bad = next(iter(build_pretrain_loader(cfg)))
    assert views[0].shape == (8, 3, 16, 16) and labels.tolist() == [-1] * 8 and bad == []


def test_list_file_errors_are_one_line(tmp_path):
    listing = tmp_path / "train.txt"
    listing.write_text("missing.jpg\n")
    cfg = load_config(None, [f"data.list={listing}", *TINY])
    with pytest.raises(LocoError, match="paths do not exist, e.g. '.*missing.jpg'"):
        pretrain_images(cfg)
    cfg = load_config(None, [f"data.list={tmp_path / 'nope.txt'}", *TINY])
    with pytest.raises(LocoError, match="not found"):
        pretrain_images(cfg)


def test_unlabelled_config_errors_and_eval_needs_labels(flat_folder):
    base = ["data.dataset=folder", f"data.root={flat_folder}", "data.labels=false"]
    with pytest.raises(LocoError, match="per_class needs class labels"):
        load_config(None, [*base, "data.per_class=4"])
    with pytest.raises(LocoError, match="supervised=true needs class labels"):
        load_config(None, [*base, "method.name=infopro", "method.supervised=true"])
    with pytest.raises(LocoError, match="evaluation needs labelled images"):
        build_eval_loader(load_config(None, base), "val", 8)
