"""loco.data on real images: shipped extraction, odd PIL modes, bad files, transforms, loaders."""

from __future__ import annotations

import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import epoch_batches
from PIL import Image

from loco.cli import main
from loco.config import Config, DataConfig
from loco.data import shipped
from loco.data.augment import SimCLRParams, SimCLRTransform, eval_resize_size, eval_transform
from loco.data.folder import ImageFolderDataset, SkippedImages, subset_per_class
from loco.data.loaders import (
    EpochSampler,
    build_eval_loader,
    build_pretrain_loader,
    set_loader_epoch,
    steps_per_epoch,
)
from loco.errors import LocoError

# ---------------------------------------------------------------- helpers / fixtures


def copy_tree(src_split: Path, dst_split: Path, per_class: int, classes: list[str] | None = None):
    """Copy the first ``per_class`` real images of each class."""
    for cls_dir in sorted(p for p in src_split.iterdir() if p.is_dir()):
        if classes is not None and cls_dir.name not in classes:
            continue
        (dst_split / cls_dir.name).mkdir(parents=True)
        for img in sorted(cls_dir.iterdir())[:per_class]:
            shutil.copy(img, dst_split / cls_dir.name / img.name)
    return dst_split


@pytest.fixture
def tiny_root(tmp_path: Path, cifar_val_root: Path) -> Path:
    """train/ (10 classes x 8) and val/ (3 classes x 4) of real CIFAR images."""
    copy_tree(cifar_val_root / "val", tmp_path / "train", 8)
    copy_tree(cifar_val_root / "val", tmp_path / "val", 4, classes=["bird", "cat", "truck"])
    return tmp_path


@pytest.fixture
def fake_shared(tmp_path: Path, cifar_val_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A shared/data folder whose cifar10 tars hold 2 classes x 3 real images per split."""
    src = cifar_val_root / "val"
    shared = tmp_path / "shared" / "data"
    (shared / "cifar10").mkdir(parents=True)
    for split in ("train", "val"):
        with tarfile.open(shared / "cifar10" / f"{split}.tar.gz", "w:gz") as tar:
            for cls in ("cat", "dog"):
                for img in sorted((src / cls).iterdir())[:3]:
                    tar.add(img, arcname=f"{split}/{cls}/{img.name}")
    monkeypatch.setenv("LOCO_SHARED_DATA", str(shared))
    return shared


@pytest.fixture(scope="module")
def clothing_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real 400 px clothing photo, read straight from the shipped tar."""
    dest = tmp_path_factory.mktemp("clothing") / "photo.jpg"
    with tarfile.open(shipped.find_shared_data() / "clothing" / "clothing-small.tar") as tar:
        for member in tar:
            if member.name.endswith(".jpg"):
                dest.write_bytes(tar.extractfile(member).read())
                return dest
    raise AssertionError("no jpg in clothing-small.tar")


def folder_cfg(root: Path, **data: object) -> Config:
    cfg = Config()
    cfg.data.dataset = "folder"
    cfg.data.root = str(root)
    cfg.data.num_workers = 0
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


# ---------------------------------------------------------------- shipped data


def test_shipped_cifar_val_extracted_once(cifar_val_root: Path, monkeypatch, caplog) -> None:
    val = cifar_val_root / "val"
    assert sorted(p.name for p in val.iterdir())[:3] == ["airplane", "automobile", "bird"]
    assert len(list((val / "cat").glob("*.jpg"))) == 1000
    assert (cifar_val_root / ".complete-val.tar.gz.json").is_file()
    assert not list(cifar_val_root.glob(".extract-*"))

    def no_open(*args, **kwargs):
        raise AssertionError("extracted again")

    monkeypatch.setattr(tarfile, "open", no_open)
    with caplog.at_level(logging.INFO):
        again = shipped.prepare_shipped("cifar10", cifar_val_root.parent, splits=["val"])
    assert again == cifar_val_root
    assert "extracting" not in caplog.text


def test_interrupted_extraction_is_redone(fake_shared: Path, tmp_path: Path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    real_extractall = tarfile.TarFile.extractall

    def interrupted(self, path, *args, **kwargs):
        real_extractall(self, path, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(tarfile.TarFile, "extractall", interrupted)
    with pytest.raises(KeyboardInterrupt):
        shipped.prepare_shipped("cifar10", cache, splits=["val"])
    dest = cache / "cifar10"
    assert not (dest / "val").exists() and not list(dest.glob(".complete-*"))
    (dest / ".extract-killed").mkdir()  # what a SIGKILLed extraction leaves behind

    monkeypatch.setattr(tarfile.TarFile, "extractall", real_extractall)
    with caplog.at_level(logging.INFO, logger="loco.data.shipped"):
        root = shipped.prepare_shipped("cifar10", cache, splits=["val"])
    assert "extracting cifar10 val" in caplog.text and str(dest) in caplog.text
    assert root == dest
    assert sorted(p.name for p in (root / "val" / "dog").iterdir()) == [
        "0000.jpg",
        "0001.jpg",
        "0002.jpg",
    ]
    assert not (dest / "train").exists()  # only the asked-for split
    assert not list(dest.glob(".extract-*"))

    shutil.rmtree(root / "val")  # a deleted split is restored, not trusted to the marker
    shipped.prepare_shipped("cifar10", cache, splits=["val"])
    assert len(list((root / "val" / "cat").iterdir())) == 3


def test_shared_data_not_found(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LOCO_SHARED_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(LocoError, match="LOCO_SHARED_DATA"):
        shipped.prepare_shipped("cifar10", tmp_path / "cache")
    monkeypatch.delenv("LOCO_SHARED_DATA")
    monkeypatch.setattr(shipped, "_PACKAGE_ROOT", tmp_path / "repo")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LocoError, match=r"set \$LOCO_SHARED_DATA"):
        shipped.prepare_shipped("clothing", tmp_path / "cache")


def test_shipped_name_and_split_checked(tmp_path: Path) -> None:
    with pytest.raises(LocoError, match="cifar10, clothing"):
        shipped.prepare_shipped("imagenet", tmp_path)
    with pytest.raises(LocoError, match="not 'test'"):
        shipped.prepare_shipped("cifar10", tmp_path, splits=["test"])


def test_resolve_data_root(tiny_root: Path, tmp_path: Path) -> None:
    cfg = DataConfig(dataset="folder", root=str(tiny_root))
    assert shipped.resolve_data_root(cfg) == tiny_root
    missing = DataConfig(dataset="folder", root=str(tmp_path / "nope"))
    with pytest.raises(LocoError, match="nope"):
        shipped.resolve_data_root(missing)
    no_split = DataConfig(dataset="folder", root=str(tiny_root), val_split="test")
    with pytest.raises(LocoError, match=str(tiny_root / "test")):
        shipped.resolve_data_root(no_split)


def test_cli_prepare(fake_shared: Path, tmp_path: Path, capsys) -> None:
    assert main(["data", "prepare", "cifar10", "--cache-dir", str(tmp_path / "c")]) == 0
    assert str(tmp_path / "c" / "cifar10") in capsys.readouterr().out
    assert (tmp_path / "c" / "cifar10" / "train" / "cat" / "0002.jpg").is_file()


# ---------------------------------------------------------------- ImageFolderDataset


def _save(img: Image.Image, path: Path, **kwargs: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)


def test_any_mode_becomes_rgb(tmp_path: Path, cifar_val_root: Path) -> None:
    d = tmp_path / "a"
    size = (8, 6)
    expected: dict[str, tuple[int, int, int]] = {}

    _save(Image.new("L", size, 100), d / "gray.png")
    expected["gray.png"] = (100, 100, 100)
    _save(Image.new("1", size, 1), d / "bitmap.bmp")
    expected["bitmap.bmp"] = (255, 255, 255)
    pal = Image.new("P", size, 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    _save(pal, d / "palette.gif")
    expected["palette.gif"] = (10, 200, 30)
    _save(pal, d / "palette_transparent.png", transparency=1)
    expected["palette_transparent.png"] = (255, 255, 255)  # over white
    _save(Image.new("RGBA", size, (200, 0, 0, 0)), d / "clear.png")
    expected["clear.png"] = (255, 255, 255)
    _save(Image.new("RGBA", size, (200, 0, 0, 255)), d / "opaque.WEBP", lossless=True)
    expected["opaque.WEBP"] = (200, 0, 0)
    _save(Image.new("LA", size, (50, 255)), d / "gray_alpha.png")
    expected["gray_alpha.png"] = (50, 50, 50)
    _save(Image.new("CMYK", size, (0, 0, 0, 0)), d / "cmyk.JPEG", quality=100)
    expected["cmyk.JPEG"] = (255, 255, 255)
    wide = Image.fromarray(np.full(size[::-1], 65535, dtype=np.uint16))
    _save(wide, d / "sixteen.png")
    expected["sixteen.png"] = (255, 255, 255)  # scaled, not clipped
    half = Image.fromarray(np.full(size[::-1], 32896, dtype=np.uint16))
    _save(half, d / "sixteen_half.tif")
    expected["sixteen_half.tif"] = (128, 128, 128)
    _save(Image.fromarray(np.full(size[::-1], 0.5, dtype=np.float32)), d / "float.tiff")
    expected["float.tiff"] = (128, 128, 128)
    _save(Image.new("RGB", size, (1, 2, 3)), d / "plain.ppm")
    expected["plain.ppm"] = (1, 2, 3)
    shutil.copy(cifar_val_root / "val" / "cat" / "0000.jpg", d / "real.jpg")
    (d / "notes.txt").write_text("not an image")
    (d / "._real.jpg").write_bytes(b"macOS metadata")  # hidden: ignored

    ds = ImageFolderDataset(tmp_path)
    names = [Path(p).name for p, _ in ds.samples]
    assert names == sorted([*expected, "real.jpg"])
    for i, name in enumerate(names):
        img, target = ds[i]
        assert img.mode == "RGB" and target == 0
        if name in expected:
            assert img.size == size
            assert img.getpixel((3, 3)) == pytest.approx(expected[name], abs=1), name
        else:
            assert img.size == (32, 32)


def test_corrupt_images_skipped_and_reported(tmp_path: Path, cifar_val_root: Path) -> None:
    src = cifar_val_root / "val" / "dog"
    good = tmp_path / "val" / "dog"
    copy_tree(cifar_val_root / "val", tmp_path / "val", 5, classes=["dog", "frog"])
    jpeg = (src / "0100.jpg").read_bytes()
    (good / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (good / "garbage.png").write_bytes(b"\x89PNG not really")
    (good / "empty.jpg").write_bytes(b"")
    bad = sorted(str(good / n) for n in ("truncated.jpg", "garbage.png", "empty.jpg"))

    ds = ImageFolderDataset(tmp_path / "val")
    assert len(ds) == 13
    results = [ds[i] for i in range(len(ds))]
    assert sum(r is None for r in results) == 3
    assert sorted(ds.skipped.drain()) == bad

    for workers in (0, 2):  # paths come back from worker processes too
        cfg = folder_cfg(tmp_path, num_workers=workers, train_split="val")
        seen = SkippedImages()
        labels = []
        for images, y, paths in build_eval_loader(cfg, "val", batch_size=4):
            assert images.shape == (len(y), 3, 32, 32)
            labels += y.tolist()
            seen.add(paths)
        assert labels == [0] * 5 + [1] * 5
        assert sorted(seen.paths) == bad
        assert seen.summary().startswith("skipped 3 unreadable images (first: ")


def test_batch_of_only_bad_images_is_empty(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / "val" / "x").mkdir(parents=True, exist_ok=True)
        (tmp_path / "val" / "x" / f"{i}.jpg").write_bytes(b"no")
    images, labels, paths = next(iter(build_eval_loader(folder_cfg(tmp_path), "val", 8)))
    assert images.shape == (0, 3, 32, 32) and labels.numel() == 0 and len(paths) == 3


def test_empty_class_folders_warned(tiny_root: Path, caplog) -> None:
    split = tiny_root / "val"
    (split / "empty").mkdir()
    (split / "text_only").mkdir()
    (split / "text_only" / "readme.txt").write_text("x")
    with caplog.at_level(logging.WARNING, logger="loco.data.folder"):
        ds = ImageFolderDataset(split)
    assert "2 of 5 class folders hold no images: empty, text_only" in caplog.text
    assert ds.classes == ["bird", "cat", "empty", "text_only", "truck"]
    assert ds.targets == [0] * 4 + [1] * 4 + [4] * 4


def test_missing_or_empty_dataset_dir(tmp_path: Path) -> None:
    with pytest.raises(LocoError, match=str(tmp_path / "missing")):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "split" / "cls").mkdir(parents=True)
    with pytest.raises(LocoError, match="holds no images"):
        ImageFolderDataset(tmp_path / "split")


def test_classes_from_train_split(tiny_root: Path) -> None:
    train = ImageFolderDataset(tiny_root / "train")
    val = ImageFolderDataset(tiny_root / "val", classes=train.classes)
    assert val.targets == [2] * 4 + [3] * 4 + [9] * 4
    with pytest.raises(LocoError, match="bird, cat, truck"):
        ImageFolderDataset(tiny_root / "val", classes=["dog"])


def test_subset_per_class_balanced_and_seeded(tiny_root: Path, caplog) -> None:
    ds = ImageFolderDataset(tiny_root / "train")
    a = subset_per_class(ds, 3, seed=0)
    assert np.bincount(np.asarray(ds.targets)[a]).tolist() == [3] * 10
    assert a == sorted(a) and a == subset_per_class(ds, 3, seed=0)
    assert a != subset_per_class(ds, 3, seed=1)
    with caplog.at_level(logging.WARNING):
        assert subset_per_class(ds, 50, seed=0) == list(range(80))
    assert "fewer than 50" in caplog.text


# ---------------------------------------------------------------- transforms


def test_simclr_views(cifar_val_root: Path) -> None:
    cfg = DataConfig()
    img = Image.open(cifar_val_root / "val" / "ship" / "0000.jpg")
    views = SimCLRTransform(cfg)(img)
    assert len(views) == 2
    assert all(v.shape == (3, 32, 32) and v.dtype == torch.float32 for v in views)
    assert not torch.equal(views[0], views[1])


def test_simclr_normalisation_and_solarize() -> None:
    gray = Image.new("RGB", (40, 40), (200, 200, 200))
    cfg = DataConfig(image_size=16, crop_scale_min=1.0, color_jitter_prob=0.0, grayscale_prob=0.0)
    view = SimCLRTransform(cfg, num_views=1)(gray)[0]
    mean, std = torch.tensor(cfg.mean)[:, None, None], torch.tensor(cfg.std)[:, None, None]
    torch.testing.assert_close(view, ((200 / 255 - mean) / std).expand(3, 16, 16))
    cfg.blur_prob = cfg.solarize_prob = 1.0
    view = SimCLRTransform(cfg, num_views=1)(gray)[0]  # blur keeps a flat image, 200 -> 55
    torch.testing.assert_close(view, ((55 / 255 - mean) / std).expand(3, 16, 16))


def test_simclr_params() -> None:
    p = SimCLRParams.from_config(DataConfig(image_size=224, color_jitter_strength=0.5))
    assert p.blur_kernel == 23 and p.crop_scale == (0.08, 1.0)
    assert (p.brightness, p.hue) == pytest.approx((0.2, 0.05))
    assert SimCLRParams.from_config(DataConfig()).blur_kernel == 3


def test_eval_transform_deterministic(clothing_jpeg: Path) -> None:
    assert (eval_resize_size(224), eval_resize_size(64), eval_resize_size(32)) == (256, 73, 32)
    img = Image.open(clothing_jpeg).convert("RGB")
    assert min(img.size) >= 300
    tf = eval_transform(DataConfig(image_size=64))
    a, b = tf(img), tf(img)
    assert a.shape == (3, 64, 64) and torch.equal(a, b)


# ---------------------------------------------------------------- loaders


def test_pretrain_loader_resume_is_exact(tiny_root: Path) -> None:
    cfg = folder_cfg(tiny_root)
    cfg.optim.batch_size = 16
    loader = build_pretrain_loader(cfg)
    set_loader_epoch(loader, 1)
    rng_state = torch.get_rng_state()
    full = epoch_batches(loader)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the trainer's RNG is untouched
    assert len(full) == 5 == steps_per_epoch(loader)
    views, labels = full[0]
    assert len(views) == 2 and views[0].shape == (16, 3, 32, 32) and labels.shape == (16,)
    assert not torch.equal(views[0], views[1])
    all_labels = torch.cat([y for _, y in full])
    assert torch.bincount(all_labels).tolist() == [8] * 10  # every image once

    torch.rand(100)  # a resumed trainer's RNG is elsewhere: the pixels must not care
    resumed = build_pretrain_loader(cfg)
    set_loader_epoch(resumed, 1, step=2)
    assert len(resumed) == 3
    tail = epoch_batches(resumed)
    assert len(tail) == 3
    for (va, ya), (vb, yb) in zip(full[2:], tail):
        assert torch.equal(ya, yb) and all(torch.equal(x, z) for x, z in zip(va, vb))

    set_loader_epoch(resumed, 2)
    next_epoch = epoch_batches(resumed)
    assert len(next_epoch) == 5
    assert not torch.equal(next_epoch[0][0][0], full[0][0][0])


def test_pretrain_loader_same_with_workers_and_subset(tiny_root: Path) -> None:
    cfg = folder_cfg(tiny_root, per_class=4)
    cfg.optim.batch_size = 8
    serial = build_pretrain_loader(cfg)
    set_loader_epoch(serial, 0)
    cfg.data.num_workers = 2
    parallel = build_pretrain_loader(cfg)
    set_loader_epoch(parallel, 0)
    a, b = epoch_batches(serial), epoch_batches(parallel)
    assert len(a) == len(b) == 5
    for (va, ya), (vb, yb) in zip(a, b):
        assert torch.equal(ya, yb) and torch.equal(va[0], vb[0]) and torch.equal(va[1], vb[1])
    assert torch.bincount(torch.cat([y for _, y in a])).tolist() == [4] * 10


def test_pretrain_loader_batch_too_large(tiny_root: Path) -> None:
    cfg = folder_cfg(tiny_root)
    cfg.optim.batch_size = 81
    with pytest.raises(LocoError, match="optim.batch_size=81"):
        build_pretrain_loader(cfg)


def test_epoch_sampler_shards_ranks() -> None:
    shards = [EpochSampler(10, seed=3, rank=r, world_size=3) for r in range(3)]
    indices = [[i for i, _ in s] for s in shards]
    assert [len(x) for x in indices] == [3, 3, 3]
    flat = sum(indices, [])
    assert len(set(flat)) == 9 and set(flat) <= set(range(10))
    seeds = {seed for s in shards for _, seed in s}
    assert len(seeds) == 9
    shards[0].set_epoch(1)
    assert [i for i, _ in shards[0]] != indices[0]


def test_eval_loader_order_and_labels(tiny_root: Path) -> None:
    cfg = folder_cfg(tiny_root)
    loader = build_eval_loader(cfg, "val", batch_size=5)
    images, labels = [], []
    for x, y, bad in loader:
        assert bad == []
        images.append(x)
        labels += y.tolist()
    assert labels == [2] * 4 + [3] * 4 + [9] * 4  # class indices of the train split
    assert loader.dataset.classes[9] == "truck"
    again = torch.cat([x for x, _, _ in loader])
    assert torch.equal(torch.cat(images), again)
    sub = build_eval_loader(cfg, "train", batch_size=100, per_class=2, seed=5)
    (_, y, _) = next(iter(sub))
    assert torch.bincount(y).tolist() == [2] * 10


# ---------------------------------------------------------------- loco data check


def test_cli_check(tiny_root: Path, capsys) -> None:
    assert main(["data", "check", str(tiny_root / "val")]) == 0
    out = capsys.readouterr().out
    assert "3 classes, 12 images" in out and "all images decode" in out
    (tiny_root / "val" / "cat" / "broken.jpg").write_bytes(b"xx")
    (tiny_root / "train" / "empty_class").mkdir()
    assert main(["data", "check", str(tiny_root)]) == 1
    out = capsys.readouterr().out
    assert "11 classes, 80 images" in out and "empty class folders (1): empty_class" in out
    assert "unreadable images (1)" in out and "broken.jpg" in out
