"""The small-scale comparison of docs/results.md: every method x seed, resumable.

For each seed: the random-init floor, then every method of ``configs/small/`` (pretrain with
``loco pretrain``'s code, then kNN + cached linear probe per stage with ``loco eval all``'s
code), then the independent SimCLR of ``tools/simclr_minimal.py``; before that, one
``loco bench`` per method for the FLOPs and activation-memory ratios. Finished work is
skipped, interrupted pretraining resumes from its last checkpoint (Ctrl-C saves one), and
after every job ``<out>/summary.json``, ``docs/results.md`` and ``docs/results_top1.png``
are rewritten from what exists on disk.

    python tools/compare.py                       # the full table (about an hour, 2 idle cores)
    python tools/compare.py --plan                # the jobs, their commands and an estimate
    python tools/compare.py --steps 2 --methods e2e,loco --seeds 0 \\
        --eval-train-per-class 3 --eval-val-per-class 2 --linear-epochs 2 --bench-batch 4 \\
        --out /tmp/smoke --docs /tmp/smoke data.per_class=2 optim.batch_size=8   # smoke run

``KEY=VALUE`` arguments override every pretraining config (e.g. a data root).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import time
from functools import cache
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loco import checkpoint as ckpt  # noqa: E402
from loco.config import Config, load_config  # noqa: E402
from loco.errors import LocoError  # noqa: E402
from loco.rundir import RunDir, git_revision  # noqa: E402

log = logging.getLogger("compare")

# name -> what it is; the order of the tables. Each is configs/small/<name>.yaml.
VARIANTS: dict[str, str] = {
    "e2e": "SimCLR end to end, SimCLR's head (pool, 2-layer MLP)",
    "e2e_deep": "SimCLR end to end, LoCo's decoder (residual conv block, pool, 2-layer MLP): the fair baseline",
    "greedy": "Greedy InfoMax: a loss per stage, gradients stopped at every stage boundary; LoCo's decoder",
    "loco": "LoCo: a loss per stage, each reaching its own stage and the one below; LoCo's decoder",
    "loco_no_s1": "LoCo without the S1 loss (the paper's Figure 1); LoCo's decoder",
    "infopro": "InfoPro: per stage reconstruction + contrastive loss, gradient-isolated; its own heads",
}
FLOOR = "random_init"
REFERENCE = "simclr_independent"
LABELS = {FLOOR: "random init (floor)", REFERENCE: "SimCLR, independent code"}
# cost per step relative to e2e (single-thread CPU seconds, measured on 3 steps); only
# for the ETA until a variant has its own measurement
COST_PRIOR = {
    "e2e": 1.0,
    "e2e_deep": 1.05,
    "greedy": 1.2,
    "loco": 1.15,
    "loco_no_s1": 1.15,
    "infopro": 2.5,
    REFERENCE: 1.0,
}
# seconds per e2e step (batch 128) on 2 idle cores, estimated on the loaded machine (see budget_text)
IDLE_E2E_S_PER_STEP = 1.0
IDLE_E2E_RANGE = (0.9, 1.9)
EVAL_S_GUESS, BENCH_S_GUESS = 45.0, 15.0
PAPER = """The LoCo paper (Xiong, Ren & Urtasun, NeurIPS 2020), ImageNet linear top-1, ResNet-50:
800 epochs: SimCLR 69.8, GIM 64.7, LoCo 69.5. 100 epochs (its Table 4): SimCLR 65.7 (67.1 with a
4-layer MLP head), GIM 60.9, LoCo 66.2 (67.5 with the 4-layer MLP). A reviewer objected that the
main table compares SimCLR with its plain head against LoCo with a deeper decoder."""


# -- arguments ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument(
        "--methods", default=",".join(VARIANTS), help="comma list of configs/small/<name>.yaml"
    )
    p.add_argument("--seeds", default="0,1", help="comma list of train.seed values (default 0,1)")
    p.add_argument(
        "--steps", type=int, help="override optim.max_steps of every config (smoke runs)"
    )
    p.add_argument(
        "--configs", default=str(ROOT / "configs" / "small"), help="folder of <method>.yaml"
    )
    p.add_argument(
        "--out", default="runs/compare", help="run folders and summary.json (default %(default)s)"
    )
    p.add_argument(
        "--docs", default=str(ROOT / "docs"), help="where results.md and results_top1.png go"
    )
    p.add_argument(
        "--eval-train-per-class", type=int, default=500, help="labelled train images per class"
    )
    p.add_argument("--eval-val-per-class", type=int, default=200, help="val images per class")
    p.add_argument(
        "--eval-batch", type=int, default=1024, help="eval forward and linear-probe batch"
    )
    p.add_argument("--linear-epochs", type=int, default=100, help="cached linear probe epochs")
    p.add_argument(
        "--bench-batch",
        type=int,
        default=32,
        help="batch of `loco bench` (ratios barely depend on it)",
    )
    p.add_argument(
        "--bench-steps",
        type=int,
        default=20,
        help="timed steps per method in the benchmark (median; e2e timed in the same process)",
    )
    p.add_argument("--no-bench", action="store_true", help="skip the FLOPs / memory benchmark")
    p.add_argument("--no-reference", action="store_true", help="skip the independent SimCLR")
    p.add_argument("--no-floor", action="store_true", help="skip the random-init evaluation")
    p.add_argument(
        "--plan", action="store_true", help="print the jobs, commands and estimate; run nothing"
    )
    p.add_argument(
        "--report-only", action="store_true", help="rewrite summary and docs from what exists"
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="loco's INFO logs (resolved configs etc.)"
    )
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="overrides for every pretraining config"
    )
    args = p.parse_args(argv)
    shown = [
        a
        for a in (sys.argv[1:] if argv is None else argv)
        if a not in ("--plan", "--report-only", "-v", "--verbose")
    ]
    args.display = " ".join(["python tools/compare.py", *(shlex.quote(a) for a in shown)])
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    args.out, args.configs, args.docs = Path(args.out), Path(args.configs), Path(args.docs)
    missing = [m for m in args.methods if not (args.configs / f"{m}.yaml").is_file()]
    if missing:
        p.error(f"no config for {', '.join(missing)} in {args.configs}")
    return args


# -- configs and paths ----------------------------------------------------------------------
def run_dir(args: argparse.Namespace, name: str, seed: int) -> Path:
    return args.out / name / f"seed{seed}"


def config_path(args: argparse.Namespace, name: str) -> Path:
    return args.configs / f"{name}.yaml"


def pretrain_overrides(args: argparse.Namespace, name: str, seed: int) -> list[str]:
    steps = [f"optim.max_steps={args.steps}"] if args.steps else []
    return [
        *args.overrides,
        *steps,
        f"train.seed={seed}",
        f"train.output_dir={run_dir(args, name, seed)}",
    ]


def pretrain_config(args: argparse.Namespace, name: str, seed: int) -> Config:
    return load_config(config_path(args, name), pretrain_overrides(args, name, seed))


def base_config(args: argparse.Namespace, seed: int) -> Config:
    """The shared protocol (architecture and data of the floor and the reference)."""
    path = args.configs / "base.yaml"
    steps = [f"optim.max_steps={args.steps}"] if args.steps else []
    return load_config(
        path if path.is_file() else config_path(args, args.methods[0]),
        [*args.overrides, *steps, f"train.seed={seed}"],
    )


def eval_flags(args: argparse.Namespace, seed: int) -> str:
    flags = (
        f"--seed {seed} --train-per-class {args.eval_train_per_class} "
        f"--val-per-class {args.eval_val_per_class} --batch-size {args.eval_batch}"
    )
    return flags + (f" --epochs {args.linear_epochs}" if args.linear_epochs != 100 else "")


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def commands(args: argparse.Namespace, name: str, seed: int) -> list[str]:
    """The shell commands that reproduce one row (what this script runs in-process)."""
    rd = _rel(run_dir(args, name, seed))
    user = " ".join(shlex.quote(o) for o in args.overrides)
    if name == FLOOR:
        return [
            f"loco eval all --random-init --config {_rel(args.configs / 'base.yaml')} {eval_flags(args, seed)} "
            f"--out {rd}/eval {user}".strip()
        ]
    if name == REFERENCE:
        s = reference_settings(args, seed)
        return [
            f"python tools/simclr_minimal.py --root {s.root} --train-split {s.train_split} --per-class {s.per_class} "
            f"--batch-size {s.batch_size} --steps {s.steps} --warmup-steps {s.warmup_steps} --seed {seed} --out {rd}",
            f"loco eval all --checkpoint {rd}/{REFERENCE}.pt --config {_rel(args.configs / 'base.yaml')} "
            f"{eval_flags(args, seed)} --out {rd}/eval {user}".strip(),
        ]
    extra = " ".join(shlex.quote(o) for o in pretrain_overrides(args, name, seed))
    return [
        f"loco pretrain --config {_rel(config_path(args, name))} {extra}",
        f"loco eval all --checkpoint {RunDir(rd).checkpoint} {eval_flags(args, seed)} --out {rd}/eval",
    ]


def bench_argv(args: argparse.Namespace, name: str) -> list[str]:
    cfg = pretrain_config(args, name, 0)
    return [
        "-c",
        str(config_path(args, name)),
        "--backbone",
        cfg.model.backbone,
        "--image-size",
        str(cfg.data.image_size),
        "--batch",
        str(args.bench_batch),
        "--methods",
        cfg.method.name,
        "--steps",
        str(args.bench_steps),
        "--out",
        str(args.out / "bench" / f"{name}.json"),
        *args.overrides,
    ]


def check_protocol(args: argparse.Namespace) -> None:
    """Refuse to mix budgets: ``<out>/protocol.json`` pins steps, eval sizes and configs."""
    current = {
        "eval_train_per_class": args.eval_train_per_class,
        "eval_val_per_class": args.eval_val_per_class,
        "eval_batch": args.eval_batch,
        "linear_epochs": args.linear_epochs,
        "bench_batch": args.bench_batch,
        "configs": {},
    }
    for name in args.methods:
        d = pretrain_config(args, name, 0).to_dict()
        d["train"].pop("output_dir")
        d["train"].pop("seed")
        current["configs"][name] = d
    path = args.out / "protocol.json"
    if path.is_file():
        old = json.loads(path.read_text())
        for key, value in current.items():
            if key == "configs":
                for name, d in value.items():
                    if name in old["configs"] and old["configs"][name] != d:
                        raise LocoError(
                            f"{args.out} holds '{name}' runs made with another config (steps, overrides or "
                            f"configs/small edited); use another --out or delete {args.out / name}"
                        )
                old["configs"].update(value)
            elif old.get(key) != value:
                raise LocoError(
                    f"{args.out} was made with {key}={old.get(key)}, not {value}; use another --out"
                )
        current = old
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(current, indent=1) + "\n")


# -- the independent reference ----------------------------------------------------------------
@cache
def simclr_minimal():
    spec = importlib.util.spec_from_file_location(
        "simclr_minimal", ROOT / "tools" / "simclr_minimal.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["simclr_minimal"] = module
    spec.loader.exec_module(module)
    return module


def reference_settings(args: argparse.Namespace, seed: int):
    """simclr_minimal.Settings equal to base.yaml: same data, model, head, optimizer, schedule."""
    from loco.data.shipped import resolve_data_root

    cfg = base_config(args, seed)
    d, o = cfg.data, cfg.optim
    root = resolve_data_root(d, splits=[d.train_split, d.val_split])
    counts = [len(os.listdir(c)) for c in (root / d.train_split).iterdir() if c.is_dir()]
    images = sum(min(n, d.per_class) if d.per_class else n for n in counts)
    per_epoch = images // o.batch_size
    steps = o.max_steps or o.epochs * per_epoch
    s = d.color_jitter_strength
    small = str(cfg.model.small_image).lower() == "true" or (
        cfg.model.small_image == "auto" and d.image_size <= 64
    )
    return simclr_minimal().Settings(
        root=str(root),
        train_split=d.train_split,
        val_split=d.val_split,
        per_class=d.per_class,
        image_size=d.image_size,
        backbone=cfg.model.backbone,
        model_kwargs=dict(cfg.model.kwargs),
        small_stem=small,
        hidden_dim=cfg.decoder.hidden_dim,
        out_dim=cfg.decoder.out_dim,
        temperature=cfg.method.temperature,
        batch_size=o.batch_size,
        steps=steps,
        warmup_steps=min(int(o.warmup_epochs * per_epoch), max(steps - 1, 0)),
        base_lr=o.base_lr,
        weight_decay=o.weight_decay,
        momentum=o.momentum,
        crop_scale_min=d.crop_scale_min,
        jitter=(0.4 * s, 0.4 * s, 0.4 * s, min(0.1 * s, 0.5)),
        jitter_prob=d.color_jitter_prob,
        grayscale_prob=d.grayscale_prob,
        mean=tuple(d.mean),
        std=tuple(d.std),
        seed=seed,
        num_workers=d.num_workers,
        out=str(run_dir(args, REFERENCE, seed)),
    )


# -- jobs -----------------------------------------------------------------------------------
def checkpoint_step(path: Path) -> int:
    return int(ckpt.load(path)["step"]) if path.is_file() else 0


def jobs(args: argparse.Namespace) -> list[tuple[str, str, int | None]]:
    """(kind, name, seed), in the order they run: benchmarks, then seed by seed."""
    out: list[tuple[str, str, int | None]] = []
    if not args.no_bench:
        out += [
            ("bench", name, None)
            for name in dict.fromkeys(["e2e", *args.methods])
            if config_path(args, name).is_file()
        ]
    for seed in args.seeds:
        if not args.no_floor:
            out.append(("eval", FLOOR, seed))
        for name in args.methods:
            out += [("pretrain", name, seed), ("eval", name, seed)]
        if not args.no_reference:
            out += [("pretrain", REFERENCE, seed), ("eval", REFERENCE, seed)]
    return out


def steps_of(args: argparse.Namespace, name: str, seed: int) -> int:
    if name == REFERENCE:
        return reference_settings(args, seed).steps
    cfg = pretrain_config(args, name, seed)
    if cfg.optim.max_steps:
        return cfg.optim.max_steps
    raise LocoError(f"configs/small/{name}.yaml: set optim.max_steps (the comparison counts steps)")


def is_done(args: argparse.Namespace, kind: str, name: str, seed: int | None) -> bool:
    if kind == "bench":
        return (args.out / "bench" / f"{name}.json").is_file()
    rd = run_dir(args, name, seed)
    if kind == "eval":
        return (rd / "eval" / "done.json").is_file()
    if name == REFERENCE:
        done = rd / "done.json"
        return done.is_file() and json.loads(done.read_text()).get("steps") == steps_of(
            args, name, seed
        )
    step, want = checkpoint_step(RunDir(rd).checkpoint), steps_of(args, name, seed)
    if step > want:
        raise LocoError(f"{rd} is at step {step}, past the {want} asked for; use another --out")
    return step == want


def run_job(args: argparse.Namespace, kind: str, name: str, seed: int | None) -> None:
    from loco.eval import evaluate_run
    from loco.train import pretrain

    rd = run_dir(args, name, seed) if seed is not None else None
    if kind == "bench":
        from loco import bench

        parser = argparse.ArgumentParser()
        bench.add_arguments(parser)
        bench.run(parser.parse_args(bench_argv(args, name)))
        return
    if kind == "pretrain" and name == REFERENCE:
        simclr_minimal().train(reference_settings(args, seed))
        return
    if kind == "pretrain":
        pretrain(pretrain_config(args, name, seed))
        return
    common = dict(
        knn=True,
        linear=True,
        train_per_class=args.eval_train_per_class,
        val_per_class=args.eval_val_per_class,
        seed=seed,
        batch_size=args.eval_batch,
        epochs=args.linear_epochs,
        progress=False,
    )
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if name == FLOOR:
        evaluate_run(base_config(args, seed), None, rd / "eval", **common)
    elif name == REFERENCE:
        weights = rd / f"{REFERENCE}.pt"
        evaluate_run(base_config(args, seed), weights, rd / "eval", **common)
        # the reference's own kNN (its own code, last stage) cross-checks loco's evaluation
        extra["own_knn_top1"] = simclr_minimal().knn_top1(
            reference_settings(args, seed),
            weights,
            args.eval_train_per_class,
            args.eval_val_per_class,
        )
    else:
        evaluate_run(None, RunDir(rd).checkpoint, rd / "eval", **common)
    done = {"eval_s": time.perf_counter() - t0, **extra}
    (rd / "eval" / "done.json").write_text(json.dumps(done, indent=1) + "\n")


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
                "about": VARIANTS.get(n, ""),
                **collect_entry(args, n),
                "commands": {str(s): commands(args, n, s) for s in args.seeds},
            }
            for n in names
        },
        "bench": collect_bench(args),
        "command": args.display,
    }


# -- ETA ------------------------------------------------------------------------------------
def estimate(
    args: argparse.Namespace, summary: dict[str, Any], kind: str, name: str, seed: int | None
) -> float:
    methods = summary["methods"]
    if kind == "bench":
        return BENCH_S_GUESS
    if kind == "eval":
        measured = [m["eval_s"]["mean"] for m in methods.values() if "eval_s" in m]
        return statistics.fmean(measured) if measured else EVAL_S_GUESS
    per_e2e = [
        m["s_per_step"]["mean"] / COST_PRIOR.get(n, 1.0)
        for n, m in methods.items()
        if "s_per_step" in m
    ]
    own = methods.get(name, {}).get("s_per_step")
    rate = (
        own["mean"]
        if own
        else COST_PRIOR.get(name, 1.0)
        * (statistics.median(per_e2e) if per_e2e else IDLE_E2E_S_PER_STEP)
    )
    rd = run_dir(args, name, seed)
    left = steps_of(args, name, seed) - (
        0 if name == REFERENCE else checkpoint_step(RunDir(rd).checkpoint)
    )
    return rate * left


def _t(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


# -- report ---------------------------------------------------------------------------------
def _cell(v: dict[str, Any] | None) -> str:
    if not v or v.get("mean") is None:
        return "-"
    return f"{v['mean']:.1f} ± {v['std']:.1f}" if v.get("std") is not None else f"{v['mean']:.1f}"


def _s4(
    summary: dict[str, Any], name: str, readout: str = "knn"
) -> tuple[float | None, float | None, int]:
    stages = summary["methods"].get(name, {}).get(readout, {})
    if not stages:
        return None, None, 0
    top = stages[max(stages, key=int)]
    return top["mean"], top["std"], top["n"]


def compare_sentence(summary: dict[str, Any], a: str, b: str, readout: str = "knn") -> str | None:
    ma, sa, na = _s4(summary, a, readout)
    mb, sb, nb = _s4(summary, b, readout)
    if ma is None or mb is None:
        return None
    diff = ma - mb
    p = summary["protocol"]
    n_val = p["eval_val_per_class"] * 10
    sampling = 100 * math.sqrt(max(mb, 1) / 100 * (1 - mb / 100) / max(n_val, 1))
    spread = math.sqrt((sa or 0) ** 2 + (sb or 0) ** 2)
    noise = max(spread, sampling)
    verdict = "within the noise" if abs(diff) <= 2 * noise else ("above" if diff > 0 else "below")
    seeds = f"{min(na, nb)} seed(s)"
    return (
        f"`{a}` {ma:.1f} vs `{b}` {mb:.1f}: {diff:+.1f} points ({verdict}; seed spread "
        f"{spread:.1f}, val sampling error ~{sampling:.1f}, {seeds})"
    )


def findings(summary: dict[str, Any]) -> list[str]:
    pairs = [
        (REFERENCE, "e2e", "the independent SimCLR against loco's e2e (is e2e correct?)"),
        ("e2e_deep", "e2e", "the deeper decoder on e2e (the reviewer's point)"),
        ("greedy", "e2e", "greedy against e2e"),
        ("greedy", "e2e_deep", "greedy against e2e with the same decoder"),
        ("loco", "e2e_deep", "LoCo against e2e with the same decoder (the fair comparison)"),
        ("loco", "e2e", "LoCo against e2e with SimCLR's head (the paper's main-table comparison)"),
        ("loco", "greedy", "LoCo against greedy (what the overlap buys)"),
        ("loco_no_s1", "loco", "dropping the S1 loss"),
        ("infopro", "greedy", "InfoPro against greedy (what reconstruction buys)"),
    ]
    out = []
    for a, b, what in pairs:
        for readout, label in (("knn", "kNN"), ("linear", "linear")):
            s = compare_sentence(summary, a, b, readout)
            if s:
                out.append(f"- {what}, last stage {label}: {s}.")
    floor, _, _ = _s4(summary, FLOOR)
    if floor is not None:
        below = [
            n
            for n in summary["methods"]
            if n != FLOOR and (_s4(summary, n)[0] or 1e9) <= floor + 1.0
        ]
        if below:
            out.append(
                f"- at or within 1 point of the random-init floor ({floor:.1f}) at the last stage (kNN): "
                + ", ".join(f"`{n}`" for n in below)
                + "."
            )
    ref = summary["methods"].get(REFERENCE, {})
    if "own_knn_top1" in ref:
        m, _, _ = _s4(summary, REFERENCE)
        out.append(
            f"- the independent SimCLR's own kNN code gives {ref['own_knn_top1']['mean']:.1f} on its last "
            f"stage, loco's evaluation {m:.1f} (different eval images of the same sizes; a cross-check "
            "of the kNN evaluation itself)."
        )
    return out


def _measured_budget(summary: dict[str, Any]) -> str | None:
    """The table's cost from its own runs (fastest seed of each job), once every job has one."""
    p, methods = summary["protocol"], summary["methods"]
    trained = [n for n in methods if n != FLOOR]
    if not trained or any("train_s" not in methods[n] for n in trained):
        return None
    if any("eval_s" not in m for m in methods.values()):
        return None
    seeds = len(p["seeds"])
    train_min = sum(methods[n]["train_s"]["min"] for n in trained) / 60
    eval_min = sum(m["eval_s"]["min"] for m in methods.values()) / 60
    bench_min = len(summary["bench"]) * BENCH_S_GUESS / 60
    slow = sum(
        max(r["train_s"] for r in methods[n]["seeds"].values() if r.get("train_s")) for n in trained
    )
    total = seeds * (train_min + eval_min) + bench_min
    return (
        f"Measured in these runs: one seed of every pretraining takes {train_min:.1f} min and its "
        f"{len(methods)} evaluations {eval_min:.1f} min (the fastest seed of each job, i.e. the one "
        f"least slowed by other load; {summary['environment']['threads']} threads), so the whole table "
        f"({seeds} seeds, plus ~{bench_min:.0f} min of benchmarks) takes about {total:.0f} min on 2 "
        f"idle cores. The slowest seeds' pretraining took {slow / 60:.1f} min ({slow / 60 / train_min:.1f}x): "
        "seed 0 ran while other jobs shared the machine (load 6-10); on a shared machine run it "
        "with `OMP_NUM_THREADS=1`, as OpenMP's "
        "threads otherwise wait for their descheduled siblings. `--plan` prints the estimate before "
        "running, from the timings of whatever has run."
    )


def budget_text(summary: dict[str, Any]) -> str:
    """How the default budget was sized, and what this protocol should cost on 2 idle cores."""
    p, names = summary["protocol"], list(summary["methods"])
    trained = [n for n in names if n != FLOOR]
    units = sum(COST_PRIOR.get(n, 1.0) * p["steps"][n] for n in trained) * len(p["seeds"])
    fixed = (len(names) * len(p["seeds"]) * EVAL_S_GUESS + len(trained) * BENCH_S_GUESS / 2) / 60
    lo, mid, hi = (
        units * r / 60 + fixed for r in (IDLE_E2E_RANGE[0], IDLE_E2E_S_PER_STEP, IDLE_E2E_RANGE[1])
    )
    measured = _measured_budget(summary)
    if measured:
        return measured
    return (
        "Sized on the 2-core CPU machine while four other engineers shared it (load average 6-10 on 2 "
        "cores). 3 training steps of `e2e` at batch 128 (two views, quarter-width ResNet-18, 32 px) took "
        "5.7 s wall each with torch's 2 threads but only 2.3 s wall (1.55 s CPU) with 1 thread: on a "
        "loaded machine each OpenMP thread waits for its descheduled sibling, so the 2-thread wall time "
        "says more about the load than about the work. In single-thread CPU time the other methods cost "
        "1.05x (`e2e_deep`), 1.2x (`greedy`), 1.15x (`loco`, `loco_no_s1`) and 2.5x (`infopro`) of e2e. "
        "On 2 idle cores one e2e step should take about 0.9-1.0 s (1.55 s of work over 2 cores at "
        "~85 % parallel efficiency); dividing the loaded 2-thread wall time by the nominal ~3x load "
        "gives a pessimistic 1.9 s. "
        f"This protocol is {units:.0f} e2e-step equivalents of pretraining plus "
        f"{len(names) * len(p['seeds'])} evaluations (~{EVAL_S_GUESS:.0f} s each: 7,000 images through "
        f"the network and 400 linear-probe steps) and the benchmark (~{fixed:.0f} min together): "
        f"about {mid:.0f} min on an idle 2-core machine ({lo:.0f} min at 0.9 s per e2e step, "
        f"{hi:.0f} min at the pessimistic 1.9 s). On a shared machine run it with `OMP_NUM_THREADS=1`. "
        "The cost table above records what the runs actually took; `--plan` prints the estimate "
        "before running."
    )


def render(summary: dict[str, Any], plot_name: str = "results_top1.png") -> str:
    st, p, env = summary["status"], summary["protocol"], summary["environment"]
    methods, bench = summary["methods"], summary["bench"]
    has_results = any(m.get("knn") for m in methods.values())
    steps = sorted(set(p["steps"].values()))
    steps_text = "/".join(str(s) for s in steps)
    lines = ["# Local learning at small scale: e2e, greedy, LoCo, InfoPro on CIFAR-10", ""]
    if not has_results:
        lines += [
            "> **NOT YET RUN.** This page is the template `tools/compare.py` fills in. No number below is",
            "> a measurement; the commands are the ones that will produce them. Run",
            "> `python tools/compare.py` (about an hour on 2 idle CPU cores) and it overwrites this file.",
            "",
        ]
    elif not st["complete"]:
        lines += [
            f"> **PARTIAL**: {st['jobs_done']} of {st['jobs']} jobs done ({st['time']}). Re-run the same",
            "> command to finish; missing cells are `-`.",
            "",
        ]
    else:
        lines += [f"Complete: {st['jobs']} jobs, {st['time']}.", ""]
    lines += [
        f"Generated by `{summary['command']}` (git {env['git']}, torch {env['torch']}, {env['threads']} threads "
        f"on {env['cpus']} CPUs). Every number comes from the shipped code and configs; do not edit by hand.",
        "",
        "## The question",
        "",
        PAPER,
        "",
        "Here every method gets the same data, network, augmentations, optimizer, schedule, batch and number of",
        "steps, and e2e runs twice: with SimCLR's own head (`e2e`) and with LoCo's decoder (`e2e_deep`, the",
        "reviewer's fair baseline). Greedy and LoCo use LoCo's decoder at every stage; InfoPro uses its own heads.",
        "",
        "## Protocol",
        "",
        "| | |",
        "|---|---|",
        f"| data | shipped CIFAR-10 train split, {p['image_size']} px, {p['per_class']} images per class "
        f"({p['per_class'] * 10}) drawn class-balanced with the run's seed |",
        f"| network | {p['backbone']} with the small-image stem (3x3 conv, no max-pool), "
        f"`model.kwargs={json.dumps(p['model_kwargs'])}`; stages S1 = stem+layer1, S2..S4 = layer2..4 |",
        "| augmentations | SimCLR: random resized crop (0.08-1), flip, colour jitter 0.4/0.4/0.4/0.1 (p 0.8), grayscale (p 0.2) |",
        f"| optimisation | {p['optimizer'].upper()}, lr {p['base_lr']} x batch/256, weight decay {p['weight_decay']}, "
        f"{p['warmup_epochs']} warm-up epochs then cosine, batch {p['batch']}, **{steps_text} steps**, "
        f"NT-Xent T={p['temperature']} |",
        f"| seeds | {', '.join(str(s) for s in p['seeds'])} (mean ± sample std over seeds) |",
        f"| readout | per stage, frozen, pooled features of {p['eval_train_per_class']} train / "
        f"{p['eval_val_per_class']} val images per class (drawn with the run's seed): kNN k=20, T=0.07 (DINO); "
        f"cached linear probe (BN + linear, SGD, {p['linear_epochs']} epochs, batch {p['eval_batch']}, lr chosen "
        "on 10 % held-out train from 0.01-3) |",
        "| floor | the same network at random initialisation (seed = run seed) |",
        "| reference | `tools/simclr_minimal.py`: SimCLR written without loco (own data subset, augmentations, "
        "head, NT-Xent, LARS, schedule, loop), same settings, evaluated by the same `loco eval` |",
        "",
    ]
    if p["overrides"]:
        lines += [f"Overrides on every config: `{' '.join(p['overrides'])}`.", ""]
    order = [n for n in methods]
    for readout, title in (
        ("knn", "kNN top-1 (%), k=20, T=0.07"),
        ("linear", "Linear probe top-1 (%), cached features"),
    ):
        lines += [
            f"## {title}",
            "",
            "| method | S1 | S2 | S3 | S4 | seeds |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for n in order:
            m = methods[n]
            cells = [_cell(m.get(readout, {}).get(str(s))) for s in range(1, 5)]
            lines.append(f"| `{n}` | " + " | ".join(cells) + f" | {m.get('n', 0)} |")
        lines.append("")
    if has_results:
        lines += [f"![top-1 per stage]({plot_name})", ""]
    lines += [
        "## Cost",
        "",
        f"FLOPs of one training step (forward + backward, decoders included) and the peak bytes of tensors "
        f"saved for backward, from `loco bench` at batch {p['bench_batch']} (both scale with the batch; the "
        "ratios barely do), as ratios to `e2e`; step time: the median of the bench's timed steps, "
        "as a ratio to e2e timed in the same process moments before (CPU time: the process's "
        "CPU seconds, less sensitive to other load); wall time of pretraining measured in the runs "
        f"(batch {p['batch']}, {env['threads']} threads), from the fastest seed of each method: "
        "other load on the machine only slows a run down, and the seeds did not all run on an "
        "idle machine (load at report time: "
        f"{', '.join(f'{x:.1f}' for x in env['load_avg']) if env['load_avg'] else 'n/a'}).",
        "",
        "| method | GFLOPs / step | FLOPs ×e2e | peak saved MiB | saved ×e2e | step time ×e2e "
        "(bench) | CPU time ×e2e (bench) | pretrain wall (min) | s / step | wall ×e2e |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    e2e_step = methods.get("e2e", {}).get("s_per_step", {}).get("min")
    for n in order:
        if n == FLOOR:
            continue
        b, m = bench.get(n), methods[n]
        r = (b or {}).get("ratios", {})
        cells = [
            f"{b['flops'] / 1e9:.2f}" if b else "-",
            f"{r['flops']:.2f}" if "flops" in r else "-",
            f"{b['saved_peak'] / 2**20:.1f}" if b else "-",
            f"{r['saved_peak']:.2f}" if "saved_peak" in r else "-",
            f"{r['step_s']:.2f}" if "step_s" in r else "-",
            f"{r['cpu_s']:.2f}" if "cpu_s" in r else "-",
            f"{m['train_s']['min'] / 60:.1f}" if "train_s" in m else "-",
            f"{m['s_per_step']['min']:.2f}" if "s_per_step" in m else "-",
            f"{m['s_per_step']['min'] / e2e_step:.2f}" if "s_per_step" in m and e2e_step else "-",
        ]
        lines.append(f"| `{n}` | " + " | ".join(cells) + " |")
    lines += ["", "The reference is not benchmarked (its step is e2e's).", ""]
    lines += ["## What the numbers say", ""]
    found = findings(summary) if has_results else []
    lines += found or ["(filled in from the measurements when the script has run)"]
    lines += [
        "",
        "Verdicts compare the gap with twice the larger of the seed spread and the binomial sampling error "
        'of the val accuracy; with two seeds the spread itself is uncertain, so a gap called "above" or '
        '"below" is a measurement at this budget, not a general claim.',
        "",
        "### Why this scale can disagree with the paper",
        "",
        "Reasons a result here may not carry over to the paper's setting; they are hypotheses to test with "
        "the full-scale configs below, not findings of this page.",
        "",
        f"- **Budget.** {steps_text} steps of batch {p['batch']} is about "
        f"{(steps[0] * p['batch']) / max(p['per_class'] * 10, 1):.1f} epochs of {p['per_class'] * 10:,} "
        "images, against 100-800 ImageNet epochs. This early, a network is still mostly learning "
        "low-level filters, which a stage-local loss may teach about as well as the global one; the gap "
        "between greedy and e2e in the paper may only open later in training.",
        "- **Depth.** Four stages of a quarter-width ResNet-18 on 32 px images: S4 sees 4x4 maps after 8 "
        "blocks. The information a local loss discards early (GIM's weakness that LoCo's overlap targets) "
        "may matter less in so shallow a network than in a ResNet-50 at 224 px.",
        "- **Decoder.** LoCo's decoder adds a stride-2 residual block before the MLP, which at S4 works "
        "on 4x4 maps; `e2e` against `e2e_deep` measures what it does to e2e here, and it need not be "
        "what it does at ImageNet scale.",
        f"- **Readout.** kNN on {p['eval_train_per_class'] * 10:,} labelled images and a linear probe on "
        "cached centre-crop features are cheaper and noisier than the paper's 100-epoch augmented linear "
        "probe on 1.28 M images; compare methods with each other within this page, not with the paper's "
        "absolute numbers.",
        "",
        "## Reproduce",
        "",
        "```bash",
        summary["command"],
        "```",
        "",
        "Runs land in `runs/compare/<method>/seed<N>/` (config.yaml, metrics.jsonl, checkpoint.pt, "
        "eval/results.json); `runs/compare/summary.json` holds every number of this page. Interrupt it at "
        "any time (Ctrl-C saves a checkpoint) and re-run the same command: finished runs are skipped, the "
        "interrupted one resumes. `--plan` prints the jobs, their commands and an estimate.",
        "",
        "Each row by hand (seed 0; seed 1 the same with `1`):",
        "",
        "```bash",
    ]
    for n in order:
        lines += [f"# {n}", *methods[n]["commands"][str(p["seeds"][0])]]
    lines += [
        "```",
        "",
        "Configs: `configs/small/base.yaml` (the shared protocol) and one file per method "
        "(`_base_: base.yaml`, changing only the method and, for every method but `e2e`/`infopro`, "
        "`decoder.conv_block: true`).",
        "",
        "## Budget",
        "",
        budget_text(summary),
        "",
        "## Full scale (configs provided, not run here)",
        "",
        "Nothing at these scales has been run for this page. The same comparison at larger scale:",
        "",
        "CIFAR-10, ResNet-18 (full width), 200 epochs, one GPU (`configs/cifar10_resnet18_gpu.yaml`, LoCo's "
        "decoder):",
        "",
        "```bash",
        "C=configs/cifar10_resnet18_gpu.yaml   # LoCo's decoder; add train.seed=1 for a second seed",
        "loco pretrain -c $C method.name=e2e decoder.conv_block=false train.output_dir=runs/c10_r18_e2e",
        "loco pretrain -c $C method.name=e2e train.output_dir=runs/c10_r18_e2e_deep",
        "for m in greedy loco infopro; do",
        "  loco pretrain -c $C method.name=$m train.output_dir=runs/c10_r18_$m",
        "done",
        "loco pretrain -c $C method.first_stage_loss=false train.output_dir=runs/c10_r18_loco_no_s1",
        "for m in e2e e2e_deep greedy loco loco_no_s1 infopro; do",
        "  loco eval all --checkpoint runs/c10_r18_$m/checkpoint.pt",
        "done",
        "loco report runs/c10_r18_* --out c10_r18.md --plot c10_r18.png",
        "```",
        "",
        "ImageNet, ResNet-50, batch 4096 on 32 GPUs (`loco submit` or `slurm/`), 100 and 800 epochs; the "
        "paper's numbers are in the first section:",
        "",
        "| method | 100 epochs | 800 epochs |",
        "|---|---|---|",
    ]
    imagenet = [
        (
            "e2e (SimCLR head)",
            "imagenet_resnet50_e2e_100ep.yaml",
            "imagenet_resnet50_e2e_800ep.yaml",
        ),
        (
            "e2e, LoCo's decoder",
            "imagenet_resnet50_e2e_deep_100ep.yaml",
            "imagenet_resnet50_e2e_deep_800ep.yaml",
        ),
        ("e2e, 4-layer MLP head (Table 4)", "imagenet_resnet50_e2e_mlp4_100ep.yaml", "-"),
        (
            "greedy (GIM)",
            "imagenet_resnet50_greedy_100ep.yaml",
            "imagenet_resnet50_greedy_800ep.yaml",
        ),
        ("loco", "imagenet_resnet50_loco_100ep.yaml", "imagenet_resnet50_loco_800ep.yaml"),
        ("loco, 4-layer MLP (Table 4)", "imagenet_resnet50_loco_mlp4_100ep.yaml", "-"),
        (
            "loco without the S1 loss",
            "imagenet_resnet50_loco_no_s1_100ep.yaml",
            "imagenet_resnet50_loco_no_s1_800ep.yaml",
        ),
        ("infopro", "imagenet_resnet50_infopro_100ep.yaml", "imagenet_resnet50_infopro_800ep.yaml"),
    ]
    for label, a, b in imagenet:
        lines.append(f"| {label} | `configs/{a}` | " + (f"`configs/{b}` |" if b != "-" else "- |"))
    lines += [
        "",
        "```bash",
        "loco submit --nodes 4 --gpus-per-node 8 pretrain --config configs/imagenet_resnet50_greedy_100ep.yaml",
        "loco eval linear --checkpoint runs/imagenet_r50_greedy_100ep/checkpoint.pt --protocol augmented",
        "```",
        "",
    ]
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> Path | None:
    methods = {n: m for n, m in summary["methods"].items() if m.get("knn")}
    if not methods:
        return None
    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = plt.get_cmap("tab10")
    for ax, (readout, title) in zip(
        axes, (("knn", "kNN (k=20, T=0.07)"), ("linear", "linear probe (cached)"))
    ):
        for i, (n, m) in enumerate(methods.items()):
            stages = sorted(m.get(readout, {}), key=int)
            if not stages:
                continue
            ys = [m[readout][s]["mean"] for s in stages]
            es = [m[readout][s]["std"] or 0 for s in stages]
            style = (
                {"linestyle": "--", "color": "gray"} if n == FLOOR else {"color": colors(i % 10)}
            )
            if n == REFERENCE:
                style["linestyle"] = ":"
            shift = (i - (len(methods) - 1) / 2) * 0.03  # keep error bars apart
            ax.errorbar(
                [int(s) + shift for s in stages],
                ys,
                yerr=es,
                marker="o",
                capsize=3,
                label=n,
                **style,
            )
        ax.set_title(title)
        ax.set_xticks([1, 2, 3, 4], ["S1", "S2", "S3", "S4"])
        ax.set_xlabel("stage")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (%)")
    axes[1].legend(fontsize=8, loc="best")
    p = summary["protocol"]
    fig.suptitle(
        f"CIFAR-10 32 px, {p['backbone']} quarter width, {'/'.join(map(str, sorted(set(p['steps'].values()))))} "
        f"steps x batch {p['batch']}; mean ± std over seeds {','.join(map(str, p['seeds']))}",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(
    args: argparse.Namespace, all_jobs: list[tuple[str, str, int | None]]
) -> dict[str, Any]:
    summary = collect(args, all_jobs)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, args.out / "summary.json")
    args.docs.mkdir(parents=True, exist_ok=True)
    plot(summary, args.docs / "results_top1.png")
    (args.docs / "results.md").write_text(render(summary))
    return summary


# -- main -----------------------------------------------------------------------------------
def describe(kind: str, name: str, seed: int | None) -> str:
    return f"{kind} {name}" + (f" seed {seed}" if seed is not None else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        check_protocol(args)
        all_jobs = jobs(args)
        if args.report_only:
            write_outputs(args, all_jobs)
            print(f"wrote {args.docs / 'results.md'} and {args.out / 'summary.json'}")
            return 0
        summary = collect(args, all_jobs)
        todo = [j for j in all_jobs if not is_done(args, *j)]
        total = sum(estimate(args, summary, *j) for j in todo)
        print(
            f"compare: {len(all_jobs)} jobs, {len(all_jobs) - len(todo)} done, {len(todo)} to run; "
            f"estimate {_t(total)} (idle 2-core guess until measured)",
            flush=True,
        )
        if args.plan:
            for kind, name, seed in all_jobs:
                state = (
                    "done"
                    if (kind, name, seed) not in todo
                    else f"~{_t(estimate(args, summary, kind, name, seed))}"
                )
                print(f"  {describe(kind, name, seed):<34} {state}")
            for name in summary["methods"]:
                print(
                    f"\n# {name}\n"
                    + "\n".join(summary["methods"][name]["commands"][str(args.seeds[0])])
                )
            return 0
        t_start = time.perf_counter()
        for i, job in enumerate(all_jobs, 1):
            desc = describe(*job)
            if is_done(args, *job):
                print(f"[{i}/{len(all_jobs)}] {desc}: done, skipped", flush=True)
                continue
            print(
                f"[{i}/{len(all_jobs)}] {desc} (~{_t(estimate(args, summary, *job))}) ...",
                flush=True,
            )
            t0 = time.perf_counter()
            try:
                run_job(args, *job)
            except Exception as exc:  # the benchmark is optional; a missing one leaves '-' cells
                if job[0] != "bench":
                    raise
                print(
                    f"[{i}/{len(all_jobs)}] {desc}: FAILED ({type(exc).__name__}: {exc}); cost cells stay empty",
                    flush=True,
                )
            gc.collect()
            summary = write_outputs(args, all_jobs)
            left = sum(estimate(args, summary, *j) for j in all_jobs[i:] if not is_done(args, *j))
            print(
                f"[{i}/{len(all_jobs)}] {desc}: {_t(time.perf_counter() - t0)}; elapsed "
                f"{_t(time.perf_counter() - t_start)}, ETA {_t(left)}",
                flush=True,
            )
        write_outputs(args, all_jobs)
        print(
            f"done: {args.docs / 'results.md'}, {args.docs / 'results_top1.png'}, {args.out / 'summary.json'}"
        )
        return 0
    except LocoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit) as exc:
        code = exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 130
        print(
            "\ninterrupted: re-run the same command to resume (finished jobs are skipped)",
            file=sys.stderr,
        )
        return code


if __name__ == "__main__":
    raise SystemExit(main())
