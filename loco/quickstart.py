"""``loco quickstart``: the README's first command, sized for a 2-core CPU.

Pretrains a quarter-width ResNet-18 (small-image stem) with LoCo on the shipped CIFAR-10
for a few minutes, then runs the kNN (DINO protocol) and cached linear probes on every
stage of the pretrained network *and* of the same network at random initialisation, and
prints one table. The random-init rows are the floor a pretraining method must beat.
Everything lands in ``runs/quickstart`` (re-running resumes or reuses what is there).
The pretraining config is ``loco/quickstart.yaml``, shipped with the package.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from loco.config import dump_yaml, load_config
from loco.rundir import RunDir

log = logging.getLogger("loco.quickstart")

CONFIG = Path(__file__).with_name("quickstart.yaml")  # the one quickstart config
EVAL_TRAIN_PER_CLASS = 500
EVAL_VAL_PER_CLASS = 200
LINEAR_EPOCHS = 30  # the cached probe's sweep; 100 in `loco eval linear`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="change the quickstart config (loco/quickstart.yaml), e.g. method.name=greedy optim.max_steps=100",
    )
    parser.add_argument(
        "--eval-train-per-class",
        type=int,
        default=EVAL_TRAIN_PER_CLASS,
        help="labelled training images per class for kNN / linear probes (default %(default)s)",
    )
    parser.add_argument(
        "--eval-val-per-class",
        type=int,
        default=EVAL_VAL_PER_CLASS,
        help="validation images per class (default %(default)s)",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )


def table(rows: list[dict[str, Any]]) -> str:
    """Stage x (network, protocol) top-1 table in markdown."""
    cols: list[tuple[str, str]] = []
    cells: dict[tuple[int, str, str], float] = {}
    for r in rows:
        if not r.get("primary"):  # k=20 for kNN, the held-out-chosen lr for linear
            continue
        proto = "kNN" if r["protocol"].startswith("knn") else "linear"
        col = (r["network"], proto)
        if col not in cols:
            cols.append(col)
        cells[(int(r["stage"]), *col)] = float(r["top1"])  # percent
    cols.sort(key=lambda c: (c[1], c[0] != "random init"))
    stages = sorted({s for s, _, _ in cells})
    head = "| stage | " + " | ".join(f"{proto} top-1, {net}" for net, proto in cols) + " |"
    sep = "|---|" + "---:|" * len(cols)
    body = [
        f"| S{s} | "
        + " | ".join(f"{cells[(s, *c)]:.1f}" if (s, *c) in cells else "-" for c in cols)
        + " |"
        for s in stages
    ]
    return "\n".join([head, sep, *body])


def run(args: argparse.Namespace) -> int:
    from loco.eval import evaluate_run
    from loco.train import pretrain

    cfg = load_config(CONFIG, list(args.overrides))
    if args.print_config:
        print(dump_yaml(cfg))
        return 0
    t0 = time.perf_counter()
    run_dir = pretrain(cfg)
    t_pre = time.perf_counter() - t0
    ckpt = RunDir(run_dir).checkpoint
    rows: list[dict[str, Any]] = []
    for name, path in (("random init", None), (f"{cfg.method.name} pretrained", ckpt)):
        log.info("evaluating %s", name)
        out = run_dir / ("eval_random_init" if path is None else "eval")
        for row in evaluate_run(
            cfg,
            path,
            out,
            knn=True,
            linear=True,
            train_per_class=args.eval_train_per_class,
            val_per_class=args.eval_val_per_class,
            epochs=LINEAR_EPOCHS,
            progress=cfg.train.progress,
        ):
            rows.append({**row, "network": name})
    t_all = time.perf_counter() - t0
    text = (
        f"## loco quickstart: {cfg.method.name}, {cfg.model.backbone} (quarter width), CIFAR-10 32 px\n\n"
        f"pretraining: {cfg.optim.max_steps} steps x batch {cfg.optim.batch_size} on "
        f"{cfg.data.per_class * 10} images ({t_pre / 60:.1f} min); eval: kNN k=20 T=0.07 (DINO) and "
        f"cached linear probe ({LINEAR_EPOCHS} epochs, 6 lrs chosen on held-out train) on {args.eval_train_per_class * 10} train / {args.eval_val_per_class * 10} "
        f"val images; total {t_all / 60:.1f} min\n\n{table(rows)}\n"
    )
    (Path(run_dir) / "quickstart.md").write_text(text)
    print("\n" + text)
    print(
        f"results: {RunDir(run_dir / 'eval').results}, {RunDir(run_dir / 'eval_random_init').results}"
    )
    return 0
