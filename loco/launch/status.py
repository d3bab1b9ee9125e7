"""``loco jobs [RUN_DIR]``: the Slurm jobs of a run: state, requeues, last step, log tail.

Reads the job ids that ``loco submit`` recorded in ``RUN_DIR/slurm/jobs.jsonl``, the states
from ``sacct`` (one call for all jobs; ``--duplicates`` counts past runs) and ``scontrol``
(the restart count of a job still known to the controller: current right after a requeue),
the last logged step from each task's ``metrics.jsonl``, the job's ``error: ...`` line
(wherever it is in the log) and the end of the newest job's log. Given a folder that is not
a run with jobs (default ``runs/``), it lists the runs under it that have jobs, one a line.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from collections import deque
from pathlib import Path
from typing import Any

from loco.errors import LocoError
from loco.rundir import RunDir

DONE = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        nargs="?",
        default="runs",
        help="output dir of a submitted job (or of a sweep); a folder of runs lists those with "
        "jobs, one a line (default: runs/)",
    )
    parser.add_argument(
        "--lines", "-n", type=int, default=15, help="log lines to show (default 15)"
    )
    parser.add_argument(
        "--all-logs", action="store_true", help="the log tail of every job, not only the newest"
    )


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    path = RunDir(run_dir).jobs
    if not path.is_file():
        raise LocoError(
            f"no Slurm jobs recorded in {run_dir} ({path} is missing); submit with `loco submit`"
        )
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a full disk: skip it
    return rows


def sacct_states(job_ids: list[str]) -> dict[str, dict[str, Any]] | None:
    """job id -> {state, elapsed, nodes, exit, runs}; None when sacct is unavailable.

    ``runs`` counts the job's records in accounting (``--duplicates``): 1 + its requeues.
    """
    if shutil.which("sacct") is None:
        return None
    if not job_ids:
        return {}
    cmd = ["sacct", "-X", "-n", "-P", "--duplicates", "-o", "JobID,State,Elapsed,NodeList,ExitCode"]
    try:
        out = subprocess.run(
            cmd + ["-j", ",".join(job_ids)], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    info: dict[str, dict[str, Any]] = {}
    for line in out.stdout.splitlines():
        parts = line.split("|")
        if len(parts) < 5:
            continue
        jid, state, elapsed, nodes, code = parts[:5]
        for one in _array_ids(jid):
            runs = info.get(one, {}).get("runs", 0) + 1
            # the last record is the current run
            info[one] = {
                "state": state.split()[0],
                "elapsed": elapsed,
                "nodes": nodes,
                "exit": code,
                "runs": runs,
            }
    return info


def scontrol_restarts() -> dict[str, int]:
    """job id -> Slurm's restart count, for jobs the controller still holds (one call)."""
    if shutil.which("scontrol") is None:
        return {}
    try:
        out = subprocess.run(
            ["scontrol", "-o", "show", "job"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    found: dict[str, int] = {}
    for line in out.stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "JobId" not in fields or "Restarts" not in fields:
            continue
        jid = fields["JobId"]
        if fields.get("ArrayTaskId", "N/A") not in ("N/A", "") and "ArrayJobId" in fields:
            jid = f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"
        found[jid] = int(fields["Restarts"] or 0)
    return found


def job_states(job_ids: list[str]) -> dict[str, dict[str, Any]] | None:
    """:func:`sacct_states`, with ``requeues`` from whichever of sacct and scontrol is ahead."""
    states = sacct_states(job_ids)
    if states is None:
        return None
    restarts = scontrol_restarts() if job_ids else {}
    for jid in job_ids:
        if jid in states:
            s = states[jid]
            s["requeues"] = max(s["runs"] - 1, restarts.get(jid, 0))
    return states


def error_line(path: Path) -> str | None:
    """The last ``error: ...`` line a job printed (a LocoError, as on the command line)."""
    if not path.is_file():
        return None
    found = None
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("error: "):
                found = line.strip()
    return found


def _array_ids(jid: str) -> list[str]:
    """``123_[0-2,5%4]`` (pending array tasks) -> 123_0 123_1 123_2 123_5; others unchanged."""
    m = re.fullmatch(r"(\d+)_\[([\d,-]+)(?:%\d+)?\]", jid)
    if not m:
        return [jid]
    out = []
    for part in m.group(2).split(","):
        lo, _, hi = part.partition("-")
        out += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def last_step(run_dir: Path) -> dict[str, Any] | None:
    """The last line of ``metrics.jsonl`` (read from the end: the file can be large)."""
    path = RunDir(run_dir).metrics
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 8192))
        lines = f.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


def tail(path: Path, n: int) -> list[str]:
    if not path.is_file():
        return []
    with open(path, errors="replace", newline="\n") as f:
        # tqdm writes \r updates: keep the last one of each line
        return [ln.rstrip("\n").split("\r")[-1] for ln in deque(f, maxlen=n)]


def _progress(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    text = f"step {row.get('step')}"
    if "epoch" in row:
        text += f" (epoch {row['epoch']:.2f})"
    losses = [f"{k.split('/')[-1]} {v:.3f}" for k, v in row.items() if k.startswith("loss/")][:2]
    return ", ".join([text, *losses])


def find_runs(root: Path) -> list[Path]:
    """Run dirs under ``root`` with recorded jobs (a sweep's tasks are listed by the sweep)."""
    runs: list[Path] = []
    jobs = RunDir(root).jobs.relative_to(root)  # slurm/jobs.jsonl
    for path in sorted(root.rglob(str(jobs))):
        run = path.parent.parent
        if not any(parent in runs for parent in run.parents):
            runs.append(run)
    return runs


def list_runs(root: Path) -> int:
    if not root.is_dir():
        raise LocoError(f"{root} is not a directory; give a run dir or a folder of runs")
    runs = find_runs(root)
    if not runs:
        raise LocoError(f"no Slurm jobs recorded under {root}; submit with `loco submit`")
    latest = {run: read_records(run)[-1] for run in runs}
    states = job_states([r["job_id"] for r in latest.values()]) or {}
    table = [("RUN", "JOB", "STATE", "REQUEUES", "PROGRESS")]
    for run, r in latest.items():
        s = states.get(r["job_id"], {})
        table.append(
            (
                str(run),
                r["job_id"],
                s.get("state", "?"),
                str(s["requeues"]) if s else "?",
                _progress(last_step(Path(r["run_dir"]))),
            )
        )
    _print_table(table)
    return 0


def _print_table(table: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not RunDir(run_dir).jobs.is_file() and run_dir.is_dir():
        return list_runs(run_dir)
    records = read_records(run_dir)
    if not records:
        raise LocoError(f"{RunDir(run_dir).jobs} lists no jobs")
    states = job_states(list(dict.fromkeys(r["job_id"] for r in records)))
    if states is None:
        print("(no job states: sacct is missing or cannot reach Slurm's accounting)")
        states = {}
    table = [("JOB", "STATE", "REQUEUES", "ELAPSED", "NODES", "PROGRESS", "OUTPUT")]
    for r in records:
        s = states.get(r["job_id"], {})
        table.append(
            (
                r["job_id"],
                s.get("state", "?"),
                str(s["requeues"]) if s else "?",
                s.get("elapsed", "-"),
                s.get("nodes", "-"),
                _progress(last_step(Path(r["run_dir"]))),
                r["run_dir"],
            )
        )
    _print_table(table)
    for r in records if args.all_logs else records[-1:]:
        error = error_line(Path(r["stderr"]))
        if error:
            print(f"\n{r['job_id']} failed with: {error}")
        for key in ("stderr", "stdout"):
            lines = tail(Path(r[key]), args.lines)
            if lines:
                print(f"\n--- {r['job_id']}: last {len(lines)} lines of {r[key]} ---")
                print("\n".join(lines))
    return 0
