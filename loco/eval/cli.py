"""``loco eval knn | linear | all``: command-line arguments -> :func:`loco.eval.evaluate.evaluate_run`.

This module only parses; the evaluation itself (weights, features, kNN, linear probe,
``results.json``) is :func:`~loco.eval.evaluate.evaluate_run`, the function
``loco quickstart``, ``tools/compare.py`` and Python callers use too.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from loco.errors import LocoError
from loco.eval.evaluate import KNN_PROTOCOLS, EvalOptions, evaluate_run
from loco.eval.features_cli import add_source_arguments, config_from_args
from loco.eval.network import default_out_dir
from loco.eval.results import format_table
from loco.rundir import RunDir


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


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    """The :class:`EvalOptions` that ``loco eval knn | linear | all`` asks for."""
    knn = args.eval_command in ("knn", "all")
    linear = args.eval_command in ("linear", "all")
    protocol = getattr(args, "knn_protocol", "dino")
    return EvalOptions(
        stages=args.stages,
        knn=knn,
        linear=linear,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        knn_protocols=KNN_PROTOCOLS if protocol == "both" else (protocol,),
        ks=getattr(args, "k", None),
        temperature=getattr(args, "temperature", None),
        backend=getattr(args, "backend", "auto"),
        linear_protocol=getattr(args, "linear_protocol", "cached"),
        preset=getattr(args, "preset", None),
        epochs=getattr(args, "epochs", None),
        lrs=getattr(args, "lrs", None),
        schedule=getattr(args, "schedule", None),
        holdout=getattr(args, "holdout", 0.1),
        batch_size=args.batch_size,
        dtype=args.dtype,
        seed=args.seed,
        device=args.device,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    if not args.checkpoint and not args.random_init:
        raise LocoError("nothing to evaluate: pass --checkpoint PATH or --random-init")
    cfg, overrides = config_from_args(args)
    out_dir = default_out_dir(args.checkpoint, args.out)
    rows = evaluate_run(
        cfg,
        args.checkpoint,
        out_dir,
        options_from_args(args),
        overrides=overrides,
        backbone_name=args.backbone,
        random_init=args.random_init,
        method_name=args.name,
        prefix=args.prefix,
        ema=args.ema,
    )
    print(format_table(rows))
    print(f"\nresults: {RunDir(out_dir).results}")
    return 0
