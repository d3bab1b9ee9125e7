"""``loco data``: extract the shipped datasets, or check an ImageFolder tree before a long run.

``check`` decodes every image exactly as training does, so a bad file is found in minutes
on a login node rather than as a skipped-image count hours into a job.
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SPLIT_NAMES = ("train", "val", "test")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    prep = sub.add_parser("prepare", help="extract a shipped dataset into the cache (once)")
    prep.add_argument("name", choices=["cifar10", "clothing", "all"])
    prep.add_argument(
        "--cache-dir", type=Path, help="default: $LOCO_CACHE/data or ~/.cache/loco/data"
    )
    check = sub.add_parser(
        "check", help="count images per class, list empty class folders and unreadable images"
    )
    check.add_argument(
        "path", type=Path, help="a split (<class>/<image>) or a root holding train/ val/"
    )
    check.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    check.add_argument("--no-decode", action="store_true", help="count files only (fast)")
    check.add_argument("--show", type=int, default=20, help="unreadable paths to list")


def run(args: argparse.Namespace) -> int:
    if args.data_command == "prepare":
        from loco.data.shipped import SHIPPED, prepare_shipped

        for name in SHIPPED if args.name == "all" else [args.name]:
            print(f"{name}: {prepare_shipped(name, args.cache_dir)}")
        return 0
    splits = [args.path / s for s in SPLIT_NAMES if (args.path / s).is_dir()] or [args.path]
    problems = 0
    for split in splits:
        problems += _check_split(split, args.workers, not args.no_decode, args.show)
    return 1 if problems else 0


def _check_split(split: Path, workers: int, decode: bool, show: int) -> int:
    """Print the report of one split; returns the number of problems found."""
    import numpy as np

    from loco.data.folder import ImageFolderDataset

    dataset = ImageFolderDataset(split)
    counts = np.bincount(dataset.targets, minlength=len(dataset.classes))
    print(f"{split}: {len(dataset.classes)} classes, {len(dataset)} images")
    width = max(len(c) for c in dataset.classes)
    for cls, n in zip(dataset.classes, counts):
        print(f"  {cls:<{width}}  {n:>8}{'  EMPTY' if n == 0 else ''}")
    bad: list[tuple[str, str]] = []
    if decode:
        paths = [dataset.path(i) for i in range(len(dataset))]
        bad = [(p, err) for p, err in zip(paths, _decode_all(paths, workers)) if err]
    if dataset.empty_classes:
        print(
            f"  empty class folders ({len(dataset.empty_classes)}): {', '.join(dataset.empty_classes)}"
        )
    if bad:
        print(f"  unreadable images ({len(bad)}), training will skip them:")
        for path, err in bad[:show]:
            print(f"    {path}: {err}")
    elif decode:
        print("  all images decode")
    return len(bad) + len(dataset.empty_classes)


def _decode_error(path: str) -> str:
    """Empty if ``path`` decodes as training would decode it, else the error."""
    from loco.data.folder import load_rgb

    try:
        load_rgb(path)
    except Exception as exc:  # report any decoder error, like training skips it
        return f"{type(exc).__name__}: {exc}"
    return ""


def _decode_all(paths: list[str], workers: int) -> list[str]:
    if workers <= 1 or len(paths) < 256:
        return [_decode_error(p) for p in paths]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_decode_error, paths, chunksize=256))
