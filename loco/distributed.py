"""One process or many: initialise torch.distributed under torchrun, Slurm, or neither.

The same training code runs everywhere; only where rank/world size come from differs.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import re
import socket
import subprocess
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm node list such as ``gpu[01-04,07],cpu1`` or ``r[1-2]n[3-4]`` into host
    names, in the order ``scontrol show hostnames`` prints them."""
    hosts: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(nodelist + ","):  # split on the commas outside brackets
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            if i > start:
                hosts += _expand_host(nodelist[start:i])
            start = i + 1
    return hosts


def _expand_host(pattern: str) -> list[str]:
    m = re.match(r"([^\[]*)\[([^\]]+)\](.*)", pattern)
    if not m:
        return [pattern]
    prefix, ranges, rest = m.groups()
    heads: list[str] = []
    for r in ranges.split(","):
        if "-" in r:
            lo, hi = r.split("-")
            heads += [f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
        else:
            heads.append(f"{prefix}{r}")
    return [h + tail for h in heads for tail in _expand_host(rest)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def job_port(job_id: str | int) -> int:
    """The rendezvous port of a Slurm job: the same on every task of the job, different
    between jobs sharing a node (array tasks included: each has its own SLURM_JOB_ID)."""
    return 20000 + int(job_id) % 20000


def _slurm_env() -> DistInfo | None:
    """Rank info from Slurm's task variables (srun / submitit), or None outside a step."""
    if "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return None
    world = int(os.environ["SLURM_NTASKS"])
    if world <= 1:
        return None
    rank = int(os.environ["SLURM_PROCID"])
    local = int(os.environ.get("SLURM_LOCALID", 0))
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
        try:
            first = subprocess.run(
                ["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True
            ).stdout.split()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            first = expand_nodelist(nodes)[0] if nodes else "127.0.0.1"
        os.environ["MASTER_ADDR"] = first
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(job_port(os.environ.get("SLURM_JOB_ID", "0")))
    return DistInfo(rank, local, world)


# -- hook for loco.launch (submitit jobs) ------------------------------------------------
def _submitit_env() -> DistInfo | None:
    """Rank info inside a job submitted with submitit (``loco submit``), from
    ``submitit.JobEnvironment``: the master is the job's first node, the port follows the
    job id; both replace any MASTER_ADDR/MASTER_PORT inherited from the submitting shell
    (sbatch exports its environment). None outside such a job, or with a single task."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return None
    try:
        import submitit
    except ImportError:
        return None
    env = submitit.JobEnvironment()
    if env.num_tasks <= 1:
        return None
    os.environ["MASTER_ADDR"] = env.hostnames[0]
    os.environ["MASTER_PORT"] = str(job_port(env.raw_job_id))
    return DistInfo(env.global_rank, env.local_rank, env.num_tasks)


def init_distributed(backend: str | None = None) -> DistInfo:
    """Initialise the default process group when launched with several processes."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(
            dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size()
        )
    info: DistInfo | None = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun
        info = DistInfo(
            int(os.environ["RANK"]),
            int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ["WORLD_SIZE"]),
        )
    else:
        info = _submitit_env() or _slurm_env()
    if info is None:
        return DistInfo()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(
        backend, rank=info.rank, world_size=info.world_size, timeout=datetime.timedelta(minutes=30)
    )
    log.info(
        "distributed: rank %d/%d (local %d), backend %s",
        info.rank,
        info.world_size,
        info.local_rank,
        backend,
    )
    return info


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Mean of the gradients over ranks (local methods run several backwards per step, so
    DDP's one-backward reducer does not fit; one coalesced all-reduce per step does)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one (one tiny all-reduce), so
    that all ranks take a decision such as "stop after this step" at the same step."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    on_gpu = dist.get_backend() == "nccl"
    device = f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu"
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (a cheap guard: ranks already seed alike)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_to_main(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on rank 0 (picklable objects; [] elsewhere)."""
    if not _initialized():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out or []


def rank_codes(code: int) -> list[int]:
    """Every rank's ``code`` (0 = all well), on every rank: one tiny all-reduce, so that all
    ranks stop at the same step when one of them fails (a non-finite loss, a lost run lock)."""
    if not _initialized():
        return [code]
    on_gpu = dist.get_backend() == "nccl"
    device = f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu"
    t = torch.zeros(dist.get_world_size(), dtype=torch.int64, device=device)
    t[dist.get_rank()] = code
    dist.all_reduce(t)
    return t.tolist()


def seed_per_rank(seed: int, rank: int) -> None:
    """Give rank ``rank`` its own random streams once the (identical) weights are built, so
    stochastic layers (drop_path, dropout) draw differently on each rank. Rank 0 keeps the
    stream it built the model with, so a one-process run does not change."""
    if rank == 0:
        return
    s = (seed * 1_000_003 + rank) % 2**63
    torch.manual_seed(s)  # CPU and every CUDA device
    np.random.seed(s % 2**32)
    random.seed(s)
