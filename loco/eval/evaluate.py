"""The one evaluation path: :func:`evaluate_run` (weights -> per-stage kNN and linear rows).

``loco eval``, ``loco quickstart``, ``tools/compare.py`` and Python callers all run this
function, so published numbers and users' numbers come from the same code. It loads the
weights (:func:`loco.eval.network.load_backbone`), reads or extracts the per-stage
features once (:mod:`loco.eval.features`), runs kNN (:mod:`loco.eval.knn`) and the linear
probe (:mod:`loco.eval.linear`) on them, and merges the rows into ``results.json``
(:mod:`loco.eval.results`).

Policies, pinned by tests/test_eval_features.py:

* a k larger than the training set is skipped, with one warning line naming it; when
  no k of a protocol is left, that is an error;
* the augmented probe trains one learning rate: several ``lrs`` are an error (the cached
  probe sweeps them).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loco.config import Config
from loco.errors import LocoError
from loco.eval.features import FeatureSet, dataset_name, feature_sets
from loco.eval.knn import FeatureBank, get_protocol, knn_evaluate
from loco.eval.linear import LinearResult, linear_probe_augmented, linear_probe_cached, preset_for
from loco.eval.network import default_out_dir, load_backbone, parse_stages
from loco.eval.results import make_row, write_results
from loco.weights import WeightsSource

log = logging.getLogger("loco.eval")

KNN_PROTOCOLS = ("dino", "instdisc")
LINEAR_PROTOCOLS = ("cached", "augmented")


@dataclass
class EvalOptions:
    """What to evaluate and how; every field has the default ``loco eval all`` uses."""

    stages: str | Sequence[int] = "all"  # "all", "last", "1,2,4" or a list (1-based)
    knn: bool = True
    linear: bool = True
    train_per_class: int = 0  # images per class (0 = all), seeded by ``seed``
    val_per_class: int = 0
    knn_protocols: Sequence[str] = ("dino",)  # "dino" and/or "instdisc"
    ks: Sequence[int] | None = None  # override the protocols' k
    temperature: float | None = None  # override the protocols' temperature
    backend: str = "auto"  # kNN search backend
    linear_protocol: str = "cached"  # "cached" (lr sweep on features) | "augmented" (paper)
    preset: str | None = None  # probe hyper-parameters; default from the backbone
    epochs: int | None = None  # default: the preset's
    lrs: Sequence[float] | None = None  # cached: lrs to sweep; augmented: one lr
    schedule: str | None = None  # augmented: "step" | "cosine"; default: the preset's
    holdout: float = 0.1  # cached: held-out train fraction that picks the lr
    batch_size: int = 256
    dtype: str = "float16"  # cached feature dtype
    seed: int | None = None  # subset / random-init seed; default: the config's train.seed
    device: str | torch.device | None = None  # None/"auto": CUDA if visible
    cache_dir: str | Path | None = None  # default: <out_dir>/features
    progress: bool = True

    def check(self) -> None:
        """Reject contradictory options before any weights are loaded."""
        bad = [p for p in self.knn_protocols if p not in KNN_PROTOCOLS]
        if bad:
            raise LocoError(f"kNN protocol '{bad[0]}' unknown; use {' or '.join(KNN_PROTOCOLS)}")
        if self.linear_protocol not in LINEAR_PROTOCOLS:
            raise LocoError(
                f"linear protocol '{self.linear_protocol}' unknown; use cached or augmented"
            )
        if self.linear and self.linear_protocol == "augmented" and self.lrs and len(self.lrs) > 1:
            raise LocoError(
                f"the augmented probe trains one lr, got {len(self.lrs)} "
                f"({','.join(f'{lr:g}' for lr in self.lrs)}); give one value to --lrs"
            )


def _base_row(cfg: Config, source: WeightsSource) -> dict[str, Any]:
    return {
        "method": source.method,
        "backbone": cfg.model.backbone,
        "dataset": dataset_name(cfg),
        "checkpoint": source.weights_id,
        "step": source.step,
        "image_size": cfg.data.image_size,
    }


def fitting_protocols(
    names: Sequence[str], n_train: int, ks: Sequence[int] | None, temperature: float | None
) -> list:
    """The kNN protocols restricted to the k that the ``n_train`` training images allow.

    A k > ``n_train`` is skipped with one warning line naming it; a protocol left with no
    k is an error (a smaller ``--k`` or more ``--train-per-class`` fixes it).
    """
    out = []
    for name in names:
        proto = get_protocol(name, ks, temperature)
        large = [k for k in proto.ks if k > n_train]
        if large:
            kept = [k for k in proto.ks if k <= n_train]
            if not kept:
                raise LocoError(
                    f"kNN {proto.name}: every k ({','.join(map(str, proto.ks))}) exceeds the "
                    f"{n_train} training images; use a smaller --k or more --train-per-class"
                )
            log.warning(
                "kNN %s: skipping k=%s (only %d training images)",
                proto.name,
                ",".join(map(str, large)),
                n_train,
            )
            proto = get_protocol(proto, kept)
        out.append(proto)
    return out


def knn_rows(
    cfg: Config,
    source: WeightsSource,
    train: Mapping[int, FeatureSet],
    val: Mapping[int, FeatureSet],
    opts: EvalOptions,
) -> list[dict[str, Any]]:
    """kNN rows for every stage and protocol; one index per stage serves all protocols."""
    device = opts.device
    if device is not None and str(device) == "auto":
        device = None
    backend = opts.backend
    if backend == "auto" and device is not None and torch.device(device).type == "cpu":
        backend = "faiss-cpu"
    n_train = len(next(iter(train.values())))
    protocols = fitting_protocols(opts.knn_protocols, n_train, opts.ks, opts.temperature)
    rows = []
    for s in sorted(train):
        tr, va = train[s], val[s]
        bank = FeatureBank(tr.features, backend, device=device)
        for proto in protocols:
            results = knn_evaluate(
                tr.features,
                tr.labels,
                va.features,
                va.labels,
                proto,
                num_classes=max(tr.num_classes, va.num_classes),
                bank=bank,
                progress=opts.progress,
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
    cfg: Config, source: WeightsSource, results: Sequence[LinearResult]
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
    out_dir: str | Path | None = None,
    options: EvalOptions | None = None,
    *,
    overrides: Sequence[str] = (),
    backbone_name: str | None = None,
    random_init: bool | None = None,
    method_name: str | None = None,
    prefix: str | None = None,
    ema: bool = False,
    **fields: Any,
) -> list[dict[str, Any]]:
    """Evaluate one network per stage; merge the rows into ``out_dir/results.json``; return them.

    ``options`` (or its fields as keywords, e.g. ``stages="last", epochs=3``) say what
    runs; see :class:`EvalOptions`. A loco checkpoint brings its own architecture (its
    ``model`` section; ``cfg`` then supplies the data settings, ``overrides`` change
    either). ``checkpoint_path=None`` or ``random_init=True`` evaluates the seeded random
    initialisation of the architecture: the floor. Other toolkits' checkpoints are read by
    :func:`loco.weights.read_weights` (``prefix`` picks the backbone; ``ema`` the momentum
    backbone of a loco checkpoint). ``out_dir`` defaults to the
    checkpoint's run directory; features are cached in ``options.cache_dir`` (default
    ``out_dir/features``).
    """
    if options is not None and fields:
        raise TypeError("pass either options or its fields as keywords, not both")
    opts = options or EvalOptions(**fields)
    opts.check()
    seed = (cfg.train.seed if cfg is not None else 0) if opts.seed is None else opts.seed
    cfg, backbone, source = load_backbone(
        checkpoint_path,
        cfg=cfg,
        overrides=overrides,
        backbone_name=backbone_name,
        random_init=checkpoint_path is None if random_init is None else random_init,
        seed=seed,
        method_name=method_name,
        prefix=prefix,
        ema=ema,
    )
    out = default_out_dir(source.path, out_dir)
    cache = Path(opts.cache_dir) if opts.cache_dir else out / "features"
    stages = parse_stages(opts.stages, backbone.num_modules)
    rows: list[dict[str, Any]] = []
    train = val = None
    if opts.knn or (opts.linear and opts.linear_protocol == "cached"):
        train, val = feature_sets(
            cfg,
            backbone,
            source,
            stages,
            cache,
            train_per_class=opts.train_per_class,
            val_per_class=opts.val_per_class,
            seed=seed,
            batch_size=opts.batch_size,
            device=opts.device,
            dtype=opts.dtype,
            progress=opts.progress,
        )
    if opts.knn:
        assert train is not None and val is not None
        rows += knn_rows(cfg, source, train, val, opts)
    if opts.linear:
        p = preset_for(cfg.model.backbone, opts.preset)
        if opts.linear_protocol == "cached":
            assert train is not None and val is not None
            results = linear_probe_cached(
                train,
                val,
                opts.lrs or p.lrs,
                epochs=opts.epochs or p.epochs,
                batch_size=opts.batch_size,
                holdout=opts.holdout,
                seed=seed,
                device=opts.device,
                progress=opts.progress,
            )
        else:
            results = linear_probe_augmented(
                cfg,
                backbone,
                stages,
                lr=opts.lrs[0] if opts.lrs else p.aug_lr,
                schedule=opts.schedule or p.aug_schedule,
                momentum=p.aug_momentum,
                weight_decay=p.aug_weight_decay,
                epochs=opts.epochs or p.aug_epochs,
                batch_size=opts.batch_size,
                train_per_class=opts.train_per_class,
                val_per_class=opts.val_per_class,
                seed=seed,
                device=opts.device,
                progress=opts.progress,
            )
        rows += linear_rows(cfg, source, results)
    write_results(out, rows)
    return rows
