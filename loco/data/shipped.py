"""The datasets shipped beside the repository (``../shared/data``), extracted once into a cache.

Extraction goes to a temporary folder that is renamed into place, and a marker is written
only after that, so an interrupted extraction (Ctrl-C, a killed job) is redone on the next
call instead of silently training on half a dataset. A file lock keeps the ranks of one
node from extracting the same archive at the same time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loco.config import DataConfig
from loco.errors import LocoError
from loco.filelock import locked

log = logging.getLogger(__name__)

ENV_SHARED = "LOCO_SHARED_DATA"
ENV_CACHE = "LOCO_CACHE"
# the repository root of this package: <repo>/loco/data/shipped.py
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ShippedSet:
    """Where each split of a shipped dataset lives: split -> archive under the shared folder."""

    archives: dict[str, str]
    subdir: str = ""  # folder inside the archives that holds the splits


SHIPPED: dict[str, ShippedSet] = {
    "cifar10": ShippedSet({"train": "cifar10/train.tar.gz", "val": "cifar10/val.tar.gz"}),
    "clothing": ShippedSet(
        dict.fromkeys(("train", "val", "test"), "clothing/clothing-small.tar"),
        subdir="clothing-small",
    ),
}


def find_shared_data() -> Path:
    """``$LOCO_SHARED_DATA``, else ``shared/data`` beside the repository or the working dir."""
    env = os.environ.get(ENV_SHARED)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise LocoError(f"${ENV_SHARED}={env} is not a directory; point it at shared/data")
        return path
    cwd = Path.cwd()
    candidates = [_PACKAGE_ROOT / ".." / "shared" / "data", cwd / ".." / "shared" / "data"]
    candidates.append(cwd / "shared" / "data")
    for path in candidates:
        if path.is_dir():
            return path.resolve()
    raise LocoError(
        f"shipped data not found (looked in {', '.join(str(p) for p in candidates)}); "
        f"set ${ENV_SHARED} to the shared/data folder"
    )


def default_cache_dir() -> Path:
    """``$LOCO_CACHE/data``, else ``~/.cache/loco/data``."""
    base = os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "loco"
    return Path(base).expanduser() / "data"


def prepare_shipped(
    name: str, cache_dir: Path | None = None, splits: Sequence[str] | None = None
) -> Path:
    """Return the root holding ``<split>/<class>/*`` of shipped dataset ``name``.

    Extracts the archives of ``splits`` (default: all) into ``cache_dir/<name>`` on first
    use; later calls only check the markers.
    """
    if name not in SHIPPED:
        raise LocoError(f"no shipped dataset '{name}'; shipped: {', '.join(SHIPPED)}")
    spec = SHIPPED[name]
    wanted = list(spec.archives) if splits is None else list(splits)
    for split in wanted:
        if split not in spec.archives:
            raise LocoError(
                f"shipped {name} has splits {', '.join(spec.archives)}, not '{split}'; "
                "set data.train_split/data.val_split accordingly"
            )
    dest = Path(cache_dir or default_cache_dir()).expanduser() / name
    archives = dict.fromkeys(spec.archives[s] for s in wanted)  # ordered, unique
    if not all(_is_complete(dest, a) for a in archives):
        shared = find_shared_data()
        dest.mkdir(parents=True, exist_ok=True)
        with locked(dest / ".lock"):
            for archive in archives:
                if not _is_complete(dest, archive):
                    _extract(shared / archive, dest, archive, name)
    return dest / spec.subdir if spec.subdir else dest


def resolve_data_root(cfg: DataConfig, splits: Sequence[str] | None = None) -> Path:
    """The ImageFolder root of ``cfg``; checks that each of ``splits`` (default train, val) exists.

    A non-empty ``cfg.root`` wins; otherwise the shipped copy of ``cfg.dataset``.
    """
    splits = list(splits) if splits is not None else [cfg.train_split, cfg.val_split]
    if cfg.root:
        root = Path(cfg.root).expanduser()
        if not root.is_dir():
            raise LocoError(f"data.root '{root}' is not a directory; set data.root=PATH")
    elif cfg.dataset in SHIPPED:
        known = [s for s in splits if s in SHIPPED[cfg.dataset].archives]
        root = prepare_shipped(cfg.dataset, splits=known)
    else:
        raise LocoError(f"data.dataset={cfg.dataset} needs data.root=PATH (an ImageFolder tree)")
    for split in splits:
        if not (root / split).is_dir():
            raise LocoError(
                f"split folder '{root / split}' not found; expected {root}/<split>/<class>/<image>"
                " (check data.train_split / data.val_split)"
            )
    return root


def _marker(dest: Path, archive: str) -> Path:
    return dest / f".complete-{Path(archive).name}.json"


def _is_complete(dest: Path, archive: str) -> bool:
    marker = _marker(dest, archive)
    try:
        entries = json.loads(marker.read_text())["entries"]
    except (OSError, ValueError, KeyError):
        return False
    return all((dest / e).exists() for e in entries)


def _extract(src: Path, dest: Path, archive: str, name: str) -> None:
    if not src.is_file():
        raise LocoError(f"archive '{src}' missing from the shared data; re-sync shared/data")
    if not hasattr(tarfile, "data_filter"):
        raise LocoError("safe tar extraction needs Python >= 3.10.12 / 3.11.4; upgrade Python")
    for stale in dest.glob(".extract-*"):  # left by an interrupted run; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    split = Path(archive).name.split(".")[0]
    size_mb = src.stat().st_size / 2**20
    log.info("extracting %s %s (%.0f MB) to %s once", name, split, size_mb, dest)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        with tarfile.open(src) as tar:
            tar.extractall(tmp, filter="data")
        entries = sorted(p.name for p in tmp.iterdir())
        for entry in entries:
            target = dest / entry
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            (tmp / entry).rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    marker = _marker(dest, archive)
    partial = marker.with_suffix(".tmp")
    partial.write_text(json.dumps({"archive": str(src), "entries": entries}))
    partial.replace(marker)
