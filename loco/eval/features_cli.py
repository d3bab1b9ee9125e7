"""``loco features``: extract (or find in the cache) the per-stage features of a network;
also the weights and data arguments that ``loco eval`` shares."""

from __future__ import annotations

import argparse
from pathlib import Path

from loco.config import Config
from loco.eval.features import extract_features
from loco.eval.network import default_out_dir, load_backbone
from loco.models.backbone import StagedBackbone
from loco.weights import WeightsSource


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments naming the weights and the data; shared by `loco features` and `loco eval`."""
    g = parser.add_argument_group("weights")
    g.add_argument(
        "--checkpoint",
        help="loco checkpoint (RUN/checkpoint.pt) or a plain timm/torchvision state dict",
    )
    g.add_argument(
        "--backbone",
        help="timm model name for a plain state dict or --random-init without a checkpoint",
    )
    g.add_argument(
        "--random-init",
        action="store_true",
        help="seeded random weights of the same architecture (the floor)",
    )
    g.add_argument(
        "--seed", type=int, default=0, help="random-init seed and subset seed (default 0)"
    )
    g.add_argument(
        "--config",
        "-c",
        help="YAML config for the architecture/data when there is no loco checkpoint",
    )
    g.add_argument("--name", help="method label in results (default: the checkpoint's method)")
    g.add_argument(
        "--prefix",
        help="key prefix of the backbone in another toolkit's checkpoint, when several "
        "match (e.g. student. for DINO's student); see loco/weights.py",
    )
    g.add_argument(
        "--ema",
        action="store_true",
        help="the momentum (EMA) backbone of a loco checkpoint whose objective keeps one "
        "(byol, mocov3) instead of the online backbone; results are labelled <method>-ema",
    )
    d = parser.add_argument_group("data")
    d.add_argument(
        "--data",
        metavar="DIR",
        help="ImageFolder root with train/ and val/ (sets data.dataset=folder)",
    )
    d.add_argument("--workers", type=int, help="data loader workers (default: the config's)")
    d.add_argument(
        "--batch-size", type=int, default=256, help="images per forward pass (default 256)"
    )
    d.add_argument("--cache-dir", help="feature cache (default: RUN/features, or OUT/features)")
    d.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    d.add_argument(
        "--dtype", default="float16", choices=("float16", "float32"), help="cached feature dtype"
    )
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides applied on top of the checkpoint's config, e.g. data.image_size=224",
    )


def config_from_args(args: argparse.Namespace) -> tuple[Config | None, list[str]]:
    """The ``--config`` file (or None) and the overrides ``--data``/``--workers`` add."""
    overrides = list(args.overrides or [])
    if args.data:
        overrides = [f"data.root={args.data}", "data.dataset=folder", *overrides]
    if args.workers is not None:
        overrides.append(f"data.num_workers={args.workers}")
    cfg = None
    if args.config:
        from loco.config import load_config

        cfg = load_config(args.config)
    return cfg, overrides


def source_from_args(args: argparse.Namespace) -> tuple[Config, StagedBackbone, WeightsSource]:
    cfg, overrides = config_from_args(args)
    return load_backbone(
        args.checkpoint,
        cfg=cfg,
        overrides=overrides,
        backbone_name=args.backbone,
        random_init=args.random_init,
        seed=args.seed,
        method_name=args.name,
        prefix=args.prefix,
        ema=args.ema,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    parser.add_argument(
        "--split", default="train", help="train | val | a split folder name (default train)"
    )
    parser.add_argument(
        "--stages", default="all", help="1-based stages, e.g. 1,2,3,4 (default all)"
    )
    parser.add_argument(
        "--per-class", type=int, default=0, help="images per class (default 0 = all)"
    )
    parser.add_argument(
        "--out", help="where the cache goes when there is no run dir (OUT/features)"
    )


def run(args: argparse.Namespace) -> int:
    cfg, backbone, source = source_from_args(args)
    cache = (
        Path(args.cache_dir)
        if args.cache_dir
        else default_out_dir(source.path, args.out) / "features"
    )
    sets = extract_features(
        cfg,
        backbone,
        args.split,
        args.stages,
        cache,
        weights_id=source.cache_id,
        per_class=args.per_class,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        progress=not args.no_progress,
    )
    print("| stage | n | dim | cached | file |\n|---|---|---|---|---|")
    for s, fs in sets.items():
        print(f"| S{s} | {len(fs)} | {fs.dim} | {'reused' if fs.cached else 'new'} | {fs.path} |")
    return 0
