"""``loco report RUN_DIRS...``: merge the ``results.json`` of several runs into one table.

Classification rows (kNN, linear): one line per (run, method, protocol, k/lr), one column
per stage with top-1 (top-5), in markdown. Detection rows (``loco transfer``): a second
table, one line per (run, method, dataset, task) with the six COCO APs. A metric stored
as null shows as ``n/a``, its note listed under the table. ``--plot`` adds a PNG bar
chart of top-1 per stage, one bar per method, one panel per protocol (classification
rows; matplotlib, Agg backend: no display needed).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loco.errors import LocoError
from loco.eval.results import (
    LABELS,
    METRICS,
    MISSING,
    metric_family,
    metric_text,
    param_text,
    read_results,
)
from loco.rundir import RunDir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run dirs (or results.json files)"
    )
    parser.add_argument("--out", help="also write the markdown table to this file")
    parser.add_argument("--plot", help="PNG bar chart of top-1 per stage per method")
    parser.add_argument(
        "--protocol", action="append", help="only these protocols (repeatable), e.g. knn-dino"
    )
    parser.add_argument(
        "--all", action="store_true", help="every k / lr, not only each protocol's headline"
    )
    e = parser.add_argument_group(
        "embedding plot", "2-D picture of the val features instead of a table"
    )
    e.add_argument(
        "--embedding",
        action="store_true",
        help="draw RUN_DIRs' val features in 2-D, coloured by class (one panel per run; "
        "PNG at --plot or RUN/embedding_<projection>.png)",
    )
    e.add_argument("--stage", default="last", help="stage to draw: N, last (default) or all")
    e.add_argument("--projection", default="tsne", choices=("tsne", "umap"))
    e.add_argument("--per-class", type=int, default=100, help="val images per class (100)")


def load_runs(runs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Rows of every run, each tagged with ``run`` (its directory name).

    Folders without a ``results.json`` (a sweep's ``slurm/`` matched by ``SWEEP/*/``, a task
    not evaluated yet) are skipped with one note; an error only when no run is left."""
    skipped = [str(r) for r in runs if Path(r).is_dir() and not RunDir(r).results.is_file()]
    if skipped:
        print(
            f"note: skipped {len(skipped)} folder(s) without results.json: {', '.join(skipped)}",
            file=sys.stderr,
        )
        if len(skipped) == len(runs):
            raise LocoError(f"no results.json in {', '.join(skipped)}; run `loco eval` first")
    rows = []
    for run in (r for r in runs if str(r) not in skipped):
        path = Path(run)
        label = path.parent.name if path == RunDir(path.parent).results else path.name
        for r in read_results(path):
            rows.append({**r, "run": label})
    return rows


def _select(
    rows: list[dict[str, Any]], protocols: Sequence[str] | None, all_rows: bool
) -> list[dict[str, Any]]:
    out = [
        r
        for r in rows
        if (all_rows or r.get("primary", True)) and (not protocols or r["protocol"] in protocols)
    ]
    if not out:
        raise LocoError(
            f"no results match protocol(s) {', '.join(protocols or [])}; "
            f"present: {', '.join(sorted({r['protocol'] for r in rows}))}"
        )
    return out


def _groups(rows: list[dict[str, Any]]) -> dict[tuple, dict[int, dict[str, Any]]]:
    """(run, method, backbone, dataset, protocol, k/lr) -> stage -> row."""
    groups: dict[tuple, dict[int, dict[str, Any]]] = {}
    for r in rows:
        param = "" if r.get("lr") is not None and r.get("k") is None else param_text(r)
        key = (r["run"], r["method"], r["backbone"], r["dataset"], r["protocol"], param)
        groups.setdefault(key, {})[int(r["stage"])] = r
    return groups


def _notes(rows: list[dict[str, Any]]) -> list[str]:
    """One line per distinct reason a shown metric is missing."""
    seen: dict[str, list[str]] = {}
    for r in rows:
        by_note: dict[str, list[str]] = {}
        for key, note in (r.get("notes") or {}).items():
            by_note.setdefault(note, []).append(key)
        for note, keys in by_note.items():
            every = set(keys) == set(METRICS[metric_family(r)])
            which = "all metrics" if every else ", ".join(LABELS.get(k, k) for k in keys)
            seen.setdefault(note, []).append(f"{r['run']} {r['protocol']}: {which}")
    return [f"{MISSING}: {note} ({'; '.join(where)})" for note, where in seen.items()]


def report_table(rows: list[dict[str, Any]]) -> str:
    """The classification table, then the detection table, then notes on missing values."""
    by_family: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_family.setdefault(metric_family(r), []).append(r)
    parts = []
    if "classification" in by_family:
        parts.append(classification_table(by_family["classification"]))
    if "detection" in by_family:
        parts.append(detection_table(by_family["detection"]))
    notes = _notes(rows)
    return "\n\n".join(parts + (["\n".join(notes)] if notes else []))


def detection_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: a line per (run, method, dataset, task) with AP, AP50 ... APl."""
    keys = METRICS["detection"]
    head = ["run", "method", "backbone", "dataset", "protocol", "setting", "iterations"]
    head += [LABELS[k] for k in keys] + ["n_train"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r["protocol"], r["run"], r["method"], r["dataset"])):
        info = [r.get(k) for k in (*head[:5], "setting", "iterations")]
        cells = ["" if v is None else str(v) for v in info]
        n_train = r.get("n_train")  # None: an evaluation without the training set on disk
        cells += [metric_text(r, k) for k in keys] + ["" if n_train is None else str(n_train)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def classification_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: a line per (run, method, protocol, k), a column per stage: top-1 (top-5).

    Linear rows list the chosen lr inside the cell, since each stage picks its own.
    """
    groups = _groups(rows)
    stages = sorted({s for g in groups.values() for s in g})
    head = [
        "run",
        "method",
        "backbone",
        "dataset",
        "protocol",
        "k",
        *[f"S{s} top-1 (top-5)" for s in stages],
        "n_train",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(groups, key=lambda k: (k[4], k[5], k[0], k[1])):
        by_stage = groups[key]
        cells = list(key)
        for s in stages:
            r = by_stage.get(s)
            if r is None:
                cells.append("")
                continue
            cell = f"{metric_text(r, 'top1')} ({metric_text(r, 'top5')})"
            if r.get("lr") is not None and r.get("k") is None:
                cell += f" lr={r['lr']:g}"
            cells.append(cell)
        cells.append(str(max(r["n_train"] for r in by_stage.values())))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_results(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Bar chart: one panel per protocol, stages on x, one bar per (run, method)."""
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups([r for r in rows if metric_family(r) == "classification"])
    if not groups:
        raise LocoError("--plot draws top-1 of kNN/linear rows; these runs have none")
    protocols = sorted({(k[4], k[5]) for k in groups})
    ncols = min(3, len(protocols))
    nrows = -(-len(protocols) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.8 * nrows), squeeze=False)
    names = sorted({(k[0], k[1]) for k in groups})  # (run, method): one colour each
    runs_per_method: dict[str, set[str]] = {}
    for run, method in names:
        runs_per_method.setdefault(method, set()).add(run)
    colors = plt.get_cmap("tab10")
    for ax, (protocol, param) in zip(axes.flat, protocols):
        members = {(k[0], k[1]): k for k in groups if (k[4], k[5]) == (protocol, param)}
        present = [n for n in names if n in members]
        stages = sorted({s for k in members.values() for s in groups[k]})
        width = 0.8 / len(present)
        for i, name in enumerate(present):
            by_stage = groups[members[name]]
            run, method = name
            label = method if len(runs_per_method[method]) == 1 else f"{method} ({run})"
            offset = (i - (len(present) - 1) / 2) * width
            shown = [(j, by_stage[s]["top1"]) for j, s in enumerate(stages) if s in by_stage]
            xs = [j + offset for j, top1 in shown if top1 is not None]  # null: no bar
            ys = [top1 for _, top1 in shown if top1 is not None]
            ax.bar(xs, ys, width, label=label, color=colors(names.index(name) % 10))
        ax.set_xticks(range(len(stages)), [f"S{s}" for s in stages])
        ax.set_title(f"{protocol} {param}".strip())
        ax.set_ylabel("top-1 (%)")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(protocols) :]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    if args.embedding:
        from loco.eval.embedding import embedding_report

        path, drawn = embedding_report(
            args.runs,
            args.plot,
            stage=args.stage,
            projection=args.projection,
            per_class=args.per_class,
        )
        print(f"embedding ({sum(drawn.values())} points in {len(drawn)} panels): {path}")
        return 0
    rows = _select(load_runs(args.runs), args.protocol, args.all)
    table = report_table(rows)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")
        print(f"\ntable: {args.out}")
    if args.plot:
        print(f"plot: {plot_results(rows, args.plot)}")
    return 0
