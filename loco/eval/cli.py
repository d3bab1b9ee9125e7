"""``loco eval knn | linear | all``, and :func:`evaluate_run`, the one-call evaluation.

Each evaluation loads the weights (a loco checkpoint of any method, a plain state dict,
or ``--random-init``), reads or extracts the per-stage features (:mod:`loco.eval.features`),
runs its protocol per stage, merges its rows into ``<run dir>/results.json``
(:mod:`loco.eval.results`) and prints them as a markdown table.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from loco.config import Config
from loco.errors import LocoError
from loco.eval.features import (
    FeatureSet,
    Source,
    add_source_arguments,
    dataset_name,
    default_out_dir,
    feature_sets,
    load_backbone,
    parse_stages,
    source_from_args,
)
from loco.eval.knn import FeatureBank, get_protocol, knn_evaluate
from loco.eval.linear import LinearResult, linear_probe_augmented, linear_probe_cached, preset_for
from loco.eval.results import format_table, make_row, write_results
from loco.models.backbone import StagedBackbone

log = logging.getLogger("loco.eval")


# -- building blocks -----------------------------------------------------------------------
def _base_row(cfg: Config, source: Source) -> dict[str, Any]:
    return {
        "method": source.method,
        "backbone": cfg.model.backbone,
        "dataset": dataset_name(cfg),
        "checkpoint": source.checkpoint,
        "step": source.step,
        "image_size": cfg.data.image_size,
    }


def knn_rows(
    cfg: Config,
    source: Source,
    train: Mapping[int, FeatureSet],
    val: Mapping[int, FeatureSet],
    protocols: Sequence[str] = ("dino",),
    *,
    ks: Sequence[int] | None = None,
    temperature: float | None = None,
    backend: str = "auto",
    device: str | torch.device | None = None,
    drop_large_k: bool = False,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """kNN rows for every stage and protocol; one index per stage serves all protocols.

    ``drop_large_k`` skips (with a warning) the k that exceed the training set instead of
    failing, for small quick evaluations.
    """
    if device is not None and str(device) == "auto":
        device = None
    if backend == "auto" and device is not None and torch.device(device).type == "cpu":
        backend = "faiss-cpu"
    rows = []
    for s in sorted(train):
        tr, va = train[s], val[s]
        bank = FeatureBank(tr.features, backend, device=device)
        for name in protocols:
            proto = get_protocol(name, ks, temperature)
            if drop_large_k and max(proto.ks) > len(tr):
                kept = tuple(k for k in proto.ks if k <= len(tr))
                log.warning(
                    "kNN %s: %d training images; skipping k > %d", proto.name, len(tr), len(tr)
                )
                if not kept:
                    continue
                proto = get_protocol(proto, kept)
            results = knn_evaluate(
                tr.features,
                tr.labels,
                va.features,
                va.labels,
                proto,
                num_classes=max(tr.num_classes, va.num_classes),
                bank=bank,
                progress=progress,
            )
            for r in results:
                rows.append(
                    make_row(
                        **_base_row(cfg, source),
                        stage=s,
                        protocol=r.protocol,
                        k=r.k,
                        temperature=r.temperature,
                        top1=r.top1,
                        top5=r.top5,
                        primary=r.primary,
                        n_train=len(tr),
                        n_val=len(va),
                    )
                )
        del bank
    return rows


def linear_rows(
    cfg: Config, source: Source, results: Sequence[LinearResult]
) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        extra = {"holdout_top1": r.holdout_top1, "sweep": r.sweep} if r.sweep is not None else {}
        rows.append(
            make_row(
                **_base_row(cfg, source),
                stage=r.stage,
                protocol=r.protocol,
                lr=r.lr,
                epochs=r.epochs,
                top1=r.top1,
                top5=r.top5,
                primary=True,
                n_train=r.n_train,
                n_val=r.n_val,
                **extra,
            )
        )
    return rows


def evaluate_run(
    cfg: Config | None,
    checkpoint_path: str | Path | None,
    out_dir: str | Path,
    stages: str | Sequence[int] = "all",
    knn: bool = True,
    linear: bool = True,
    train_per_class: int = 0,
    val_per_class: int = 0,
    *,
    knn_protocols: Sequence[str] = ("dino",),
    linear_protocol: str = "cached",
    preset: str | None = None,
    epochs: int | None = None,
    lrs: Sequence[float] | None = None,
    batch_size: int = 256,
    seed: int | None = None,
    device: str | torch.device | None = None,
    backend: str = "auto",
    cache_dir: str | Path | None = None,
    backbone_name: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Evaluate one network per stage; write ``out_dir/results.json``; return the rows.

    ``checkpoint_path=None`` evaluates the random initialisation of ``cfg``'s architecture
    (seed ``cfg.train.seed`` unless ``seed`` is given): the floor. A loco checkpoint brings
    its own architecture (``model`` section); ``cfg`` then supplies the data settings.
    kNN (``knn_protocols``: "dino", "instdisc") and the linear probe (``linear_protocol``:
    "cached" or "augmented", hyper-parameters from ``preset``, default by backbone) run on
    ``train_per_class`` / ``val_per_class`` images per class (0 = all). k larger than the
    training set are skipped with a warning. Features are cached in ``cache_dir``
    (default ``out_dir/features``).
    """
    if cfg is None and checkpoint_path is None:
        raise LocoError("evaluate_run needs a config or a checkpoint")
    if linear_protocol not in ("cached", "augmented"):
        raise LocoError(f"linear protocol '{linear_protocol}' unknown; use cached or augmented")
    seed = (cfg.train.seed if cfg is not None else 0) if seed is None else seed
    cfg, backbone, source = load_backbone(
        checkpoint_path,
        cfg=cfg,
        backbone_name=backbone_name,
        random_init=checkpoint_path is None,
        seed=seed,
    )
    out_dir = Path(out_dir)
    cache = Path(cache_dir) if cache_dir else out_dir / "features"
    rows: list[dict[str, Any]] = []
    need_features = knn or (linear and linear_protocol == "cached")
    if need_features:
        train, val = feature_sets(
            cfg,
            backbone,
            source,
            stages,
            cache,
            train_per_class=train_per_class,
            val_per_class=val_per_class,
            seed=seed,
            batch_size=batch_size,
            device=device,
            progress=progress,
        )
        if knn:
            rows += knn_rows(
                cfg,
                source,
                train,
                val,
                knn_protocols,
                backend=backend,
                device=device,
                drop_large_k=True,
                progress=progress,
            )
    if linear:
        p = preset_for(cfg.model.backbone, preset)
        if linear_protocol == "cached":
            results = linear_probe_cached(
                train,
                val,
                lrs or p.lrs,
                epochs=epochs or p.epochs,
                batch_size=batch_size,
                seed=seed,
                device=device,
                progress=progress,
            )
        else:
            results = linear_probe_augmented(
                cfg,
                backbone,
                stages,
                lr=(lrs[0] if lrs else p.aug_lr),
                schedule=p.aug_schedule,
                momentum=p.aug_momentum,
                weight_decay=p.aug_weight_decay,
                epochs=epochs or p.aug_epochs,
                batch_size=batch_size,
                train_per_class=train_per_class,
                val_per_class=val_per_class,
                seed=seed,
                device=device,
                progress=progress,
            )
        rows += linear_rows(cfg, source, results)
    write_results(out_dir, rows)
    return rows


# -- command line --------------------------------------------------------------------------
def _number_list(kind: type) -> Callable[[str], list]:
    """An argparse type for comma-separated numbers of ``kind`` (``1,2`` or ``0.1,1``)."""

    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",") if v]
        except ValueError:
            noun = "integers" if kind is int else "numbers"
            raise argparse.ArgumentTypeError(
                f"'{text}' is not a comma-separated list of {noun}"
            ) from None

    return parse


_floats, _ints = _number_list(float), _number_list(int)


def _common(p: argparse.ArgumentParser) -> None:
    add_source_arguments(p)
    g = p.add_argument_group("evaluation")
    g.add_argument(
        "--stages", default="all", help="1-based stages, e.g. 1,2,3,4 or last (default all)"
    )
    g.add_argument(
        "--train-per-class", type=int, default=0, help="training images per class (default 0 = all)"
    )
    g.add_argument(
        "--val-per-class", type=int, default=0, help="val images per class (default 0 = all)"
    )
    g.add_argument("--out", help="run dir for results.json (default: the checkpoint's run dir)")


def _knn_args(p: argparse.ArgumentParser, all_cmd: bool = False) -> None:
    g = p.add_argument_group("kNN")
    g.add_argument(
        "--knn-protocol" if all_cmd else "--protocol",
        dest="knn_protocol",
        default="dino",
        choices=("dino", "instdisc", "both"),
        help="dino: T=0.07, k=10,20,100,200; instdisc: T=0.1, k=200 (default dino)",
    )
    g.add_argument("--k", type=_ints, help="override the protocol's k values, e.g. 20 or 10,20")
    g.add_argument("--temperature", type=float, help="override the protocol's temperature")
    g.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "faiss-cpu", "faiss-gpu", "torch"),
        help="search backend (default auto: faiss-gpu, else torch on CUDA, else faiss-cpu)",
    )


def _linear_args(p: argparse.ArgumentParser, all_cmd: bool = False) -> None:
    g = p.add_argument_group("linear probe")
    g.add_argument(
        "--linear-protocol" if all_cmd else "--protocol",
        dest="linear_protocol",
        default="cached",
        choices=("cached", "augmented"),
        help="cached: lr sweep on cached features (default); augmented: the paper's protocol",
    )
    g.add_argument(
        "--preset", choices=("resnet", "vit"), help="hyper-parameters (default: from the backbone)"
    )
    g.add_argument(
        "--lrs", type=_floats, help="cached: lrs to sweep; augmented: the lr (per 256 images)"
    )
    g.add_argument(
        "--schedule", choices=("step", "cosine"), help="augmented: lr schedule (default: preset's)"
    )
    g.add_argument("--epochs", type=int, help="training epochs (default: preset's, 100)")
    g.add_argument(
        "--holdout",
        type=float,
        default=0.1,
        help="cached: held-out train fraction for the lr choice",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", metavar="PROTOCOL", required=True)
    p = sub.add_parser(
        "knn", help="weighted kNN (faiss) per stage", description="weighted kNN per stage"
    )
    _common(p)
    _knn_args(p)
    p = sub.add_parser(
        "linear", help="linear probe per stage", description="linear probe per stage"
    )
    _common(p)
    _linear_args(p)
    p = sub.add_parser(
        "all", help="kNN and linear probe", description="kNN and linear probe per stage"
    )
    _common(p)
    _knn_args(p, all_cmd=True)
    _linear_args(p, all_cmd=True)


def _linear(
    args: argparse.Namespace,
    cfg: Config,
    backbone: StagedBackbone,
    source: Source,
    train: Mapping[int, FeatureSet] | None,
    val: Mapping[int, FeatureSet] | None,
) -> list[dict[str, Any]]:
    p = preset_for(cfg.model.backbone, args.preset)
    progress = not args.no_progress
    if args.linear_protocol == "cached":
        assert train is not None and val is not None
        results = linear_probe_cached(
            train,
            val,
            args.lrs or p.lrs,
            epochs=args.epochs or p.epochs,
            batch_size=args.batch_size,
            holdout=args.holdout,
            seed=args.seed,
            device=args.device,
            progress=progress,
        )
    else:
        lr = args.lrs[0] if args.lrs else p.aug_lr
        if args.lrs and len(args.lrs) > 1:
            raise LocoError("the augmented probe trains one lr; give one value to --lrs")
        results = linear_probe_augmented(
            cfg,
            backbone,
            args.stages,
            lr=lr,
            schedule=args.schedule or p.aug_schedule,
            momentum=p.aug_momentum,
            weight_decay=p.aug_weight_decay,
            epochs=args.epochs or p.aug_epochs,
            batch_size=args.batch_size,
            train_per_class=args.train_per_class,
            val_per_class=args.val_per_class,
            seed=args.seed,
            device=args.device,
            progress=progress,
        )
    return linear_rows(cfg, source, results)


def run(args: argparse.Namespace) -> int:
    cfg, backbone, source = source_from_args(args)
    out_dir = default_out_dir(source, args.out)
    cache = Path(args.cache_dir) if args.cache_dir else out_dir / "features"
    stages = parse_stages(args.stages, backbone.num_modules)
    do_knn = args.eval_command in ("knn", "all")
    do_linear = args.eval_command in ("linear", "all")
    train = val = None
    if do_knn or (do_linear and args.linear_protocol == "cached"):
        train, val = feature_sets(
            cfg,
            backbone,
            source,
            stages,
            cache,
            train_per_class=args.train_per_class,
            val_per_class=args.val_per_class,
            seed=args.seed,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
            progress=not args.no_progress,
        )
    rows: list[dict[str, Any]] = []
    if do_knn:
        assert train is not None and val is not None
        protocols = ("dino", "instdisc") if args.knn_protocol == "both" else (args.knn_protocol,)
        rows += knn_rows(
            cfg,
            source,
            train,
            val,
            protocols,
            ks=args.k,
            temperature=args.temperature,
            backend=args.backend,
            device=args.device,
            progress=not args.no_progress,
        )
    if do_linear:
        rows += _linear(args, cfg, backbone, source, train, val)
    path = write_results(out_dir, rows)
    print(format_table(rows))
    print(f"\nresults: {path}")
    return 0
