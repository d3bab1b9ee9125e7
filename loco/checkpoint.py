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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from loco.errors import LocoError

LATEST = "checkpoint.pt"


def atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    ckpt_dir = run_dir / "checkpoints"
    path = ckpt_dir / f"step_{step:08d}.pt"
    atomic_save(state, path)
    latest = run_dir / LATEST
    tmp_link = run_dir / f".{LATEST}.tmp{os.getpid()}"
    tmp_link.unlink(missing_ok=True)
    os.link(path, tmp_link)  # hard link: no copy, and `checkpoint.pt` is a real file
    os.replace(tmp_link, latest)
    old = sorted(ckpt_dir.glob("step_*.pt"))[:-keep] if keep > 0 else []
    for p in old:
        p.unlink(missing_ok=True)
    return path


def find_resume(run_dir: Path, resume: str) -> Path | None:
    """``resume``: "auto" (the run's latest checkpoint, if any), "none", or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        latest = run_dir / LATEST
        return latest if latest.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise LocoError(
            f"train.resume={resume}: no such checkpoint; use auto, none or an existing file"
        )
    return path


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise LocoError(f"checkpoint '{path}' not found; pass a run's checkpoint.pt")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
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
    """Load into a timm model; ignore classifier keys; list mismatches in one clear error."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "head.", "classifier."))}
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
