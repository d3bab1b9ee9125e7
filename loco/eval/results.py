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
"""

from __future__ import annotations

import json
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
    "top1",
    "top5",
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


def make_row(**fields: Any) -> dict[str, Any]:
    """A results row: the required fields, defaults for the optional ones, extras kept."""
    missing = [k for k in REQUIRED if k not in fields]
    if missing:
        raise ValueError(f"results row lacks {', '.join(missing)}")
    row = {k: fields.pop(k) for k in REQUIRED}
    for key, default in OPTIONAL.items():
        row[key] = fields.pop(key, default)
    row.update(fields)
    row["top1"] = round(float(row["top1"]), 4)
    row["top5"] = round(float(row["top5"]), 4)
    row["stage"] = int(row["stage"])
    row.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%S"))
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
        tmp.write_text(json.dumps(merged, indent=1) + "\n")
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
    """Markdown table of rows, one line each."""
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
            f"{r['top1']:.2f}",
            f"{r['top5']:.2f}",
            str(r["dataset"]),
            str(r["n_train"]),
            str(r["n_val"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
