"""The ``loco`` command: one entry point, one subcommand per job.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported lazily so ``loco --help`` stays fast and
optional extras (Detectron2, submitit) are only needed by the subcommands that use them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from loco.errors import LocoError

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": (
        "loco.quickstart",
        "pretrain on the shipped CIFAR-10, then kNN + linear eval; prints a table",
    ),
    "pretrain": (
        "loco.train",
        "self-supervised pretraining (`loco pretrain --help` lists methods)",
    ),
    "features": (
        "loco.eval.features_cli",
        "extract frozen per-stage readout features into a cache",
    ),
    "eval": ("loco.eval.cli", "kNN (faiss) and linear-probe evaluation per stage"),
    "report": ("loco.eval.report", "merge results.json of several runs into one table (+ PNG)"),
    "bench": ("loco.bench", "FLOPs, activation memory and throughput of each method vs e2e"),
    "submit": ("loco.launch.submit", "submit pretrain/eval/transfer to Slurm with submitit"),
    "jobs": ("loco.launch.status", "state, last step and log tail of submitted jobs"),
    "transfer": ("loco.transfer.cli", "Detectron2 Mask R-CNN transfer (train | eval | subsample)"),
    "data": ("loco.data.cli", "prepare the shipped datasets and check an ImageFolder tree"),
    "config": ("loco.config_cli", "every config key with its type, default and help"),
    "export": ("loco.export", "write a backbone for timm, torchvision or safetensors"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only ``command``'s module is imported (``loco --help`` stays instant)."""
    parser = argparse.ArgumentParser(
        prog="loco",
        description="Local (block-wise) contrastive pretraining of timm backbones, with kNN/linear evaluation, Detectron2 transfer and Slurm launch.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == command:
            _attach(p, module)
    return parser


def _attach(parser: argparse.ArgumentParser, module: str) -> None:
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:  # optional extra missing: still list the command
        parser.set_defaults(_import_error=str(exc))
        return
    mod.add_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_import_error", None):
        print(
            f"error: `loco {args.command}` needs a missing dependency ({args._import_error}); "
            "see README's install section",
            file=sys.stderr,
        )
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except LocoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
