"""``loco submit``: pretrain, eval or transfer as a Slurm job, through submitit.

    loco submit pretrain --config configs/imagenet_resnet50_loco_100ep.yaml \\
        --profile mycluster --nodes 4 --gpus-per-node 8 --time 72:00:00

One Slurm task per GPU (``--tasks-per-node`` defaults to ``--gpus-per-node``); each task runs
:class:`loco.launch.entry.LocoJob`, which brings up torch.distributed from the job environment
and requeues itself on timeout or preemption. Everything after the job name goes to
``loco JOB`` unchanged, except the submit options below (write the job's arguments after
``--`` to pass them verbatim). Defaults come from a cluster profile (``--profile NAME|PATH``
or ``$LOCO_SLURM_PROFILE``; ``slurm/profiles/*.yaml``); the command line overrides it.
``--sweep KEY=V1,V2`` submits one job array with an output dir per task. Job ids are recorded
in ``RUN_DIR/slurm/jobs.jsonl``, where ``loco jobs RUN_DIR`` finds them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import itertools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loco.config import _coerce, _suggest, read_yaml
from loco.errors import LocoError
from loco.rundir import RunDir, preflight

JOBS = ("pretrain", "eval", "transfer")
PROFILE_ENV = "LOCO_SLURM_PROFILE"
REPO_PROFILES = Path(__file__).resolve().parents[2] / "slurm" / "profiles"


@dataclass
class SlurmOptions:
    """What a profile or the command line can set; None = Slurm's (or the cluster's) default."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    time: str = "1:00:00"  # Slurm syntax: minutes, HH:MM:SS, D-HH:MM:SS
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # default: gpus_per_node, or 1 for a CPU job
    cpus_per_task: int | None = None
    mem_per_gpu: str | None = None  # e.g. 64G
    mem: str | None = None  # per node, e.g. 200G (CPU jobs)
    max_requeues: int = 5  # on timeout or preemption, all together
    signal_delay_s: int = 120  # USR2 this long before the time limit: finish a step, save
    max_parallel: int | None = None  # array tasks running at once (default: all)
    folder: str | None = None  # submitit's logs and pickles (default RUN_DIR/slurm/%j)
    job_name: str | None = None
    python: str | None = None  # interpreter command on the nodes (default: this one)
    setup: list[str] = field(default_factory=list)  # shell lines before srun
    srun_args: list[str] = field(default_factory=list)
    sbatch: dict[str, str] = field(default_factory=dict)  # any other #SBATCH flag

    def tasks(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1


KINDS = {f.name: f.type for f in dataclasses.fields(SlurmOptions)}


# -- profiles ------------------------------------------------------------------------------
# keys and values are checked by the config's own rules (loco.config), so that a profile and
# a config file fail the same way
HINTS = typing.get_type_hints(SlurmOptions)


def check_options(data: dict[str, Any], where: str) -> dict[str, Any]:
    """Validate profile keys and values; one-line errors naming the key and a fix."""
    out = {}
    for raw, value in data.items():
        key = str(raw).replace("-", "_")
        if key not in KINDS:
            raise LocoError(f"{where}: unknown key '{raw}'{_suggest(key, list(KINDS))}")
        out[key] = _coerce(value, HINTS[key], f"{where}: '{raw}'")
        if isinstance(out[key], int) and out[key] < 0:
            raise LocoError(f"{where}: '{raw}' must be >= 0, got {out[key]}")
        if isinstance(out[key], dict):
            out[key] = {str(k): str(v) for k, v in out[key].items()}
    if "time" in out:
        parse_time(out["time"], where)
    return out


def profile_dirs() -> list[Path]:
    return [Path("slurm/profiles"), REPO_PROFILES, Path("~/.config/loco/profiles").expanduser()]


def find_profile(name: str) -> Path:
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml") or os.sep in name:
        if not path.is_file():
            raise LocoError(f"profile file '{name}' not found")
        return path
    for d in profile_dirs():
        for suffix in (".yaml", ".yml"):
            if (d / f"{name}{suffix}").is_file():
                return d / f"{name}{suffix}"
    known = sorted({p.stem for d in profile_dirs() if d.is_dir() for p in d.glob("*.y*ml")})
    raise LocoError(
        f"profile '{name}' not found in {', '.join(str(d) for d in profile_dirs())}"
        f"{_suggest(name, known) if known else ''}; copy slurm/profiles/example.yaml"
    )


def load_profile(name: str) -> tuple[Path, dict[str, Any]]:
    path = find_profile(name)
    try:
        data = read_yaml(path)  # a profile may start from another: `_base_: other.yaml`
    except LocoError as exc:
        raise LocoError(f"profile: {exc}") from None
    return path, check_options(data, f"profile '{path}'")


def parse_time(text: str | int, where: str = "--time") -> int:
    """Slurm's time formats -> whole minutes (what submitit passes to ``#SBATCH --time``)."""
    s = str(text).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", s)
    if not m or s == "0":
        raise LocoError(f"{where}: '{text}' is not a Slurm time (minutes, HH:MM:SS or D-HH:MM:SS)")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # MM:SS
        seconds = a * 60 + b
    else:  # minutes
        seconds = a * 60
    return max(1, math.ceil(seconds / 60))


def resolve_options(args: argparse.Namespace) -> tuple[SlurmOptions, str | None]:
    """Built-in defaults <- profile <- command line; eval and transfer jobs get one task."""
    values: dict[str, Any] = {}
    profile = args.profile or os.environ.get(PROFILE_ENV)
    source = None
    if profile:
        path, values = load_profile(profile)
        source = str(path)
    cli = {k: getattr(args, k) for k in KINDS if getattr(args, k, None) not in (None, [], {})}
    values.update(check_options(cli, "command line"))
    opts = SlurmOptions(**values)
    parse_time(opts.time)
    if opts.nodes < 1:
        raise LocoError("--nodes must be at least 1")
    if getattr(args, "job", "pretrain") != "pretrain":
        single_task(args.job, opts, cli)
    return opts, source


def single_task(job: str, opts: SlurmOptions, cli: dict[str, Any]) -> None:
    """``loco eval`` runs in one process, ``loco transfer`` starts its own GPU processes
    (Detectron2's ``--num-gpus``): one Slurm task each, whatever a profile sets for
    pretraining (Slurm would run the whole job once per task)."""
    for key, flag in (("nodes", "--nodes"), ("tasks_per_node", "--tasks-per-node")):
        if (cli.get(key) or 1) > 1:
            raise LocoError(
                f"`loco submit {job}` runs one task on one node; drop {flag} {cli[key]}"
                + (
                    " (give `loco transfer` --num-gpus for several GPUs)"
                    if job == "transfer"
                    else ""
                )
            )
    opts.nodes = 1
    opts.tasks_per_node = 1


# -- command line --------------------------------------------------------------------------
def _add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("resources (defaults: the profile, then Slurm's)")
    g.add_argument(
        "--profile",
        help=f"cluster profile: NAME (slurm/profiles/NAME.yaml) or PATH; default ${PROFILE_ENV}",
    )
    g.add_argument("--nodes", type=int, help="nodes (default 1)")
    g.add_argument(
        "--gpus-per-node", type=int, help="GPUs per node; one task per GPU (default 0: a CPU job)"
    )
    g.add_argument(
        "--tasks-per-node", type=int, help="tasks per node (default: GPUs per node, or 1)"
    )
    g.add_argument(
        "--cpus-per-task", type=int, help="CPU cores per task (data loading workers + 1)"
    )
    g.add_argument("--mem-per-gpu", help="memory per GPU, e.g. 64G")
    g.add_argument("--mem", help="memory per node, e.g. 200G")
    g.add_argument("--partition", "-p", help="Slurm partition")
    g.add_argument(
        "--time", "-t", help="time limit: minutes, HH:MM:SS or D-HH:MM:SS (default 1:00:00)"
    )
    g.add_argument("--account", "-A", help="Slurm account")
    g.add_argument("--qos", help="quality of service")
    g.add_argument("--constraint", "-C", help="node features, e.g. a100")
    g.add_argument("--exclude", "-x", help="nodes to avoid, e.g. gpu[03,07]")
    j = p.add_argument_group("job")
    j.add_argument(
        "--max-requeues", type=int, help="requeues on timeout or preemption, at most (default 5)"
    )
    j.add_argument(
        "--signal-delay",
        dest="signal_delay_s",
        type=int,
        help="seconds between the USR2 warning and the time limit (default 120)",
    )
    j.add_argument("--job-name", help="Slurm job name (default loco-JOB-RUNDIR)")
    j.add_argument(
        "--folder", help="submitit folder for logs and pickles (default RUN_DIR/slurm/%%j)"
    )
    j.add_argument(
        "--sweep",
        action="append",
        metavar="KEY=V1,V2",
        help="one array task per value (repeat for a grid): a config key (optim.base_lr=0.1,0.3) or a flag of the job (epochs=50,100 -> --epochs)",
    )
    j.add_argument(
        "--sweep-file", help="YAML sweep: {key: [values]} (a grid) or a list of {key: value} points"
    )
    j.add_argument("--max-parallel", type=int, help="array tasks running at once (default all)")
    j.add_argument(
        "--stage-parallel",
        type=int,
        metavar="K",
        help="pretrain: one local module per task, K stages x (nodes x tasks per node / K) "
        "replicas (e.g. 4 GPUs per node = 4 stages, nodes = replicas); sets train.stage_parallel",
    )
    j.add_argument(
        "--dry-run",
        action="store_true",
        help="print the sbatch script and the resolved config; submit nothing",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", choices=JOBS, help="what to run: pretrain | eval | transfer")
    parser.add_argument(
        "job_args",
        nargs=argparse.REMAINDER,
        metavar="...",
        help="arguments of `loco JOB` (e.g. --config X key=value); put them after -- to pass them verbatim",
    )
    _add_options(parser)


def split_job_args(args: argparse.Namespace) -> list[str]:
    """Take the submit options mixed into the job's arguments; return the job's own."""
    rest = list(args.job_args or [])
    verbatim: list[str] = []
    if "--" in rest:
        i = rest.index("--")
        rest, verbatim = rest[:i], rest[i + 1 :]
    p = argparse.ArgumentParser(
        add_help=False, allow_abbrev=False, argument_default=argparse.SUPPRESS
    )
    _add_options(p)
    found, job_args = p.parse_known_args(rest)
    for key, value in vars(found).items():
        if key == "sweep":
            value = (getattr(args, "sweep", None) or []) + value
        setattr(args, key, value)
    return job_args + verbatim


# -- sweeps --------------------------------------------------------------------------------
def _split_values(text: str) -> list[str]:
    """``a,b,[1, 2],{x: 1, y: 2}`` -> four values (commas inside brackets stay)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return [v for v in out if v]


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | dict):
        return yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return str(value)


def sweep_points(items: list[str] | None, path: str | None) -> list[dict[str, str]]:
    """The grid of ``--sweep`` entries times the points of ``--sweep-file``; [{}] if none."""
    grid: list[tuple[str, list[str]]] = []
    for item in items or []:
        key, eq, values = item.partition("=")
        if not eq or not key or not _split_values(values):
            raise LocoError(f"--sweep '{item}' is not KEY=V1,V2,... (e.g. optim.base_lr=0.1,0.3)")
        grid.append((key.strip(), _split_values(values)))
    points = [dict(p) for p in itertools.product(*[[(k, v) for v in vs] for k, vs in grid])]
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError:
            raise LocoError(f"--sweep-file '{path}' not found") from None
        except yaml.YAMLError as exc:
            raise LocoError(
                f"--sweep-file '{path}' is not valid YAML: {exc}".splitlines()[0]
            ) from None
        if isinstance(data, dict):
            lists = [
                [(str(k), _text(v)) for v in (vs if isinstance(vs, list) else [vs])]
                for k, vs in data.items()
            ]
            extra = [dict(p) for p in itertools.product(*lists)]
        elif isinstance(data, list) and all(isinstance(d, dict) for d in data):
            extra = [{str(k): _text(v) for k, v in d.items()} for d in data]
        else:
            raise LocoError(
                f"--sweep-file '{path}': give {{key: [values]}} or a list of {{key: value}}"
            )
        points = [{**a, **b} for a in points for b in extra]
    return points


def point_tag(point: dict[str, str]) -> str:
    """A directory name for one sweep point, e.g. ``base_lr=0.1_temperature=0.2``."""
    leaves = [k.lstrip("-").split(".")[-1] for k in point]
    names = leaves if len(set(leaves)) == len(leaves) else [k.lstrip("-") for k in point]
    tag = "_".join(f"{n}={v}" for n, v in zip(names, point.values()))
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", tag).strip("-")[:120] or "task"


def _apply_point(argv: list[str], point: dict[str, str]) -> tuple[list[str], list[str]]:
    """(flags added to argv, config overrides) for one sweep point."""
    flags, overrides = [], []
    for key, value in point.items():
        if "." in key and not key.startswith("-"):
            overrides.append(f"{key}={value}")
        else:
            flags += ["--" + key.lstrip("-").replace("_", "-"), value]
    return flags, overrides


# -- the job(s) ----------------------------------------------------------------------------
@dataclass
class Task:
    run_dir: Path
    argv: list[str]  # `loco JOB ...` as it runs
    config: dict[str, Any] | None  # pretrain: the resolved config
    point: dict[str, str]


def _parse_job(job: str, argv: list[str]) -> argparse.Namespace:
    """The job's own parser (the one `loco JOB` uses) checks its arguments now, not in the queue."""
    from loco.cli import build_parser

    try:
        return build_parser(job).parse_args([job, *argv])
    except SystemExit as exc:
        raise LocoError(
            f"`loco {job} {shlex.join(argv)}` is not a valid command line (see above)"
        ) from exc


def _output_dir(job: str, ns: argparse.Namespace) -> Path | None:
    for dest in ("out", "output_dir", "output"):
        if getattr(ns, dest, None):
            return Path(getattr(ns, dest))
    if getattr(ns, "checkpoint", None):  # eval writes into the checkpoint's run by default
        return RunDir.from_checkpoint(ns.checkpoint).root
    return None


def build_tasks(job: str, argv: list[str], points: list[dict[str, str]]) -> tuple[Path, list[Task]]:
    """(the common output dir, one task per sweep point)."""
    from loco.config import load_config

    ns = _parse_job(job, argv)
    if job == "pretrain":
        base = Path(load_config(ns.config, ns.overrides).train.output_dir).resolve()
    else:
        found = _output_dir(job, ns)
        if found is None:
            raise LocoError(f"cannot tell where `loco {job}` writes: give it --out DIR")
        base = found.resolve()
    sweep = points != [{}]
    tags = [point_tag(p) for p in points]
    if len(set(tags)) != len(tags):
        tags = [f"{i:03d}_{t}" for i, t in enumerate(tags)]
    tasks = []
    for point, tag in zip(points, tags):
        run_dir = base / tag if sweep else base
        flags, overrides = _apply_point(argv, point)
        if job == "pretrain":
            overrides.append(f"train.output_dir={run_dir}")
            ns_task = _parse_job(job, [*argv, *flags]) if flags else ns
            cfg = load_config(ns_task.config, [*ns_task.overrides, *overrides])
            cfg.train.progress = False  # a progress bar floods job logs; see `loco jobs`
            shown = [a for a in argv if not a.startswith("train.output_dir=")]
            tasks.append(Task(run_dir, [*shown, *overrides, *flags], cfg.to_dict(), point))
        else:
            if sweep:
                flags += ["--out" if hasattr(ns, "out") else "--output-dir", str(run_dir)]
            task_argv = [*argv, *overrides, *flags]
            _parse_job(job, task_argv)
            tasks.append(Task(run_dir, task_argv, None, point))
    return base, tasks


# -- checks on the login node, before anything is queued -------------------------------------
def read_checkpoint(path: str | Path, flag: str = "--checkpoint") -> dict[str, Any]:
    """The checkpoint's dict, memory-mapped (reads its header, not gigabytes of weights)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise LocoError(f"{flag} {path}: no such file; give a run's checkpoint.pt")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated, not a torch file, pickled code
        reason = next((ln for ln in str(exc).splitlines() if ln.strip()), repr(exc))
        raise LocoError(f"{flag} {path} does not read as a checkpoint: {reason.strip()}") from None
    if not isinstance(obj, dict):
        raise LocoError(f"{flag} {path} holds a {type(obj).__name__}, not a state dict")
    return obj


def check_job(job: str, tasks: list[Task], world_size: int) -> None:
    """What would otherwise fail on the node: the checkpoint, the config, the run dir."""
    from loco.config import config_from_dict

    if job == "pretrain":
        for t in tasks:  # run lock and resume rules: the checks the run makes at its start
            preflight(config_from_dict(t.config or {}), world_size)
        return
    ns = _parse_job(job, tasks[0].argv)
    weights = getattr(ns, "weights", None)  # Detectron2's .pth/.pkl: its own formats
    if weights and not Path(weights).is_file():
        raise LocoError(f"--weights {weights}: no such file")
    if getattr(ns, "checkpoint", None):
        state = read_checkpoint(ns.checkpoint)
        if job == "eval" and isinstance(state.get("config"), dict):
            from loco.eval.network import apply_overrides

            for t in tasks:  # the checkpoint's config with each task's overrides
                overrides = getattr(_parse_job(job, t.argv), "overrides", None) or []
                apply_overrides(config_from_dict(state["config"]), overrides)


def _slurm_says(cmd: list[str]) -> subprocess.CompletedProcess | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None


def check_cluster(opts: SlurmOptions) -> None:
    """The partition and account exist, where ``scontrol``/``sacctmgr`` can say so."""
    if opts.partition:
        out = _slurm_says(["scontrol", "show", "partition", opts.partition])
        if out is not None and out.returncode != 0 and "not found" in out.stdout + out.stderr:
            names = _slurm_says(["sinfo", "-h", "-o", "%R"])
            known = sorted(set(names.stdout.split())) if names and names.returncode == 0 else []
            raise LocoError(
                f"partition '{opts.partition}' does not exist on this cluster"
                + (f"; partitions: {', '.join(known)}" if known else "")
                + " (--partition or the profile's partition)"
            )
    if opts.account:
        out = _slurm_says(
            ["sacctmgr", "-n", "-P", "show", "account", opts.account, "format=Account"]
        )
        if out is not None and out.returncode == 0 and not out.stdout.strip():
            raise LocoError(
                f"account '{opts.account}' is unknown to Slurm's accounting (sacctmgr show "
                "account); check --account or the profile's account"
            )


@contextlib.contextmanager
def _sbatch_stderr() -> Iterator[list[str]]:
    """Hold what sbatch writes to stderr (submitit lets it through): a refusal then reads as
    one line of ours, not sbatch's lines plus ours. The lines are yielded for that message."""
    said: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    copied = io.StringIO()  # submitit copies the command's stderr to sys.stderr
    with tempfile.TemporaryFile(mode="w+") as held, contextlib.redirect_stderr(copied):
        os.dup2(held.fileno(), 2)
        try:
            yield said
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            said += held.read().splitlines() + copied.getvalue().splitlines()


def _first_missing(path: Path) -> Path | None:
    """The outermost of ``path`` and its parents that does not exist yet (to undo a mkdir)."""
    missing = None
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing = p
    return missing


# -- submitit ------------------------------------------------------------------------------
def sbatch_parameters(opts: SlurmOptions, job_name: str, array_size: int = 1) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters (named as its ``#SBATCH`` flags)."""
    params: dict[str, Any] = {
        "job_name": job_name,
        "time": parse_time(opts.time),
        "nodes": opts.nodes,
        "ntasks_per_node": opts.tasks(),
        "signal_delay_s": opts.signal_delay_s,
    }
    if opts.gpus_per_node:
        params["gpus_per_node"] = opts.gpus_per_node
    optional = (
        "partition",
        "account",
        "qos",
        "constraint",
        "exclude",
        "cpus_per_task",
        "mem_per_gpu",
        "mem",
    )
    params.update({k: getattr(opts, k) for k in optional if getattr(opts, k) is not None})
    if opts.setup:
        params["setup"] = list(opts.setup)
    # one failed task ends the step (the others would wait in a collective until a timeout)
    params["srun_args"] = ["--kill-on-bad-exit=1", *opts.srun_args]
    if opts.sbatch:
        params["additional_parameters"] = dict(opts.sbatch)
    if array_size > 1:
        params["array_parallelism"] = opts.max_parallel or array_size
    return params


def make_executor(
    folder: Path, opts: SlurmOptions, params: dict[str, Any], render_only: bool = False
) -> Any:
    """submitit.AutoExecutor for Slurm; where srun is absent, a dry run still renders the script."""
    import submitit
    from submitit.slurm.slurm import SlurmExecutor

    python = opts.python or shlex.quote(sys.executable)
    if shutil.which("srun") is None:
        if not render_only:
            raise LocoError(
                "srun not found: submit from a Slurm login node (add --dry-run to see the script)"
            )

        class RenderOnly(SlurmExecutor):  # the same script, without a Slurm installation
            @classmethod
            def affinity(cls) -> int:
                return 1

        ex = RenderOnly(folder, max_num_timeout=opts.max_requeues, python=python)
        ex.update_parameters(**params)
        return ex
    ex = submitit.AutoExecutor(
        folder=folder, cluster="slurm", slurm_max_num_timeout=opts.max_requeues, slurm_python=python
    )
    ex.update_parameters(**{f"slurm_{k}": v for k, v in params.items()})
    return ex


def render_script(executor: Any, array_size: int = 1) -> str:
    """The sbatch script submitit writes for this executor (``#SBATCH`` lines, srun command)."""
    from submitit.slurm.slurm import _make_sbatch_string

    slurm = getattr(executor, "_executor", executor)
    params = dict(slurm.parameters)
    if array_size > 1:
        params["map_count"] = array_size
    return _make_sbatch_string(command=slurm._submitit_command_str, folder=slurm.folder, **params)


def _record(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _short(path: Path | str) -> str:
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def run(args: argparse.Namespace) -> int:
    argv = split_job_args(args)
    opts, profile = resolve_options(args)
    stages = getattr(args, "stage_parallel", None)
    if stages:
        from loco.parallel.layout import stage_mapping

        mapping = stage_mapping(args.job, stages, opts.nodes, opts.tasks())
        argv = [*argv, f"train.stage_parallel={stages}"]
    points = sweep_points(args.sweep, args.sweep_file)
    base, tasks = build_tasks(args.job, argv, points)
    array = len(tasks) if points != [{}] else 1
    job_name = opts.job_name or f"loco-{args.job}-{base.name}"[:64]
    folder = Path(opts.folder).expanduser().resolve() if opts.folder else RunDir(base).slurm / "%j"
    check_job(args.job, tasks, opts.nodes * opts.tasks())
    if stages:  # what the stage-parallel trainer would refuse at start, refused before queueing
        from loco.config import config_from_dict
        from loco.parallel.layout import check_config

        for t in (t for t in tasks if t.config is not None):
            check_config(config_from_dict(t.config), opts.nodes * opts.tasks())
    check_cluster(opts)
    params = sbatch_parameters(opts, job_name, array)
    executor = make_executor(folder, opts, params, render_only=args.dry_run)
    from loco.launch.entry import LocoJob

    jobs = [
        LocoJob(args.job, t.argv, str(t.run_dir), config=t.config, max_requeues=opts.max_requeues)
        for t in tasks
    ]
    if args.dry_run:
        if stages:
            print(mapping)
            if tasks[0].config is not None:
                from loco.parallel.layout import batch_and_lr

                print(batch_and_lr(tasks[0].config, stages, opts.nodes * opts.tasks()))
        return _print_dry_run(args.job, opts, profile, executor, tasks, array, base)

    new_dirs = {d for d in (_first_missing(base), _first_missing(folder)) if d is not None}
    base.mkdir(parents=True, exist_ok=True)
    try:
        with _sbatch_stderr() as said:
            submitted = [executor.submit(jobs[0])] if array == 1 else executor.submit_array(jobs)
    except Exception as exc:  # sbatch refused: partition, account, limits...
        for d in new_dirs:  # a refused submit leaves nothing behind
            shutil.rmtree(d, ignore_errors=True)
        text = "\n".join([*said, str(exc)])
        lines = (
            [ln for ln in text.splitlines() if "error" in ln.lower()]
            or text.splitlines()
            or [repr(exc)]
        )
        raise LocoError(f"sbatch refused the job: {lines[-1].strip()}") from None
    for line in said:  # accepted, with warnings: show them
        print(line, file=sys.stderr)
    now = datetime.datetime.now().isoformat(timespec="seconds")
    rows = []
    for job, task in zip(submitted, tasks):
        rows.append(
            {
                "job_id": job.job_id,
                "command": args.job,
                "argv": task.argv,
                "run_dir": str(task.run_dir),
                "stdout": str(job.paths.stdout),
                "stderr": str(job.paths.stderr),
                "submitted": now,
                "nodes": opts.nodes,
                "tasks_per_node": opts.tasks(),
                "gpus_per_node": opts.gpus_per_node,
                "time": opts.time,
                "partition": opts.partition,
                "sweep": task.point,
            }
        )
    _record(RunDir(base).jobs, rows)
    if array > 1:
        for row in rows:
            _record(RunDir(row["run_dir"]).jobs, [row])
    _print_submitted(args.job, opts, rows, base, array)
    return 0


def _where(opts: SlurmOptions) -> str:
    per = f"{opts.gpus_per_node} GPU" if opts.gpus_per_node else "CPU"
    return (
        f"{opts.nodes} node(s) x {opts.tasks()} task(s) ({per}), partition {opts.partition or '(default)'}, "
        f"time {opts.time}"
    )


def _processes(job: str, opts: SlurmOptions, config: dict[str, Any] | None) -> str:
    """What runs: processes, GPUs and, for pretraining, the global batch."""
    gpus = f"{opts.gpus_per_node} GPU(s) per node" if opts.gpus_per_node else "no GPU"
    if job != "pretrain":
        return f"tasks: 1 (`loco {job}` runs once, in one task; the profile's tasks_per_node is for pretraining), {gpus}"
    ranks = opts.nodes * opts.tasks()
    batch = (config or {}).get("optim", {}).get("batch_size")
    text = f"tasks: {ranks} process(es) ({opts.nodes} node(s) x {opts.tasks()}), {gpus}"
    stages = int((config or {}).get("train", {}).get("stage_parallel") or 1)
    if batch and stages > 1:  # a batch goes through the K stages of one replica
        text += (
            f"; optim.batch_size {batch} per replica -> global batch {batch * (ranks // stages)}"
            f" ({ranks // stages} replicas x {stages} stages)"
        )
    elif batch:
        text += f"; optim.batch_size {batch} per process -> global batch {batch * ranks}"
    return text


def _print_submitted(
    job: str, opts: SlurmOptions, rows: list[dict[str, Any]], base: Path, array: int
) -> None:
    if array == 1:
        r = rows[0]
        print(f"submitted job {r['job_id']}: loco {job} on {_where(opts)}")
        print(f"  output: {_short(r['run_dir'])}")
        print(f"  log:    {_short(r['stderr'])}  (and .out)")
    else:
        print(
            f"submitted array {rows[0]['job_id'].split('_')[0]} ({array} tasks): loco {job}, each on {_where(opts)}"
        )
        for r in rows:
            print(f"  {r['job_id']:<12} {_short(r['run_dir'])}  log: {_short(r['stderr'])}")
    print(f"  status: loco jobs {_short(base)}")
    if array > 1 and job == "eval":
        print(f"  when done: loco report {_short(base)}/*/")
    elif array > 1:
        print(f"  evaluate each task dir with `loco eval`, then: loco report {_short(base)}/*/")


def _print_dry_run(
    job: str,
    opts: SlurmOptions,
    profile: str | None,
    executor: Any,
    tasks: list[Task],
    array: int,
    base: Path,
) -> int:
    print("# loco submit --dry-run: nothing was submitted")
    print(f"# profile: {profile or '(none: built-in defaults)'}")
    print(f"# python on the nodes: {opts.python or sys.executable}")
    print(f"# {_where(opts)}; requeued on timeout/preemption at most {opts.max_requeues} time(s)")
    print(f"# {_processes(job, opts, tasks[0].config)}")
    for t in tasks:
        print(f"# task -> {_short(t.run_dir)}: loco {job} {shlex.join(t.argv)}")
    print(f"# status afterwards: loco jobs {_short(base)}")
    print(f"\n# ---- sbatch script (submitit{', job array' if array > 1 else ''}) ----")
    print(render_script(executor, array))
    if tasks[0].config is not None:
        from loco.config import config_from_dict, dump_yaml

        label = " (first task)" if array > 1 else ""
        print(f"# ---- resolved config{label} ----")
        print(dump_yaml(config_from_dict(tasks[0].config)))
    return 0
