"""Real Slurm jobs through submitit, against the single-node cluster of slurm/local-cluster.sh.

Start it first (as root): ``bash slurm/local-cluster.sh start``. Skipped when ``sbatch`` is
absent or ``sinfo`` cannot reach a controller with an idle node.

Functions sent to Slurm are defined inside the tests: cloudpickle then ships them by value,
so the job does not need to import this test module.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

PARTITION = "debug"
JOB_TIMEOUT_S = 45  # per job; a job on an idle local node returns in ~1-2 s


def _controller_refuses() -> bool:
    """Fast path: True when slurm.conf names a controller whose port refuses connections.

    sinfo needs ~9 s to give up on a stopped controller; anything unclear here returns
    False and leaves the decision to sinfo.
    """
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    try:
        text = conf.read_text()
    except OSError:
        return False
    host = re.search(r"^\s*SlurmctldHost\s*=\s*([^\s(#]+)(?:\(([^)]+)\))?", text, re.M | re.I)
    port = re.search(r"^\s*SlurmctldPort\s*=\s*(\d+)", text, re.M | re.I)
    if not host:
        return False
    try:
        with socket.create_connection(
            (host.group(2) or host.group(1), int(port.group(1)) if port else 6817), timeout=2
        ):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch not found (install and start it: sudo bash slurm/local-cluster.sh start)"
    if _controller_refuses():
        return "Slurm controller not running; start it: sudo bash slurm/local-cluster.sh start"
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-p", PARTITION, "-o", "%T"],
            capture_output=True,
            text=True,
            timeout=15,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo failed ({e}); start the cluster: sudo bash slurm/local-cluster.sh start"
    if out.returncode != 0:
        msg = (out.stderr or out.stdout).strip().splitlines()
        return (
            f"Slurm cluster not up (sinfo: {msg[-1] if msg else out.returncode}); "
            "start it: sudo bash slurm/local-cluster.sh start"
        )
    states = out.stdout.split()
    if not {"idle", "mixed", "allocated"} & set(states):
        return f"no usable node in partition {PARTITION!r} (sinfo states: {states or 'none'})"
    return None


@pytest.fixture(scope="module")
def submitit():
    problem = _cluster_problem()
    if problem:
        pytest.skip(problem)
    return pytest.importorskip("submitit")


@pytest.fixture
def executor(submitit, tmp_path):
    ex = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    ex.update_parameters(slurm_partition=PARTITION, timeout_min=5, name="loco-test")
    return ex


def _wait_done(jobs, timeout_s: float = JOB_TIMEOUT_S) -> None:
    """job.result() has no timeout; poll done() and cancel everything if it takes too long."""
    deadline = time.monotonic() + timeout_s
    while not all(j.done() for j in jobs):
        if time.monotonic() > deadline:
            for j in jobs:
                j.cancel(check=False)
            states = {j.job_id: j.get_info(mode="force").get("State") for j in jobs}
            pytest.fail(f"Slurm jobs not done after {timeout_s:.0f} s: {states}")
        time.sleep(0.25)


def _wait_state(job, want: str = "COMPLETED", timeout_s: float = 20) -> str:
    """Accounting (sacct) may lag slightly behind the job's result file."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = job.get_info(mode="force").get("State") or "UNKNOWN"
        if state == want or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def test_trivial_job_result_and_sacct_state(executor):
    def add(a, b):
        return a + b

    job = executor.submit(add, 2, 3)
    _wait_done([job])
    assert job.result() == 5
    # submitit reads states from sacct: COMPLETED requires working accounting (slurmdbd)
    assert _wait_state(job) == "COMPLETED"
    assert job.state == "COMPLETED"


def test_two_tasks_both_ranks_run(executor):
    def whoami():
        import submitit

        env = submitit.JobEnvironment()
        return env.global_rank, env.local_rank, env.num_tasks, env.job_id

    executor.update_parameters(tasks_per_node=2, nodes=1)
    job = executor.submit(whoami)
    _wait_done([job])
    results = job.results()
    assert sorted(r[0] for r in results) == [0, 1]
    assert sorted(r[1] for r in results) == [0, 1]
    assert {r[2] for r in results} == {2}
    assert {r[3] for r in results} == {job.job_id}
    assert _wait_state(job) == "COMPLETED"


def test_array_of_four(executor):
    def square(x):
        return x * x

    executor.update_parameters(slurm_array_parallelism=4)
    jobs = executor.map_array(square, [0, 1, 2, 3])
    assert len(jobs) == 4
    assert len({j.job_id.split("_")[0] for j in jobs}) == 1  # one array job
    _wait_done(jobs)
    assert [j.result() for j in jobs] == [0, 1, 4, 9]
    assert [_wait_state(j) for j in jobs] == ["COMPLETED"] * 4
