"""Planning the comparison: the variants, arguments, configs and paths of each run, the
shell commands that reproduce it, the protocol pin, the job list and the ETA."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import sys
from functools import cache
from pathlib import Path
from typing import Any

from loco import checkpoint as ckpt
from loco.compare.sections import ORDER, SECTIONS, VARIANTS, Section, Variant
from loco.config import Config, load_config
from loco.errors import LocoError
from loco.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]
USAGE = Path(__file__).with_name("usage.txt").read_text()

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


# -- arguments ------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=USAGE.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=USAGE,
    )
    p.add_argument(
        "--section",
        default="methods",
        choices=[*ORDER, "all"],
        help="which part of docs/results.md to produce (default %(default)s; all: every "
        "section in the page's order)",
    )
    p.add_argument(
        "--methods",
        help="comma list of rows (default: the section's; for methods, configs/small/<name>.yaml "
        f"names, default {','.join(VARIANTS)})",
    )
    p.add_argument("--seeds", help="comma list of train.seed values (default: the section's, 0,1)")
    p.add_argument(
        "--steps", type=int, help="override optim.max_steps of every config (smoke runs)"
    )
    p.add_argument(
        "--configs", default=str(ROOT / "configs" / "small"), help="folder of <method>.yaml"
    )
    p.add_argument(
        "--runs",
        default="runs",
        help="parent of every section's runs folder (default %(default)s: runs/compare, "
        "runs/compare_presnet, ...); the objectives section reuses <runs>/compare's SimCLR runs",
    )
    p.add_argument(
        "--out",
        help="this section's run folders and summary.json (default <runs>/<its folder>, "
        "e.g. runs/compare)",
    )
    p.add_argument(
        "--docs",
        default=str(ROOT / "docs"),
        help="where results.md (one block per section) and the sections' plots go",
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
    for flag, what in (
        ("--no-bench", "skip the FLOPs / memory benchmark"),
        ("--no-reference", "skip the independent SimCLR"),
        ("--no-floor", "skip the random-init evaluation"),
    ):
        p.add_argument(
            flag, action="store_const", const=True, help=f"{what} (default: the section's)"
        )
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
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments of one section (``args.sections``: every section's, for ``all``)."""
    p = _parser()
    raw = p.parse_args(argv)
    given = list(sys.argv[1:] if argv is None else argv)
    if raw.section == "all":
        if raw.out or raw.methods:
            p.error("--section all takes no --out or --methods; --runs sets the parent folder")
        raw.sections = [
            for_section(p, raw, SECTIONS[name], [*given, "--section", name]) for name in ORDER
        ]
        return raw
    return for_section(p, raw, SECTIONS[raw.section], given)


def for_section(
    p: argparse.ArgumentParser, raw: argparse.Namespace, section: Section, given: list[str]
) -> argparse.Namespace:
    """The section's rows, seeds, overrides and folders, unless the command line sets them."""
    args = argparse.Namespace(**vars(raw))
    args.sections = None
    args.section = section
    shown = [
        a
        for i, a in enumerate(given)
        if a not in ("--plan", "--report-only", "-v", "--verbose")
        and not (a == "--section" and given[i + 1 : i + 2] == ["all"])
        and not (a == "all" and given[i - 1 : i] == ["--section"])
    ]
    if section.name == "methods":  # the historic command: no --section methods shown
        shown = [
            a
            for i, a in enumerate(shown)
            if not (a == "--section" and shown[i + 1 : i + 2] == ["methods"])
            and not (a == "methods" and shown[i - 1 : i] == ["--section"])
        ]
    args.display = " ".join(["python tools/compare.py", *(shlex.quote(a) for a in shown)])
    rows = {v.name: v for v in section.variants}
    args.methods = (
        [m.strip() for m in raw.methods.split(",") if m.strip()] if raw.methods else list(rows)
    )
    unknown = [m for m in args.methods if m not in rows and section.name != "methods"]
    if unknown:
        p.error(
            f"section {section.name} has no row {', '.join(unknown)}; its rows: {', '.join(rows)}"
        )
    args.variants = {m: rows.get(m, Variant(m, m)) for m in args.methods}
    args.seeds = [
        int(s) for s in str(raw.seeds or ",".join(map(str, section.seeds))).split(",") if s.strip()
    ]
    args.overrides = [*section.overrides, *raw.overrides]
    args.no_reference = raw.no_reference or not section.reference
    args.no_floor = raw.no_floor or not section.floor
    args.no_bench = raw.no_bench or not section.bench
    args.runs, args.configs, args.docs = Path(raw.runs), Path(raw.configs), Path(raw.docs)
    args.out = Path(raw.out) if raw.out else args.runs / section.folder
    args.homes = {name: args.runs / s.folder for name, s in SECTIONS.items()}
    args.homes[section.name] = args.out
    args.shared = {  # row -> the runs folder it lives in, when another section's
        m: args.homes[v.home] for m, v in args.variants.items() if v.home
    }
    if section.floor_home and not args.no_floor:
        args.shared[FLOOR] = args.homes[section.floor_home]
    missing = [m for m in args.methods if not config_path(args, m).is_file()]
    if missing:
        p.error(f"no config for {', '.join(missing)} in {args.configs}")
    return args


# -- configs and paths ----------------------------------------------------------------------
def variant(args: argparse.Namespace, name: str) -> Variant:
    return args.variants.get(name) or Variant(name, name)


def run_dir(args: argparse.Namespace, name: str, seed: int) -> Path:
    v = variant(args, name)
    return args.shared.get(name, args.out) / v.dir_name / f"seed{seed}"


def config_path(args: argparse.Namespace, name: str) -> Path:
    return args.configs / f"{variant(args, name).config}.yaml"


def pretrain_overrides(args: argparse.Namespace, name: str, seed: int) -> list[str]:
    steps = [f"optim.max_steps={args.steps}"] if args.steps else []
    return [
        *args.overrides,
        *variant(args, name).overrides,
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
    v = variant(args, name)
    extra = " ".join(shlex.quote(o) for o in pretrain_overrides(args, name, seed))
    launch = (
        f"OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node={v.processes} -m loco.cli pretrain"
        if v.processes > 1
        else "loco pretrain"
    )
    evals = "".join(f" {shlex.quote(o)}" for o in v.eval_overrides)
    return [
        f"{launch} --config {_rel(config_path(args, name))} {extra}",
        f"loco eval all --checkpoint {RunDir(rd).checkpoint} {eval_flags(args, seed)} --out {rd}/eval{evals}",
    ]


def torchrun_argv(args: argparse.Namespace, name: str, seed: int) -> list[str]:
    """A stage-parallel row's pretraining: torchrun, one CPU process per stage."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={variant(args, name).processes}",
        "-m",
        "loco.cli",
        "pretrain",
        "--config",
        str(config_path(args, name)),
        *pretrain_overrides(args, name, seed),
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


def _differences(old: Any, new: Any, default: Any, key: str = "") -> list[str]:
    """Dotted keys whose values differ; a key the pin lacks is no difference when it holds
    its default (a config key added to loco later does not change old runs' protocol)."""
    if isinstance(old, dict) and isinstance(new, dict):
        default = default if isinstance(default, dict) else {}
        out = []
        for k in sorted(set(old) | set(new)):
            sub = f"{key}.{k}" if key else k
            if k not in old and k in default and new[k] == default[k]:
                continue
            out += _differences(old.get(k), new.get(k), default.get(k), sub)
        return out
    return [] if old == new else [key]


def unavailable(args: argparse.Namespace, name: str) -> str | None:
    """Why a row's config does not load (e.g. a config key this loco does not have yet)."""
    cache = args.__dict__.setdefault("_unavailable", {})
    if name not in cache:
        try:
            pretrain_config(args, name, args.seeds[0])
            cache[name] = None
        except LocoError as exc:
            cache[name] = str(exc)
    return cache[name]


def check_protocol(args: argparse.Namespace) -> None:
    """Refuse to mix budgets: ``<out>/protocol.json`` pins steps, eval sizes and configs;
    rows living in another section's folder are checked against that folder's pin. With
    ``--plan``, rows whose config does not load are left out (the plan lists them)."""

    def rows(names: list[str]) -> list[str]:
        return [m for m in names if not (args.plan and unavailable(args, m))]

    _pin(args, args.out, rows([m for m in args.methods if m not in args.shared]))
    for root in dict.fromkeys(args.shared.values()):
        _pin(args, root, rows([m for m, r in args.shared.items() if r == root and m != FLOOR]))


def _pin(args: argparse.Namespace, out: Path, names: list[str]) -> None:
    current = {
        "eval_train_per_class": args.eval_train_per_class,
        "eval_val_per_class": args.eval_val_per_class,
        "eval_batch": args.eval_batch,
        "linear_epochs": args.linear_epochs,
        "bench_batch": args.bench_batch,
        "configs": {},
    }
    for name in names:
        try:
            d = pretrain_config(args, name, 0).to_dict()
        except LocoError as exc:
            v = variant(args, name)
            raise LocoError(
                f"row '{name}' of section {args.section.name} (configs/small/{v.config}.yaml "
                f"{' '.join(v.overrides)}): {exc}"
            ) from None
        d["train"].pop("output_dir")
        d["train"].pop("seed")
        current["configs"][variant(args, name).dir_name] = d
    path = out / "protocol.json"
    if path.is_file():
        old = json.loads(path.read_text())
        default = Config().to_dict()
        for key, value in current.items():
            if key == "configs":
                for name, d in value.items():
                    diff = _differences(old["configs"].get(name, d), d, default)
                    if diff:
                        raise LocoError(
                            f"{out} holds '{name}' runs made with another config (steps, overrides or "
                            f"configs/small edited: {', '.join(diff[:4])}); use another --out or "
                            f"delete {out / name}"
                        )
                    old["configs"].setdefault(name, d)
            elif old.get(key) != value:
                raise LocoError(
                    f"{out} was made with {key}={old.get(key)}, not {value}; use another --out"
                )
        current = old
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".protocol.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(current, indent=1) + "\n")
    os.replace(tmp, path)


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
            only = variant(args, name).seeds  # rows trained at some seeds only
            if only is None or seed in only:
                out += [("pretrain", name, seed), ("eval", name, seed)]
        if not args.no_reference:
            out += [("pretrain", REFERENCE, seed), ("eval", REFERENCE, seed)]
    return out


def steps_of(args: argparse.Namespace, name: str, seed: int) -> int:
    if name == REFERENCE:
        return reference_settings(args, seed).steps
    if name != FLOOR and unavailable(args, name):  # planned only: the section's budget
        return base_config(args, seed).optim.max_steps
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
    if name != REFERENCE and unavailable(args, name):
        return False
    if name == REFERENCE:
        done = rd / "done.json"
        return done.is_file() and json.loads(done.read_text()).get("steps") == steps_of(
            args, name, seed
        )
    step, want = checkpoint_step(RunDir(rd).checkpoint), steps_of(args, name, seed)
    if step > want:
        raise LocoError(f"{rd} is at step {step}, past the {want} asked for; use another --out")
    return step == want


# -- ETA ------------------------------------------------------------------------------------
def cost_of(args: argparse.Namespace, name: str) -> float:
    """A row's cost per step x e2e's, until measured: its own prior, else its config's."""
    v = variant(args, name)
    prior = v.cost or COST_PRIOR.get(name, COST_PRIOR.get(v.config, 1.0))
    return prior * args.section.cost_scale


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
        m["s_per_step"]["mean"] / cost_of(args, n) for n, m in methods.items() if "s_per_step" in m
    ]
    own = methods.get(name, {}).get("s_per_step")
    rate = (
        own["mean"]
        if own
        else cost_of(args, name) * (statistics.median(per_e2e) if per_e2e else IDLE_E2E_S_PER_STEP)
    )
    rd = run_dir(args, name, seed)
    left = steps_of(args, name, seed) - (
        0 if name == REFERENCE else checkpoint_step(RunDir(rd).checkpoint)
    )
    return rate * left


def _t(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
