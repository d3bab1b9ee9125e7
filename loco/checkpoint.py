"""Checkpoints that survive preemption: atomic writes, exact resume, safe loading.

A checkpoint is written to a temporary file in the same directory and renamed into
place, so a job killed mid-write leaves the previous checkpoint intact. ``checkpoint.pt``
in the run directory always names the newest complete one. Loading uses
``weights_only=True``: a checkpoint file cannot run code.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from loco.errors import LocoError
from loco.rundir import RunDir


def fsync_dir(path: Path) -> None:
    """Make a rename in directory ``path`` durable (a crash after os.replace can otherwise
    leave the old name on disk)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not POSIX, or no permission to open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (no copy, and ``checkpoint.pt`` stays a real file); a durable copy where
    the filesystem has no hard links."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
        with open(dst, "rb+") as f:
            os.fsync(f.fileno())


def rng_state() -> dict[str, Any]:
    # numpy's state as plain tensors/ints so that weights_only loading accepts it
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_run_checkpoint(run_dir: Path, state: dict[str, Any], step: int, keep: int = 2) -> Path:
    """Write ``checkpoints/step_XXXXXXXX.pt`` and point ``checkpoint.pt`` at it."""
    rd = RunDir(run_dir)
    path = rd.step_checkpoint(step)
    atomic_save(state, path)
    latest = rd.checkpoint
    tmp_link = latest.with_name(f".{latest.name}.tmp{os.getpid()}")
    tmp_link.unlink(missing_ok=True)
    _link_or_copy(path, tmp_link)
    os.replace(tmp_link, latest)
    fsync_dir(latest.parent)
    old = rd.step_checkpoints()[:-keep] if keep > 0 else []
    for p in old:
        p.unlink(missing_ok=True)
    return path


def find_resume(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint ``resume`` continues: "auto" (the run's latest, if any), "extend" (the
    run's latest, which must exist), "none", or a path (see :mod:`loco.resume`)."""
    if resume == "none":
        return None
    if resume in ("auto", "extend"):
        latest = RunDir(run_dir).checkpoint
        if resume == "extend" and not latest.is_file():
            raise LocoError(f"train.resume=extend: {latest} does not exist; nothing to extend")
        return latest if latest.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise LocoError(
            f"train.resume={resume}: no such checkpoint; use auto, none, extend, "
            "weights:PATH or an existing file"
        )
    return path


def load(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint's dict; ``mmap``: tensors are read lazily (cheap when only the config
    and meta are wanted)."""
    path = Path(path)
    if not path.is_file():
        raise LocoError(f"checkpoint '{path}' not found; pass a run's checkpoint.pt")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # truncated, not a torch file, or pickled code
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        reason = next(
            (ln for ln in lines if "Unpickler error" in ln), lines[0] if lines else repr(exc)
        )
        raise LocoError(f"cannot read checkpoint '{path}': {reason.strip()}") from None
    if not isinstance(obj, dict):
        raise LocoError(f"checkpoint '{path}' holds a {type(obj).__name__}, not a state dict")
    return obj


def file_hash(path: str | Path, n: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def load_backbone_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load into a timm model; list mismatches in one clear error.

    Keys of modules the backbone has replaced by ``nn.Identity`` are ignored: timm's classifier
    (``num_classes=0``) and its post-pooling head (ConvNeXt's ``head.norm``, MobileNetV3's
    ``conv_head``; see :func:`loco.models.backbone.build_backbone`), which a timm or older loco
    checkpoint may hold. Every other key must match.
    """
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not _of_removed_module(model, k)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shape:

        def few(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        if shape:
            parts.append(f"shape mismatch: {few(shape)}")
        raise LocoError(
            f"checkpoint '{source}' does not fit this backbone ({'; '.join(parts)}); "
            "check model.backbone / model.small_image match the pretraining config"
        )
    model.load_state_dict(state, strict=True)


def _of_removed_module(model: nn.Module, key: str) -> bool:
    """Whether ``key`` belongs to a module that ``model`` holds as ``nn.Identity``."""
    path = key.rpartition(".")[0]
    while path:
        try:
            if isinstance(model.get_submodule(path), nn.Identity):
                return True
        except AttributeError:
            pass
        path = path.rpartition(".")[0]
    return False
