"""``loco transfer``: Mask R-CNN (Detectron2) on a pretrained loco backbone.

    loco transfer train --config mask_rcnn_R50_FPN_1x_frozen --checkpoint RUN/checkpoint.pt \\
        [--train-json J --train-images DIR --val-json J --val-images DIR] [KEY VALUE ...]
    loco transfer eval --output-dir RUN/transfer/mask_rcnn_R50_FPN_1x_frozen
    loco transfer subsample instances_train2017.json out.json --images 10000 --seed 0

``--config`` is a path or the name of a file in ``transfer/configs``. Trailing
``KEY VALUE`` pairs override Detectron2 config keys (``SOLVER.MAX_ITER 1000``). Detectron2
is imported only when ``train``/``eval`` run; without it they stop with one line naming
``python tools/install_detectron2.py``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from loco.rundir import RunDir

log = logging.getLogger(__name__)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="loco checkpoint (any method) or a timm state dict")
    p.add_argument(
        "--prefix",
        help="key prefix of the backbone in another toolkit's checkpoint, as for loco eval "
        "(e.g. student.module.backbone. for DINO's student; sets MODEL.LOCO.PREFIX)",
    )
    p.add_argument(
        "--output-dir",
        help="Detectron2 OUTPUT_DIR (default: RUN/transfer/<config> beside the checkpoint's "
        "run, else runs/transfer/<config>, or ~/loco-runs/transfer/<config> when run from "
        "inside loco's source tree)",
    )
    p.add_argument("--val-json", help="COCO instances json to evaluate on (sets DATASETS.TEST)")
    p.add_argument("--val-images", help="image folder of --val-json")
    p.add_argument(
        "--results-to",
        action="append",
        metavar="RUN_DIR",
        help="also merge the results rows into RUN_DIR/results.json (repeatable)",
    )
    p.add_argument("--num-gpus", type=int, default=1, help="processes per machine (default 1)")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--dist-url", default="auto", help="tcp://HOST:PORT for several machines")
    p.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        metavar="KEY VALUE",
        help="Detectron2 config overrides, e.g. SOLVER.MAX_ITER 1000",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="transfer_command", metavar="ACTION", required=True)
    p = sub.add_parser(
        "train",
        help="train Mask R-CNN, evaluate, write results.json",
        description="train Mask R-CNN on a loco backbone (Detectron2 DefaultTrainer)",
    )
    p.add_argument("--config", required=True, help="Detectron2 YAML, or a name in transfer/configs")
    p.add_argument("--train-json", help="COCO instances json to train on (sets DATASETS.TRAIN)")
    p.add_argument("--train-images", help="image folder of --train-json")
    p.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="start over even if OUTPUT_DIR holds a checkpoint (default: resume)",
    )
    _common(p)
    p = sub.add_parser(
        "eval",
        help="evaluate trained weights (COCO AP), write results.json",
        description="evaluate a trained transfer run with COCOEvaluator",
    )
    p.add_argument("--config", help="config (default: OUTPUT_DIR/config.yaml of the run)")
    p.add_argument("--weights", help="Detectron2 weights (default: the run's last checkpoint)")
    _common(p)
    p = sub.add_parser(
        "subsample",
        help="seeded subset of a COCO json (COCO-10K / COCO-1K)",
        description="keep N annotated images of a COCO instances json, chosen with a seed",
    )
    p.add_argument("src", help="COCO instances json, e.g. instances_train2017.json")
    p.add_argument("dst", help="output json")
    p.add_argument("--images", type=int, required=True, help="number of images to keep")
    p.add_argument("--seed", type=int, default=0)


def _default_output_dir(args: argparse.Namespace) -> str | None:
    if args.output_dir or "OUTPUT_DIR" in (args.opts or []):
        return args.output_dir
    stem = Path(args.config).stem if getattr(args, "config", None) else "run"
    if args.checkpoint and Path(args.checkpoint).is_file():
        return str(RunDir.from_checkpoint(args.checkpoint).root / "transfer" / stem)
    return str(_outside_source_tree(Path("runs") / "transfer" / stem))


def _outside_source_tree(path: Path) -> Path:
    """``path``, or ``~/loco-runs/...`` in its place when it would land inside loco's own
    source tree (a run started from the repository must not write into it)."""
    source = Path(__file__).resolve().parents[2]
    if (source / "pyproject.toml").is_file() and path.resolve().is_relative_to(source):
        return Path.home() / "loco-runs" / path.relative_to("runs")
    return path


def run(args: argparse.Namespace) -> int:
    if args.transfer_command == "subsample":
        from loco.transfer.datasets import subsample_coco

        stats = subsample_coco(args.src, args.dst, args.images, args.seed)
        print(
            f"{args.dst}: {stats['images']} images, {stats['annotations']} annotations (seed {args.seed})"
        )
        return 0

    from loco.transfer import require_detectron2

    require_detectron2()
    from loco.transfer.train import eval_main, train_main

    if args.opts and args.opts[0] == "--":
        args.opts = args.opts[1:]
    if args.transfer_command == "train":
        args.output_dir = _default_output_dir(args)
        log.info("output dir: %s", args.output_dir)
        rows = train_main(args)
    else:
        if not args.output_dir and args.weights and "OUTPUT_DIR" not in (args.opts or []):
            args.output_dir = str(Path(args.weights).resolve().parent)
        rows = eval_main(args)
    for row in rows:
        print(summary_line(row))
    return 0


def summary_line(row: dict) -> str:
    """``coco128-seg/instances_val2017 maskrcnn-segm: AP 1.23 AP50 ... (n/a: why)``, with
    the values and notes ``results.json`` and ``loco report`` show."""
    from loco.eval.results import LABELS, METRICS, MISSING, metric_text

    line = f"{row['dataset']} {row['protocol']}: " + "  ".join(
        f"{LABELS[k]} {metric_text(row, k)}" for k in METRICS["detection"]
    )
    notes = sorted(set((row.get("notes") or {}).values()))
    return line + (f"  ({MISSING}: {'; '.join(notes)})" if notes else "")
