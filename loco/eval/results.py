"""``results.json``: one row per (stage, protocol, k or chosen lr) of an evaluation.

Every evaluation writes its rows into the run directory's ``results.json``; rows of the
same identity (method, checkpoint, dataset, protocol, stage, k) are replaced, every other
row is kept, so kNN and linear evaluations run at different times end in one file. The
file is rewritten atomically under a lock, so two evaluations of one run may finish at
the same moment without losing rows.

A row::

    {"method": "loco", "backbone": "resnet50", "stage": 4, "protocol": "knn-dino",
     "k": 20, "temperature": 0.07, "lr": null, "top1": 67.1, "top5": 85.0,
     "primary": true, "dataset": "imagenet", "checkpoint": "3fa2c1...", "step": 500400,
     "n_train": 1281167, "n_val": 50000, ...}

``top1``/``top5`` are percentages. ``primary`` marks the row a protocol reports as its
headline (kNN: the protocol's default k; linear: the head chosen on held-out data);
``loco report`` shows those unless asked for all.

A row carries one family of metrics (:data:`METRICS`): classification (``top1, top5``) or
detection (``ap, ap50, ap75, aps, apm, apl``: COCO AP in percent, ``maskrcnn-bbox`` /
``maskrcnn-segm`` rows of ``loco transfer``). A metric that could not be computed (no
detection at all; no object of a size range in the val set) is ``null``, and
``notes[metric]`` says why: the file is strict JSON (no NaN), and every reader shows
:data:`MISSING` with that note. Detection rows written before this schema (AP copied
into ``top1``, AP50 into ``top5``) are read as detection rows; they stored 0.0 where AP
could not be computed, which cannot be told apart from a real 0 any more.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from loco.errors import LocoError
from loco.filelock import locked
from loco.rundir import RunDir

REQUIRED = (
    "method",
    "backbone",
    "stage",
    "protocol",
    "dataset",
    "checkpoint",
    "n_train",
    "n_val",
)
OPTIONAL = {
    "k": None,
    "temperature": None,
    "lr": None,
    "epochs": None,
    "primary": True,
    "step": None,
}
IDENTITY = ("method", "checkpoint", "dataset", "protocol", "stage", "k")
# metric family -> its keys in a row (percentages); a row holds exactly one family
METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("top1", "top5"),
    "detection": ("ap", "ap50", "ap75", "aps", "apm", "apl"),
}
LABELS = {
    "top1": "top-1",
    "top5": "top-5",
    "ap": "AP",
    "ap50": "AP50",
    "ap75": "AP75",
    "aps": "APs",
    "apm": "APm",
    "apl": "APl",
}
MISSING = "n/a"  # how every reader shows a metric stored as null


def metric_family(row: dict[str, Any]) -> str:
    """``classification`` or ``detection``: the metric keys the row holds."""
    for family, keys in METRICS.items():
        if all(k in row for k in keys):
            return family
    raise ValueError(f"results row holds no complete metric family: {sorted(row)}")


def _metric(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else round(value, 4)


def make_row(**fields: Any) -> dict[str, Any]:
    """A results row: the required fields, one metric family, optional defaults, extras kept.

    A NaN metric becomes ``None``; every ``None`` metric needs its reason in ``notes``.
    """
    missing = [k for k in REQUIRED if k not in fields]
    if missing:
        raise ValueError(f"results row lacks {', '.join(missing)}")
    row = {k: fields.pop(k) for k in REQUIRED}
    for key, default in OPTIONAL.items():
        row[key] = fields.pop(key, default)
    row.update(fields)
    keys = METRICS[metric_family(row)]
    for key in keys:
        row[key] = _metric(row[key])
    notes = {k: str(v) for k, v in (row.pop("notes", None) or {}).items()}
    unexplained = [k for k in keys if row[k] is None and k not in notes]
    if unexplained:
        raise ValueError(f"results row has no value and no note for {', '.join(unexplained)}")
    if notes:
        row["notes"] = notes
    row["stage"] = int(row["stage"])
    row.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%S"))
    return row


def metric_text(row: dict[str, Any], key: str) -> str:
    """A metric as every reader shows it: ``34.56``, or :data:`MISSING` when stored null."""
    value = row.get(key)
    return MISSING if value is None else f"{value:.2f}"


def _upgrade(row: dict[str, Any]) -> dict[str, Any]:
    """A detection row of the old schema (AP in ``top1``, AP50 in ``top5``) in the new one."""
    if "ap" in row and str(row.get("protocol", "")).startswith("maskrcnn-"):
        return {k: v for k, v in row.items() if k not in ("top1", "top5", "metric_names")}
    return row


def identity(row: dict[str, Any]) -> tuple:
    return tuple(row.get(k) for k in IDENTITY)


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``results.json`` (a file, or a run directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = RunDir(path).results
    if not path.is_file():
        raise LocoError(f"no results at '{path}'; run `loco eval` on that run first")
    try:
        rows = json.loads(path.read_text())
    except ValueError as exc:
        raise LocoError(
            f"'{path}' is not valid JSON ({exc}); delete it and re-run `loco eval`"
        ) from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise LocoError(f"'{path}' is not a list of result rows; delete it and re-run `loco eval`")
    rows = [_upgrade(r) for r in rows]
    for n, row in enumerate(rows):
        if not any(all(k in row for k in keys) for keys in METRICS.values()):
            raise LocoError(
                f"'{path}' row {n} holds neither {'/'.join(METRICS['classification'])} nor "
                f"{'/'.join(METRICS['detection'])}; delete it and re-run the evaluation"
            )
    return rows


def write_results(run_dir: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Merge ``rows`` into ``run_dir/results.json`` (same identity: replaced) atomically."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = RunDir(run_dir).results
    with locked(RunDir(run_dir).results_lock):
        old = read_results(path) if path.is_file() else []
        new_ids = {identity(r) for r in rows}
        merged = [r for r in old if identity(r) not in new_ids] + list(rows)
        merged.sort(
            key=lambda r: (
                str(r.get("method")),
                str(r.get("protocol")),
                r.get("stage", 0),
                r.get("k") or 0,
            )
        )
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(merged, indent=1, allow_nan=False) + "\n")
        os.replace(tmp, path)
    return path


def param_text(row: dict[str, Any]) -> str:
    """The protocol's varying parameter: ``k=20`` for kNN, ``lr=0.1`` for linear probes."""
    if row.get("k") is not None:
        return f"k={row['k']}"
    if row.get("lr") is not None:
        return f"lr={row['lr']:g}"
    return ""


def format_table(rows: Iterable[dict[str, Any]]) -> str:
    """Markdown table of classification rows (``loco eval``), one line each."""
    head = [
        "method",
        "backbone",
        "stage",
        "protocol",
        "k/lr",
        "top-1",
        "top-5",
        "dataset",
        "n_train",
        "n_val",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            str(r["method"]),
            str(r["backbone"]),
            f"S{r['stage']}",
            str(r["protocol"]),
            param_text(r),
            metric_text(r, "top1"),
            metric_text(r, "top5"),
            str(r["dataset"]),
            str(r["n_train"]),
            str(r["n_val"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
