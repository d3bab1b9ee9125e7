"""Collecting what exists on disk: per-seed results, timings and bench ratios -> the
summary (mean ± std over seeds) that ``summary.json`` and the report show."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from loco.compare.plan import (
    FLOOR,
    LABELS,
    REFERENCE,
    base_config,
    checkpoint_step,
    commands,
    is_done,
    pretrain_config,
    run_dir,
    steps_of,
    variant,
)
from loco.config import load_config
from loco.rundir import RunDir, git_revision


# -- collecting what exists -----------------------------------------------------------------
def train_seconds(rd: Path) -> float | None:
    """Training wall time from metrics.jsonl (img/s of every logged interval; survives resumes)."""
    path, cfg_file = RunDir(rd).metrics, RunDir(rd).config
    if not path.is_file() or not cfg_file.is_file():
        return None
    batch = load_config(cfg_file).optim.batch_size
    total, prev = 0.0, 0
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("img_per_s"):
            total += (rec["step"] - prev) * batch / rec["img_per_s"]
            prev = rec["step"]
    return total or None


def loss_curves(rd: Path) -> dict[str, list[list[float]]]:
    """Per local loss, [step, value] of every logged interval (metrics.jsonl)."""
    path = RunDir(rd).metrics
    curves: dict[str, list[list[float]]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            for k, v in rec.items():
                if k.startswith("loss/"):
                    curves.setdefault(k, []).append([rec["step"], v])
    return curves


def logged_std(rd: Path) -> dict[str, float]:
    """Per-dimension embedding std metrics the trainer logged (the last value of each)."""
    path, out = RunDir(rd).metrics, {}
    if path.is_file():
        for line in path.read_text().splitlines():
            out.update({k: v for k, v in json.loads(line).items() if "std" in k.lower()})
    return out


def feature_spread(eval_dir: Path, val_per_class: int) -> dict[str, float] | None:
    """Collapse check from the cached eval features: the per-dimension std of the last
    stage's pooled val features after L2 normalisation, x sqrt(dim) (about 1 when the
    features spread like a uniform distribution on the sphere, 0 when they collapse to
    one point), its mean and the fraction of dimensions below 0.01 of that scale. The val
    features are the cache holding ``val_per_class`` images per class."""
    import numpy as np

    metas = sorted((eval_dir / "features").glob("*/meta.json"), key=lambda f: f.stat().st_mtime)
    val = [
        (f, m)
        for f in metas
        if (m := json.loads(f.read_text()))["data"]["per_class"] == val_per_class
    ]
    if not val:
        return None
    folder, meta = val[-1]
    last = max(meta.get("stages", {}), key=int, default=None)
    if last is None:
        return None
    x = np.load(folder.parent / meta["stages"][last]["file"]).astype(np.float64)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    std = x.std(axis=0) * np.sqrt(x.shape[1])
    return {
        "stage": int(last),
        "dim": int(x.shape[1]),
        "mean": float(std.mean()),
        "dead": float((std < 0.01).mean()),
    }


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def collect_entry(args: argparse.Namespace, name: str) -> dict[str, Any]:
    seeds: dict[str, Any] = {}
    for seed in args.seeds:
        rd = run_dir(args, name, seed)
        rec: dict[str, Any] = {}
        done = rd / "eval" / "done.json"
        if done.is_file() and RunDir(rd / "eval").results.is_file():
            rec.update(json.loads(done.read_text()))
            for r in json.loads(RunDir(rd / "eval").results.read_text()):
                if r["protocol"] == "knn-dino" and r.get("k") == 20:
                    rec.setdefault("knn", {})[str(r["stage"])] = r["top1"]
                    rec["n_train"], rec["n_val"] = r["n_train"], r["n_val"]
                elif r["protocol"] == "linear-cached" and r.get("primary", True):
                    rec.setdefault("linear", {})[str(r["stage"])] = r["top1"]
                    rec.setdefault("linear_lr", {})[str(r["stage"])] = r["lr"]
        if name == REFERENCE and (rd / "done.json").is_file():
            ref = json.loads((rd / "done.json").read_text())
            rec["train_s"], rec["steps"] = ref["train_s"], ref["steps"]
        elif name != FLOOR and done.is_file():  # timings of finished runs only
            rec["train_s"] = train_seconds(rd)
            rec["steps"] = (
                checkpoint_step(RunDir(rd).checkpoint) if RunDir(rd).checkpoint.is_file() else None
            )
        if name != FLOOR and name != REFERENCE and done.is_file():
            rec["curves"] = loss_curves(rd)
            rec["logged_std"] = logged_std(rd)
        if done.is_file():
            rec["feature_spread"] = feature_spread(rd / "eval", args.eval_val_per_class)
        if rec.get("train_s") and rec.get("steps"):
            rec["s_per_step"] = rec["train_s"] / rec["steps"]
        if rec:
            seeds[str(seed)] = rec
    entry: dict[str, Any] = {"seeds": seeds, "n": 0}
    for readout in ("knn", "linear"):
        stages = sorted({s for r in seeds.values() for s in r.get(readout, {})}, key=int)
        for s in stages:
            vals = [r[readout][s] for r in seeds.values() if s in r.get(readout, {})]
            m, sd = _mean_std(vals)
            entry.setdefault(readout, {})[s] = {"mean": m, "std": sd, "n": len(vals)}
            entry["n"] = max(entry["n"], len(vals))
    for key in ("train_s", "s_per_step", "eval_s", "own_knn_top1"):
        vals = [r[key] for r in seeds.values() if r.get(key) is not None]
        m, sd = _mean_std(vals)
        if m is not None:
            # min: timings only grow with other load on the machine, so the fastest seed is
            # the closest to the method's own cost
            entry[key] = {"mean": m, "std": sd, "min": min(vals)}
    return entry


def collect_bench(args: argparse.Namespace) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for name in dict.fromkeys(["e2e", *args.methods]):
        path = args.out / "bench" / f"{name}.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        method = pretrain_config(args, name, 0).method.name
        row = next((r for r in data["rows"] if r["method"] == method), None)
        if row:
            keys = (
                "flops",
                "flops_decoder",
                "saved_peak",
                "live_peak",
                "params",
                "step_s",
                "cpu_s",
            )
            rows[name] = {k: row.get(k) for k in keys}
            rows[name]["batch"] = data["batch"]
            # the bench's own throughput ratios: against the e2e timed in the same process
            timed = {"step_s": "img_per_s", "cpu_s": "img_per_cpu_s"}
            rows[name]["time_ratios"] = {
                k: 1 / row["ratios"][q] for k, q in timed.items() if row["ratios"].get(q)
            }
    base = rows.get("e2e")
    for row in rows.values():
        if base:
            row["ratios"] = {
                k: row[k] / base[k] for k in ("flops", "saved_peak", "live_peak") if base[k]
            }
            row["ratios"].update(row.pop("time_ratios"))
    return rows


def collect(
    args: argparse.Namespace, all_jobs: list[tuple[str, str, int | None]]
) -> dict[str, Any]:
    names = [
        *([] if args.no_floor else [FLOOR]),
        *args.methods,
        *([] if args.no_reference else [REFERENCE]),
    ]
    cfg = base_config(args, args.seeds[0])
    done = sum(is_done(args, *j) for j in all_jobs)
    steps = {n: steps_of(args, n, args.seeds[0]) for n in names if n != FLOOR}
    return {
        "section": args.section.name,
        "status": {
            "jobs_done": done,
            "jobs": len(all_jobs),
            "complete": done == len(all_jobs),
            "time": time.strftime("%Y-%m-%d %H:%M"),
        },
        "environment": {
            "git": git_revision(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "protocol": {
            "dataset": cfg.data.dataset,
            "image_size": cfg.data.image_size,
            "per_class": cfg.data.per_class,
            "backbone": cfg.model.backbone,
            "model_kwargs": cfg.model.kwargs,
            "batch": cfg.optim.batch_size,
            "optimizer": cfg.optim.name,
            "base_lr": cfg.optim.base_lr,
            "weight_decay": cfg.optim.weight_decay,
            "warmup_epochs": cfg.optim.warmup_epochs,
            "temperature": cfg.method.temperature,
            "steps": steps,
            "seeds": args.seeds,
            "eval_train_per_class": args.eval_train_per_class,
            "eval_val_per_class": args.eval_val_per_class,
            "eval_batch": args.eval_batch,
            "linear_epochs": args.linear_epochs,
            "bench_batch": args.bench_batch,
            "overrides": args.overrides,
        },
        "methods": {
            n: {
                "label": LABELS.get(n, n),
                "about": variant(args, n).about,
                "runs": str(run_dir(args, n, args.seeds[0]).parent.parent),  # its section's folder
                **collect_entry(args, n),
                "commands": {str(s): commands(args, n, s) for s in args.seeds},
            }
            for n in names
        },
        "bench": collect_bench(args),
        "command": args.display,
        "out": str(args.out),
    }
