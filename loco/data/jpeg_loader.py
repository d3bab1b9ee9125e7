"""The tensor pipeline (``data.pipeline=tensor``): JPEG bytes in, batched SimCLR views out.

Workers read files. With a CUDA device they hand the raw JPEG bytes to the main process,
which decodes the whole batch with nvjpeg (``decode_jpeg(list, device="cuda")``) and
augments it there with :class:`BatchedSimCLR`; on the CPU the workers decode
(``decode_jpeg``, libjpeg-turbo, the same pixels as PIL) and augment their own batch.
Files that are not JPEG go through PIL (:func:`load_rgb`, any mode to RGB); unreadable
ones are dropped and reported in the batch's ``bad_paths`` as with :class:`SkipUnreadable`.
Batches are ``(views, labels, bad_paths)`` as from the PIL loader.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_jpeg

from loco.data.folder import FolderSubset, ImageFolderDataset, SkippedImages, load_rgb
from loco.data.gpu_augment import BatchedSimCLR
from loco.stop import worker_init

log = logging.getLogger(__name__)
# torchvision 0.29 warns on every decode that its decoders will move to TorchCodec
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities", category=DeprecationWarning
)

JPEG_MAGIC = b"\xff\xd8\xff"


def is_jpeg(data: torch.Tensor) -> bool:
    return data.numel() > 3 and bytes(data[:3].tolist()) == JPEG_MAGIC


def read_bytes(path: str) -> torch.Tensor:
    """The file as a uint8 tensor in ordinary memory. (``torchvision.io.read_file`` maps the
    file instead, and such a tensor cannot be sent from a worker to the main process.)"""
    with open(path, "rb") as fh:
        return torch.frombuffer(bytearray(fh.read()), dtype=torch.uint8)


def pil_to_tensor(image: Any) -> torch.Tensor:
    """RGB PIL image -> uint8 [3, H, W]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def decode_pil(data: torch.Tensor) -> torch.Tensor:
    """Any format PIL reads (encoded bytes as uint8) -> RGB uint8 [3, H, W]."""
    return pil_to_tensor(load_rgb(io.BytesIO(data.numpy().tobytes())))


class Item(NamedTuple):
    image: torch.Tensor  # uint8: [3, H, W] decoded, or the file's bytes when `encoded`
    encoded: bool
    target: int
    seed: int
    path: str


class EncodedImages(FolderSubset):
    """Items of an :class:`ImageFolderDataset` (optionally a subset) as :class:`Item`.

    Keys are ``(index, seed)`` from :class:`EpochSampler` (a bare index is its own seed).
    With ``decode=False`` JPEG files stay encoded for a batched decode on the device.
    """

    def __init__(
        self,
        base: ImageFolderDataset,
        indices: Sequence[int] | None = None,
        decode: bool = True,
    ) -> None:
        super().__init__(base, indices)
        self.decode = decode

    def __getitem__(self, key: int | tuple[int, int]) -> Item | None:
        index, seed = key if isinstance(key, tuple) else (key, key)
        index = self.base_index(index)
        path = self.base.path(index)
        target = int(self.base._targets[index])
        try:
            data = read_bytes(path)
            if is_jpeg(data):
                if not self.decode:
                    return Item(data, True, target, seed, path)
                try:
                    image = decode_jpeg(data, mode=ImageReadMode.RGB)
                except RuntimeError:  # e.g. an unusual JPEG variant: PIL may still read it
                    image = decode_pil(data)
            else:
                image = decode_pil(data)
        except Exception as exc:  # any reader or decoder error: skip the file, keep the run
            log.debug("unreadable image %s: %s", path, exc)
            self.base.skipped.record(path)
            return None
        return Item(image, False, target, seed, path)


class RawBatch(NamedTuple):
    items: list[Item]
    bad: list[str]


class CollateItems:
    """Collate in the worker: drop unreadable items, drain their paths, and (``augment``
    given) make the views there, returning ``(views, labels, bad_paths)``."""

    def __init__(self, skipped: SkippedImages, augment: BatchedSimCLR | None = None) -> None:
        self.skipped = skipped
        self.augment = augment

    def __call__(self, batch: list[Item | None]) -> RawBatch | tuple:
        raw = RawBatch([b for b in batch if b is not None], self.skipped.drain())
        return raw if self.augment is None else finish_batch(raw, self.augment)


def decode_on_device(items: Sequence[Item], device: torch.device) -> tuple[list, list[str]]:
    """Decode the encoded items as one batch on ``device``; returns (kept items, bad paths).

    A batch the decoder rejects is retried image by image, then with PIL on the CPU.
    """
    encoded = [k for k, it in enumerate(items) if it.encoded]
    images: list[torch.Tensor | None] = [
        None if it.encoded else it.image.to(device, non_blocking=True) for it in items
    ]
    if encoded:
        data = [items[k].image for k in encoded]
        if device.type == "cuda":
            # torchvision's nvJPEG decoder writes on its own stream without waiting for ours,
            # into blocks the allocator may have just freed while our queued kernels still
            # read them (pytorch/vision PR #9606): let those kernels finish first
            torch.cuda.current_stream(device).synchronize()
        try:
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError as exc:
            log.debug("batched decode on %s failed (%s); decoding one by one", device, exc)
            decoded = [_decode_one(d, device) for d in data]
        for k, image in zip(encoded, decoded):
            images[k] = image
    kept, bad = [], []
    for item, image in zip(items, images):
        if image is None:
            bad.append(item.path)
        else:
            kept.append(item._replace(image=image, encoded=False))
    return kept, bad


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    try:
        return decode_pil(data).to(device)
    except Exception:
        return None


def finish_batch(raw: RawBatch, augment: BatchedSimCLR) -> tuple[list[torch.Tensor], Any, list]:
    """Decoded items -> ``(views, labels, bad_paths)``."""
    views = augment([it.image for it in raw.items], [it.seed for it in raw.items])
    labels = torch.tensor([it.target for it in raw.items], dtype=torch.long)
    return views, labels, raw.bad


class TensorPipelineLoader:
    """Iterates ``(views, labels, bad_paths)`` like the PIL pretraining DataLoader.

    Exposes ``sampler``, ``batch_size`` and ``dataset`` so :func:`set_loader_epoch`,
    :func:`steps_per_epoch` and the trainer treat both loaders alike. With
    ``decode_on_device`` (default: on CUDA) workers only read files and the main process
    decodes and augments each batch on ``device``; otherwise workers do both on the CPU.
    """

    def __init__(
        self,
        base: ImageFolderDataset,
        indices: Sequence[int] | None,
        sampler: Any,
        batch_size: int,
        augment: BatchedSimCLR,
        device: torch.device | str = "cpu",
        num_workers: int = 0,
        generator: torch.Generator | None = None,
        decode_on_device: bool | None = None,
    ) -> None:
        self.device = torch.device(device)
        if decode_on_device is None:
            decode_on_device = self.device.type == "cuda"
        self.decode_on_device = decode_on_device
        self.augment = augment
        self.dataset = EncodedImages(base, indices, decode=not decode_on_device)
        self.sampler = sampler
        self.batch_size = batch_size
        self.loader = DataLoader(
            self.dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=num_workers,
            collate_fn=CollateItems(base.skipped, None if decode_on_device else augment),
            drop_last=True,
            persistent_workers=num_workers > 0,
            generator=generator,
            worker_init_fn=worker_init(),  # loco.stop: the main process decides when to stop
        )

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, list[str]]]:
        for batch in self.loader:
            if not self.decode_on_device:
                yield batch
                continue
            items, bad = decode_on_device(batch.items, self.device)
            yield finish_batch(RawBatch(items, batch.bad + bad), self.augment)

    def __repr__(self) -> str:
        where = f"decode+augment on {self.device}" if self.decode_on_device else "CPU workers"
        return f"TensorPipelineLoader({where}, batch_size={self.batch_size}, {self.augment})"
