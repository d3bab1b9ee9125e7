"""ImageFolder trees (``<root>/<class>/**/<image>``) that survive real-world data.

Any mode PIL reads becomes RGB, and an unreadable file costs one sample rather than the run:
``__getitem__`` returns None for it, :class:`SkipUnreadable` drops it from the batch and hands
its path to the main process, which sums them up in a :class:`SkippedImages`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from loco.errors import LocoError

log = logging.getLogger(__name__)

IMG_EXTENSIONS = frozenset(
    (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")
)
_ALPHA_MODES = frozenset(("RGBA", "RGBa", "LA", "La", "PA"))
_WIDE_MODES = frozenset(("I", "I;16", "I;16L", "I;16B", "I;16N", "F"))


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMG_EXTENSIONS


def list_classes(split_dir: Path) -> list[str]:
    """Sorted class folder names (hidden folders skipped)."""
    return sorted(
        e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")
    )


def _images_under(folder: Path) -> list[str]:
    """Image paths below ``folder``, relative to it, in a deterministic (sorted) order."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, folder)
        found.extend(
            name if rel == "." else os.path.join(rel, name)
            for name in sorted(filenames)
            if is_image_file(name)
        )
    return found


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Alpha is composited over white (what the image looks like in a
    viewer, not the arbitrary colour under transparent pixels); 16-bit and float images are
    scaled to 8 bits instead of being clipped to white."""
    if im.mode in _WIDE_MODES:
        arr = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or (im.mode == "I" and arr.max() > 255):
            arr = arr / 257.0
        elif im.mode == "F" and arr.max() <= 1.0:
            arr = arr * 255.0
        im = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Decode ``path`` fully (so truncation raises here, not in a transform) as RGB."""
    with Image.open(path) as im:
        return to_rgb(im)


class SkippedImages:
    """Unreadable images seen so far: a unique count and the first few paths."""

    def __init__(self, keep: int = 3) -> None:
        self.keep = keep
        self.paths: set[str] = set()
        self.first: list[str] = []
        self._pending: list[str] = []

    def record(self, path: str) -> None:
        """Called where the image failed to load (a worker); see :meth:`drain`."""
        self._pending.append(path)

    def drain(self) -> list[str]:
        """Paths recorded since the last drain (the collate of the current batch)."""
        pending, self._pending = self._pending, []
        return pending

    def add(self, paths: Iterable[str]) -> int:
        """Accumulate the ``bad_paths`` of a batch; returns how many were new."""
        new = 0
        for p in paths:
            if p not in self.paths:
                self.paths.add(p)
                new += 1
                if len(self.first) < self.keep:
                    self.first.append(p)
        return new

    def __len__(self) -> int:
        return len(self.paths)

    def summary(self) -> str:
        return f"skipped {len(self)} unreadable images (first: {', '.join(self.first)})"


class ImageFiles(Dataset):
    """A fixed list of image files with integer targets (-1: no label).

    Items are ``(transform(rgb_image), target)``, or None for an unreadable file. Paths
    and targets are kept in numpy arrays, not Python lists, so DataLoader workers reading
    them do not turn fork's shared pages into private copies (ImageNet: 1.3M paths).
    """

    classes: list[str]

    def __init__(
        self, root: Path, paths: Sequence[str], targets: Sequence[int], transform: Any = None
    ) -> None:
        self.root = root
        self.transform = transform
        self._paths = np.array([os.fsencode(p) for p in paths])
        self._targets = np.array(targets, dtype=np.int64)
        self.skipped = SkippedImages()

    def __len__(self) -> int:
        return len(self._targets)

    def path(self, index: int) -> str:
        return os.path.join(self.root, os.fsdecode(self._paths[index]))

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    @property
    def targets(self) -> list[int]:
        return self._targets.tolist()

    @property
    def samples(self) -> list[tuple[str, int]]:
        return [(self.path(i), t) for i, t in enumerate(self.targets)]

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        path = self.path(index)
        try:
            image = load_rgb(path)
        except Exception as exc:  # any decoder error: skip the file, keep the run
            log.debug("unreadable image %s: %s", path, exc)
            self.skipped.record(path)
            return None
        target = int(self._targets[index])
        return (self.transform(image) if self.transform is not None else image), target


class ImageFolderDataset(ImageFiles):
    """``root/<class>/**/<image>`` with classes in sorted order (or as given by ``classes``)."""

    def __init__(
        self, root: str | Path, transform: Any = None, classes: Sequence[str] | None = None
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise LocoError(f"image folder '{root}' not found; expected {root}/<class>/<image>")
        found = list_classes(root)
        if classes is None:
            classes = found
        else:
            extra = sorted(set(found) - set(classes))
            if extra:
                raise LocoError(
                    f"'{root}' has class folders missing from the training split: "
                    f"{', '.join(extra[:10])}; give both splits the same classes"
                )
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        paths: list[str] = []
        targets: list[int] = []
        empty: list[str] = []
        for idx, cls in enumerate(self.classes):
            files = _images_under(root / cls) if (root / cls).is_dir() else []
            if not files:
                empty.append(cls)
            paths.extend(os.path.join(cls, f) for f in files)
            targets.extend([idx] * len(files))
        if not paths:
            raise LocoError(
                f"'{root}' holds no images in class folders; expected "
                f"{root}/<class>/<image> with extensions {', '.join(sorted(IMG_EXTENSIONS))}"
                " (for images without classes set data.labels=false)"
            )
        if empty:
            shown = ", ".join(empty[:20]) + (", ..." if len(empty) > 20 else "")
            log.warning(
                "%s: %d of %d class folders hold no images: %s",
                root,
                len(empty),
                len(self.classes),
                shown,
            )
        self.empty_classes = empty
        super().__init__(root, paths, targets, transform)


class UnlabelledImages(ImageFiles):
    """Images without classes: every image under a folder (flat or nested in any way), or
    the paths listed in a text file. Targets are -1; there are no classes."""

    classes: list[str] = []
    empty_classes: list[str] = []

    @classmethod
    def from_folder(cls, root: str | Path, transform: Any = None) -> UnlabelledImages:
        root = Path(root)
        if not root.is_dir():
            raise LocoError(f"image folder '{root}' not found; set data.root=PATH")
        paths = _images_under(root)
        if not paths:
            raise LocoError(
                f"'{root}' holds no images (extensions {', '.join(sorted(IMG_EXTENSIONS))})"
            )
        return cls(root, paths, [-1] * len(paths), transform)

    @classmethod
    def from_list(
        cls, list_file: str | Path, root: str | Path = "", transform: Any = None
    ) -> UnlabelledImages:
        """One image path per line (blank lines and ``#`` comments skipped); relative paths
        are relative to ``root`` if given, else to the list file's folder."""
        list_file = Path(list_file)
        if not list_file.is_file():
            raise LocoError(f"data.list file '{list_file}' not found; give a text file of paths")
        base = Path(root) if root else list_file.parent
        lines = [ln.strip() for ln in list_file.read_text().splitlines()]
        paths = [ln for ln in lines if ln and not ln.startswith("#")]
        if not paths:
            raise LocoError(f"data.list file '{list_file}' names no images")
        missing = [p for p in paths[:1000] if not (base / p).is_file()]
        if missing:
            raise LocoError(
                f"data.list '{list_file}': {len(missing)} of the first {min(len(paths), 1000)} "
                f"paths do not exist, e.g. '{base / missing[0]}'; relative paths are read "
                f"from {base} (set data.root to change that)"
            )
        return cls(base, paths, [-1] * len(paths), transform)


def has_loose_images(folder: Path) -> bool:
    """True if image files lie directly in ``folder`` (a flat, unlabelled layout)."""
    return any(e.is_file() and is_image_file(e.name) for e in os.scandir(folder))


class FolderSubset(Dataset):
    """An optional fixed subset (``indices``) of an :class:`ImageFolderDataset`; subclasses
    decide what an item is."""

    def __init__(self, base: ImageFiles, indices: Sequence[int] | None = None) -> None:
        self.base = base
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.base) if self.indices is None else len(self.indices)

    @property
    def classes(self) -> list[str]:
        return self.base.classes

    @property
    def targets(self) -> list[int]:
        targets = np.asarray(self.base.targets)
        return (targets if self.indices is None else targets[self.indices]).tolist()

    def base_index(self, index: int) -> int:
        return index if self.indices is None else int(self.indices[index])


class SkipUnreadable:
    """Collate: drop None items and return ``(x, labels, bad_paths)``.

    It runs in the worker that loaded the batch and drains that worker's copy of the
    dataset's :class:`SkippedImages`, so the paths reach the main process with the batch.
    A batch with no readable image yields empty tensors (``labels.numel() == 0``).
    """

    def __init__(
        self, skipped: SkippedImages, image_shape: tuple[int, int, int], num_views: int = 0
    ) -> None:
        self.skipped = skipped
        self.image_shape = image_shape
        self.num_views = num_views

    def __call__(self, batch: list[Any]) -> tuple[Any, torch.Tensor, list[str]]:
        bad = self.skipped.drain()
        items = [b for b in batch if b is not None]
        if items:
            x, y = default_collate(items)
            return x, y, bad
        empty = torch.empty((0, *self.image_shape))
        x = [empty.clone() for _ in range(self.num_views)] if self.num_views else empty
        return x, torch.empty(0, dtype=torch.long), bad


def subset_per_class(dataset: Any, n: int, seed: int) -> list[int]:
    """Indices of ``n`` images per class (all of a smaller class), chosen with ``seed``;
    sorted, so the subset reads in folder order. ``n <= 0`` means every image."""
    targets = np.asarray(dataset.targets)
    if n <= 0:
        return list(range(len(targets)))
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    short: list[int] = []
    order = np.argsort(targets, kind="stable")
    classes, starts = np.unique(targets[order], return_index=True)
    for cls, idx in zip(classes, np.split(order, starts[1:])):
        if len(idx) < n:
            short.append(int(cls))
        chosen.append(rng.permutation(idx)[:n])
    if short:
        log.warning("%d classes have fewer than %d images; taking all of theirs", len(short), n)
    return np.sort(np.concatenate(chosen)).tolist()
