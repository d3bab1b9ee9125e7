"""DataLoaders for pretraining (two SimCLR views) and evaluation, with exact mid-epoch resume.

Reproducibility does not depend on worker processes: :class:`EpochSampler` draws, from
``(seed, epoch)`` alone, both the order and one augmentation seed per sample, and
:class:`DatasetView` seeds torch's CPU generator with it around each sample. A run resumed
at step k of an epoch, or run with a different ``num_workers``, sees the same pixels.
Workers ignore the stop signals (:mod:`loco.stop`): the main process decides when to stop.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from loco.config import Config
from loco.data.augment import SimCLRParams, SimCLRTransform, eval_transform
from loco.data.folder import (
    FolderSubset,
    ImageFiles,
    ImageFolderDataset,
    SkipUnreadable,
    UnlabelledImages,
    has_loose_images,
    list_classes,
    subset_per_class,
)
from loco.data.gpu_augment import BatchedSimCLR
from loco.data.jpeg_loader import TensorPipelineLoader
from loco.data.shipped import resolve_data_root
from loco.errors import LocoError
from loco.stop import worker_init


class DatasetView(FolderSubset):
    """An optional fixed subset of an :class:`ImageFolderDataset`.

    A key is an index, or ``(index, seed)`` to draw the sample's random augmentation from
    ``seed``; the caller's RNG state is restored afterwards (workers=0 runs in the trainer).
    """

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        index, seed = key if isinstance(key, tuple) else (key, None)
        index = self.base_index(index)
        if seed is None:
            return self.base[index]
        gen = torch.default_generator  # CPU only: never touches CUDA's generators
        state = gen.get_state()
        gen.manual_seed(seed)
        try:
            return self.base[index]
        finally:
            gen.set_state(state)


class EpochSampler(Sampler):
    """Shuffled, rank-sharded and resumable: yields ``(index, sample_seed)`` keys.

    Each epoch's permutation and seeds come from ``(seed, epoch)``; rank r takes every
    world_size-th position (the tail that does not divide evenly is dropped, so all ranks
    yield the same count). ``set_epoch(epoch, start_index)`` skips the first
    ``start_index`` samples of this rank in O(1) work per skipped sample.
    """

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise LocoError(f"rank {rank} is outside world size {world_size}")
        self.size = size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_samples = size // world_size  # per rank and epoch
        self.epoch = 0
        self.start_index = 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Select the epoch of the next iteration and how many of its samples to skip."""
        if not 0 <= start_index <= self.num_samples:
            raise LocoError(f"start_index {start_index} outside epoch of {self.num_samples}")
        self.epoch = epoch
        self.start_index = start_index

    def keys(self, epoch: int) -> list[tuple[int, int]]:
        """All keys of ``epoch`` for this rank, before skipping."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.size)
        seeds = rng.integers(0, 2**63 - 1, size=self.size, dtype=np.int64)
        mine = order[self.rank : self.num_samples * self.world_size : self.world_size]
        return list(zip(mine.tolist(), seeds[mine].tolist()))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.keys(self.epoch)[self.start_index :])

    def __len__(self) -> int:
        return self.num_samples - self.start_index


def set_loader_epoch(loader: DataLoader | TensorPipelineLoader, epoch: int, step: int = 0) -> None:
    """Make the next ``iter(loader)`` yield ``epoch`` from batch ``step`` on (exact resume)."""
    loader.sampler.set_epoch(epoch, start_index=step * loader.batch_size)


def steps_per_epoch(loader: DataLoader | TensorPipelineLoader) -> int:
    """Full batches per epoch, regardless of a pending resume skip."""
    return loader.sampler.num_samples // loader.batch_size


def resumable_batches(loader: DataLoader | TensorPipelineLoader, start_step: int) -> Iterator[Any]:
    """The loader's batches from global step ``start_step`` on, epoch after epoch, skipping
    what a resumed run already saw (both trainers' loop: one order for any resume point)."""
    epoch, skip = divmod(start_step, steps_per_epoch(loader))
    while True:
        set_loader_epoch(loader, epoch, skip)
        yield from loader
        epoch, skip = epoch + 1, 0


def _pin(cfg: Config) -> bool:
    return cfg.train.device != "cpu" and torch.cuda.is_available()


def build_pretrain_loader(
    cfg: Config, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu"
) -> DataLoader | TensorPipelineLoader:
    """Batches ``(views, labels, bad_paths)``: two [B, 3, H, W] views of the train split.

    B is ``optim.batch_size`` per rank, minus any unreadable images (listed in bad_paths).
    Call :func:`set_loader_epoch` before each epoch. ``data.pipeline=tensor`` gives a
    :class:`TensorPipelineLoader` whose views are made on ``device`` when it is a GPU
    (JPEGs decoded there too) and by the CPU workers otherwise.
    """
    data = cfg.data
    tensor = data.pipeline == "tensor"
    base = pretrain_images(cfg, transform=None if tensor else SimCLRTransform(data))
    indices = subset_per_class(base, data.per_class, cfg.train.seed) if data.per_class else None
    size = len(base) if indices is None else len(indices)
    sampler = EpochSampler(size, seed=cfg.train.seed, rank=rank, world_size=world_size)
    batch = cfg.optim.batch_size
    if sampler.num_samples < batch:
        raise LocoError(
            f"{size} training images over {world_size} rank(s) give {sampler.num_samples} "
            f"per rank, fewer than optim.batch_size={batch}; lower optim.batch_size"
        )
    # seeds `random`/numpy in workers for user transforms; ours use the sample seeds
    generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + rank)
    if tensor:
        augment = BatchedSimCLR(SimCLRParams.from_config(data), num_views=2)
        return TensorPipelineLoader(
            base, indices, sampler, batch, augment, device, data.num_workers, generator
        )
    image_size = data.image_size
    return DataLoader(
        DatasetView(base, indices),
        batch_size=batch,
        sampler=sampler,
        num_workers=data.num_workers,
        collate_fn=SkipUnreadable(base.skipped, (3, image_size, image_size), num_views=2),
        pin_memory=_pin(cfg),
        drop_last=True,
        persistent_workers=data.num_workers > 0,
        generator=generator,
        worker_init_fn=worker_init(),  # workers outlive a stop signal: the step ends, saved
    )


def pretrain_images(cfg: Config, transform: Any = None) -> ImageFiles:
    """The pretraining images: ``data.list``, an unlabelled folder (``data.labels=false`` or
    images directly in the folder), or the labelled ImageFolder train split."""
    data = cfg.data
    if data.list:
        return UnlabelledImages.from_list(data.list, data.root, transform)
    if data.root and (not data.labels or data.dataset == "folder"):
        root = Path(data.root).expanduser()
        folder = root / data.train_split if (root / data.train_split).is_dir() else root
        if folder.is_dir() and (not data.labels or has_loose_images(folder)):
            return UnlabelledImages.from_folder(folder, transform)
    root = resolve_data_root(data, splits=[data.train_split])
    return ImageFolderDataset(root / data.train_split, transform=transform)


def build_eval_loader(
    cfg: Config, split: str, batch_size: int, per_class: int = 0, seed: int = 0
) -> DataLoader:
    """Batches ``(images, labels, bad_paths)`` of ``split`` in folder order, eval transform.

    Class indices follow the train split's class folders when it is present, so the labels
    of every split agree even if one split lacks a class. ``loader.dataset.classes`` names them.
    """
    data = cfg.data
    if data.list or not data.labels:
        raise LocoError(
            "evaluation needs labelled images (<root>/<split>/<class>/<image>) but this config "
            "pretrains on unlabelled data; point it at a labelled tree, e.g. `--data PATH` or "
            "data.dataset=folder data.root=PATH data.labels=true data.list="
        )
    root = resolve_data_root(data, splits=[split])
    train_dir = root / data.train_split
    classes = list_classes(train_dir) if split != data.train_split and train_dir.is_dir() else None
    base = ImageFolderDataset(root / split, transform=eval_transform(data), classes=classes)
    indices = subset_per_class(base, per_class, seed) if per_class else None
    size = data.image_size
    return DataLoader(
        DatasetView(base, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=data.num_workers,
        collate_fn=SkipUnreadable(base.skipped, (3, size, size)),
        pin_memory=_pin(cfg),
        worker_init_fn=worker_init(),
    )
