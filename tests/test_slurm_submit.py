"""``loco submit`` / ``loco jobs``: profiles, dry runs, sweeps, node lists, the stop hook, and
(marked ``slurm``) real jobs on the local cluster of ``slurm/local-cluster.sh``.

The real jobs are submitted together by one module fixture, so that their start-up, the
requeue delay and the time limit overlap: a 2-task gloo pretraining that completes, the same
run preempted (submitit's ``_interrupt()``: SIGTERM then USR2) and resumed, a ``--time 1`` run
that is requeued at its time limit, and a two-task array sweep.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_val_overrides

from loco import checkpoint as ckpt
from loco import stop
from loco.cli import main
from loco.config import Config, load_config
from loco.distributed import _submitit_env, expand_nodelist, job_port
from loco.errors import LocoError
from loco.launch import submit
from loco.launch.status import DONE, sacct_states

REPO = Path(__file__).resolve().parents[1]


def tiny(root: Path, out: Path, *extra: str) -> list[str]:
    """Runs in their lr warm-up throughout: a resumed run must also resume the schedule."""
    return tiny_val_overrides(root, out, "optim.warmup_epochs=10", *extra)


def metric_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(ln)["step"] for ln in path.read_text().splitlines()] if path.exists() else []


# -- node lists and the job environment -------------------------------------------------------
NODELISTS = [
    ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
    ("node7", ["node7"]),
    ("a[1-2],b3", ["a1", "a2", "b3"]),
    ("rack1-n[008-010]", ["rack1-n008", "rack1-n009", "rack1-n010"]),
    ("r[1-2]n[3-4],login", ["r1n3", "r1n4", "r2n3", "r2n4", "login"]),
    ("gpu[1,10-11],cpu[001-002]", ["gpu1", "gpu10", "gpu11", "cpu001", "cpu002"]),
]


@pytest.mark.parametrize("nodelist, hosts", NODELISTS)
def test_nodelist_forms(nodelist, hosts):
    from submitit.slurm.slurm import _parse_node_list  # what JobEnvironment.hostnames uses

    assert expand_nodelist(nodelist) == hosts
    assert _parse_node_list(nodelist) == hosts
    if shutil.which("scontrol"):  # Slurm's own expansion, where Slurm is installed
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True
        )
        assert out.stdout.split() == hosts


def test_rank_and_master_from_submitit_environment(monkeypatch):
    for var in ("MASTER_ADDR", "MASTER_PORT"):  # restored after the test: jobs inherit them
        monkeypatch.setenv(var, "inherited")
    env = {
        "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16",
        "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "5",
        "SLURM_JOB_NODELIST": "gpu[01-04,07]",
    }  # fmt: skip
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    info = _submitit_env()
    assert (info.rank, info.local_rank, info.world_size) == (9, 1, 16)
    import os

    assert os.environ["MASTER_ADDR"] == "gpu01"
    assert os.environ["MASTER_PORT"] == str(job_port(4242)) == "24242"
    monkeypatch.setenv("SLURM_NTASKS", "1")  # one task: no process group
    assert _submitit_env() is None


# -- options and profiles ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, minutes",
    [("1", 1), (90, 90), ("10:30", 11), ("72:00:00", 4320), ("1-12", 2160), ("2-00:00:30", 2881)],
)
def test_parse_time(text, minutes):
    assert submit.parse_time(text) == minutes


@pytest.mark.parametrize("text", ["abc", "1:2:3:4", "0", "-5"])
def test_parse_time_rejects(text):
    with pytest.raises(LocoError, match="not a Slurm time"):
        submit.parse_time(text)


def test_shipped_profiles_load():
    for path in sorted((REPO / "slurm" / "profiles").glob("*.yaml")):
        _, values = submit.load_profile(str(path))
        submit.SlurmOptions(**values)
    _, local = submit.load_profile("local")
    assert local["partition"] == "debug" and local["tasks_per_node"] == 2


@pytest.mark.parametrize(
    "text, message",
    [
        ("gpu_per_node: 8\n", "unknown key 'gpu_per_node'; did you mean 'gpus_per_node'?"),
        ("nodes: four\n", "'nodes': expected an integer"),
        ("time: 3 days\n", "not a Slurm time"),
        ("setup: {a: 1}\n", "'setup': expected a list"),
        ("- partition\n", "must hold a mapping"),
    ],
)
def test_bad_profile_is_a_one_line_error(tmp_path, capsys, text, message):
    profile = tmp_path / "bad.yaml"
    profile.write_text(text)
    with pytest.raises(LocoError, match=message.replace("?", r"\?")):
        submit.load_profile(str(profile))
    assert main(["submit", "pretrain", "--profile", str(profile), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err


def test_unknown_profile_name_lists_suggestion():
    with pytest.raises(LocoError, match="did you mean 'local'"):
        submit.find_profile("locall")


# -- dry runs ---------------------------------------------------------------------------------
def test_dry_run_prints_script_and_config_and_submits_nothing(tmp_path, capsys):
    out = tmp_path / "r50"
    argv = [
        "submit", "pretrain", "--config", str(REPO / "configs/imagenet_resnet50_loco_100ep.yaml"),
        "method.temperature=0.2", f"train.output_dir={out}",
        "--profile", "example", "--nodes", "4", "--gpus-per-node", "8", "--time", "72:00:00",
        "--account", "root", "--partition", "debug", "--exclude", "gpu[03,07]", "--dry-run",
    ]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    for line in [
        "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
        "#SBATCH --time=4320", "#SBATCH --signal=USR2@120", "#SBATCH --partition=debug",
        "#SBATCH --account=root", "#SBATCH --exclude='gpu[03,07]'", "#SBATCH --cpus-per-task=10",
        "#SBATCH --mem-per-gpu=64G", "export OMP_NUM_THREADS=1", "srun --unbuffered",
        "--kill-on-bad-exit=1",
        f"{out}/slurm/%j/%j_0_log.err", "-m submitit.core._submit",
        "temperature: 0.2", "backbone: resnet50", "progress: false",
        "tasks: 32 process(es) (4 node(s) x 8), 8 GPU(s) per node; optim.batch_size 128 per "
        "process -> global batch 4096",
    ]:  # fmt: skip
        assert line in text, line
    assert sys.executable in text  # the jobs run this interpreter (the venv's)
    assert not out.exists()


def test_submit_options_anywhere_and_cpu_default_tasks(tmp_path, capsys):
    out = tmp_path / "cpu"
    # options before the job, mixed into its arguments, and the job's own after `--`
    argv = ["submit", "--nodes", "2", "pretrain", "optim.max_steps=5", "--time", "5", "--dry-run",
            "--", f"train.output_dir={out}"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=1" in text
    assert "--gpus-per-node" not in text and "#SBATCH --time=5" in text
    assert "max_steps: 5" in text


def test_dry_run_stage_parallel_batch_is_per_replica(tmp_path, capsys):
    """Under stage parallelism a batch passes through K stage processes of one replica: the
    global batch is batch x replicas, not batch x processes."""
    argv = ["submit", "pretrain", "--nodes", "2", "--gpus-per-node", "4", "--stage-parallel",
            "4", "--dry-run", "optim.batch_size=64", f"train.output_dir={tmp_path / 'sp'}"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "task 5 (node 1, local 1) -> stage S2, replica 1" in text
    assert "optim.batch_size 64 per replica -> global batch 128 (2 replicas x 4 stages)" in text
    assert "global batch 512" not in text


def test_stage_parallel_refusals_come_before_queueing(tmp_path, capsys):
    """What the stage-parallel trainer refuses at start (here the ImageNet config's kNN
    monitor and SyncBN) is refused by submit, even in a dry run, in one line."""
    argv = ["submit", "pretrain", "--config", "configs/imagenet_resnet50_loco_100ep.yaml",
            "--nodes", "1", "--gpus-per-node", "4", "--stage-parallel", "4", "--dry-run",
            f"train.output_dir={tmp_path / 'sp'}"]  # fmt: skip
    fixes = ["monitor.knn_every=0", "model.sync_bn=false"]
    for n, fix in enumerate(fixes):  # its kNN monitor, then its SyncBN
        assert main([*argv, *fixes[:n]]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and fix in err and "\n" not in err
    assert main([*argv, *fixes]) == 0


def fake_checkpoint(path: Path) -> Path:
    """A checkpoint whose header reads (a config, no weights): what the submit checks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": Config().to_dict(), "step": 0}, path)
    return path


def test_dry_run_eval_sweep_is_one_array(tmp_path, capsys):
    parent = tmp_path / "sweep"
    ck = fake_checkpoint(tmp_path / "run/checkpoint.pt")
    argv = [
        "submit", "eval", "knn", "--checkpoint", str(ck), "--out", str(parent),
        "--profile", "local", "--tasks-per-node", "1", "--sweep", "data.image_size=16,32",
        "--sweep", "k=10,20", "--max-parallel", "2", "--dry-run",
    ]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "#SBATCH --array=0-3%2" in text
    for tag in (
        "image_size=16_k=10",
        "image_size=16_k=20",
        "image_size=32_k=10",
        "image_size=32_k=20",
    ):
        assert f"{parent / tag}" in text
    assert "data.image_size=32 --k 20 --out" in text
    assert not parent.exists()


def test_eval_and_transfer_jobs_get_one_task_whatever_the_profile(tmp_path, capsys):
    ck = fake_checkpoint(tmp_path / "run/checkpoint.pt")
    jobs = {
        "eval": ["eval", "knn", "--checkpoint", str(ck), "--out", str(tmp_path / "ev")],
        "transfer": ["transfer", "train", "--config", "mask_rcnn_R50_FPN_1x_frozen",
                     "--checkpoint", str(ck), "--output-dir", str(tmp_path / "tr")],
    }  # fmt: skip
    for job, argv in jobs.items():
        # the local profile has tasks_per_node: 2 (for pretraining)
        assert main(["submit", *argv, "--profile", "local", "--dry-run"]) == 0
        text = capsys.readouterr().out
        assert "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --nodes=1" in text, job
        assert "# tasks: 1 (`loco " in text
        assert main(["submit", *argv, "--tasks-per-node", "2", "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert "runs one task on one node; drop --tasks-per-node 2" in err, err


def test_refused_before_anything_is_queued(tmp_path, capsys):
    def refused(*argv: str) -> str:
        assert main(["submit", *argv, "--dry-run"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and "Traceback" not in err
        return err

    missing = str(tmp_path / "nope/checkpoint.pt")
    assert "no such file" in refused("eval", "all", "--checkpoint", missing)
    assert "no such file" in refused(
        "transfer", "train", "--config", "mask_rcnn_R50_FPN_1x_frozen", "--checkpoint", missing
    )
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert "does not read as a checkpoint" in refused("eval", "knn", "--checkpoint", str(bad))
    ck = str(fake_checkpoint(tmp_path / "run/checkpoint.pt"))
    # the checkpoint's config with the job's overrides validates now, not on the node
    assert "did you mean 'image_size'" in refused(
        "eval", "knn", "--checkpoint", ck, "data.image_sise=8"
    )
    assert "train.resume" in refused("pretrain", f"train.resume={missing}")
    assert not (tmp_path / "nope").exists()


def test_report_skips_folders_that_are_not_runs(tmp_path, capsys):
    from loco.eval.results import make_row

    parent = tmp_path / "lin_sweep"  # a sweep: task dirs and the array's slurm/ folder
    (parent / "slurm").mkdir(parents=True)
    for lr, top1 in (("0.1", 40.0), ("0.3", 42.5)):
        row = make_row(
            method="loco", backbone="resnet18", stage=4, protocol="linear", top1=top1, top5=90.0,
            dataset="cifar10", checkpoint="abc", n_train=10, n_val=10, lr=float(lr),
        )  # fmt: skip
        (parent / f"lrs={lr}").mkdir()
        (parent / f"lrs={lr}" / "results.json").write_text(json.dumps([row]))
    runs = sorted(str(p) for p in parent.iterdir())  # what the shell makes of lin_sweep/*/
    assert main(["report", *runs]) == 0
    out = capsys.readouterr()
    assert "42.5" in out.out and "40.0" in out.out or "40" in out.out
    assert out.err.count("note: skipped 1 folder(s) without results.json") == 1
    assert str(parent / "slurm") in out.err
    assert main(["report", str(parent / "slurm")]) == 2  # nothing left: an error


def test_sweep_points_and_tags(tmp_path):
    points = submit.sweep_points(["optim.base_lr=0.1,0.3", "model.split=[2, 4],stages"], None)
    assert len(points) == 4 and points[1] == {"optim.base_lr": "0.1", "model.split": "stages"}
    assert points[0]["model.split"] == "[2, 4]"
    f = tmp_path / "sweep.yaml"
    f.write_text("- {method.name: loco, method.temperature: 0.1}\n- {method.name: greedy}\n")
    both = submit.sweep_points(["optim.base_lr=0.1,0.3"], str(f))
    assert len(both) == 4 and both[3] == {"optim.base_lr": "0.3", "method.name": "greedy"}
    tags = {submit.point_tag(p) for p in both}
    assert len(tags) == 4 and "base_lr=0.1_name=loco_temperature=0.1" in tags
    assert submit.sweep_points(None, None) == [{}]
    with pytest.raises(LocoError, match="KEY=V1,V2"):
        submit.sweep_points(["optim.base_lr"], None)


def test_bad_job_arguments_fail_at_submission(tmp_path, capsys):
    assert main(["submit", "pretrain", "optim.bacth_size=3", "--dry-run"]) == 2
    assert "did you mean 'batch_size'" in capsys.readouterr().err
    assert (
        main(["submit", "eval", "knn", "--no-such-flag", "--out", str(tmp_path), "--dry-run"]) == 2
    )


# -- the stop hook and the requeue callable ------------------------------------------------------
def test_request_stop_saves_the_current_step_and_resumes_exactly(cifar_val_root, tmp_path):
    from loco import train

    cfg = load_config(None, tiny(cifar_val_root, tmp_path / "run", "optim.max_steps=6"))
    trainer = train.Pretrainer(cfg)
    original = trainer.train_step

    def step_then_request(batch):
        values = original(batch)
        if trainer.step == 2:  # the 3rd step is running when the request arrives
            train.request_stop("test")
        return values

    trainer.train_step = step_then_request
    with pytest.raises(SystemExit):
        trainer.fit()
    assert ckpt.load(tmp_path / "run" / "checkpoint.pt")["step"] == 3
    assert stop.pending() is None  # consumed
    train.pretrain(cfg)
    assert metric_steps(tmp_path / "run") == [1, 2, 3, 4, 5, 6]


def test_job_checkpoint_requeues_with_resume_until_the_limit(monkeypatch, tmp_path):
    from loco.launch.entry import LocoJob

    job = LocoJob(
        "pretrain", ["optim.max_steps=5"], str(tmp_path), config=Config().to_dict(), max_requeues=2
    )
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    again = job.checkpoint()
    assert again.function is not job and again.function.resume and not job.resume
    assert again.function.config == job.config and again.function.argv == job.argv
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert job.checkpoint() is None  # --max-requeues reached


def test_jobs_command_reads_records_metrics_and_log(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "slurm").mkdir(parents=True)
    log = run / "slurm" / "x.err"
    log.write_text("".join(f"line {i}\n" for i in range(30)) + "progress 1\rprogress 2\n")
    (run / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"step": s, "epoch": s / 4, "loss/s1": 1.0 / s}) + "\n" for s in (1, 2, 7)
        )
    )
    row = {
        "job_id": "987654321",
        "run_dir": str(run),
        "stdout": str(run / "none.out"),
        "stderr": str(log),
    }
    (run / "slurm" / "jobs.jsonl").write_text(json.dumps(row) + "\n")
    assert main(["jobs", str(run), "-n", "3"]) == 0
    text = capsys.readouterr().out
    assert "987654321" in text and "step 7 (epoch 1.75), s1 0.143" in text
    assert "line 28\nline 29\nprogress 2" in text and "line 27" not in text
    # a job's one-line error is shown even when it is not among the last lines
    log.write_text("error: data root '/x' not found\n" + log.read_text())
    assert main(["jobs", str(run), "-n", "3"]) == 0
    assert "987654321 failed with: error: data root '/x' not found" in capsys.readouterr().out
    # a folder of runs: one line per run that has jobs
    (tmp_path / "empty_run").mkdir()
    assert main(["jobs", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith(str(run)) and "987654321" in lines[1]
    assert main(["jobs", str(tmp_path / "empty_run")]) == 2  # nothing recorded there


# -- real jobs on the local cluster -----------------------------------------------------------
STEPS = 40  # preempted and reference runs


@pytest.fixture(scope="module")
def cluster():
    from test_local_cluster import _cluster_problem  # tests/ is on sys.path under pytest

    problem = _cluster_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="module")
def jobs(cluster, cifar_val_root, tmp_path_factory):
    """Submit every real job at once; yields {name: (run dir, job id)}; cancels leftovers.

    The preemption test comes first in this file: it must interrupt its job while it runs."""
    base = tmp_path_factory.mktemp("slurm-runs")
    root = cifar_val_root
    out: dict[str, tuple[Path, str]] = {}

    def run(name: str, *argv: str) -> None:
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            status = main(["submit", *argv])
        assert status == 0, text.getvalue()
        # "submitted job 123: ..." or "submitted array 123 (2 tasks): ..."
        out[name] = (base / name, text.getvalue().split()[2].rstrip(":"))

    run(
        "reference",
        "pretrain",
        "--profile",
        "local",
        *tiny(root, base / "reference", f"optim.max_steps={STEPS}"),
    )
    run(
        "preempted",
        "pretrain",
        "--profile",
        "local",
        *tiny(root, base / "preempted", f"optim.max_steps={STEPS}"),
    )
    run(
        "timeout", "pretrain", "--profile", "local", "--time", "1", "--signal-delay", "20",
        "--max-requeues", "1", *tiny(root, base / "timeout", "optim.max_steps=100000"),
    )  # fmt: skip
    run(
        "requeued", "pretrain", "--profile", "local",
        *tiny(root, base / "requeued", f"optim.max_steps={STEPS}", "data.num_workers=2"),
    )  # fmt: skip
    run(
        "failing", "pretrain", "--profile", "local", "--tasks-per-node", "1",
        *tiny(root, base / "failing", "optim.max_steps=2", f"data.root={base / 'no-data'}"),
    )  # fmt: skip
    run(
        "sweep", "pretrain", "--profile", "local", "--tasks-per-node", "1",
        "--sweep", "optim.base_lr=0.1,0.3", *tiny(root, base / "sweep", "optim.max_steps=2"),
    )  # fmt: skip
    yield out
    ids = [job_id for _, job_id in out.values()]
    subprocess.run(["scancel", *ids], capture_output=True)


def _wait(job_id: str, run_dir: Path, done, timeout_s: float = 400) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        state = (sacct_states([job_id]) or {}).get(job_id)
        if state and done(state):
            return state
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], capture_output=True)
            logs = sorted((run_dir / "slurm").rglob("*_0_log.err"))
            tail = logs[-1].read_text()[-3000:] if logs else "(no log)"
            pytest.fail(f"job {job_id} not done after {timeout_s:.0f} s: {state}\n{tail}")
        time.sleep(1)


def _finished(state: dict) -> bool:
    return state["state"] in DONE


def _log(run_dir: Path) -> str:
    return "".join(p.read_text() for p in sorted((run_dir / "slurm").rglob("*_log.*")))


def _running(run_dir: Path) -> None:
    deadline = time.monotonic() + 300  # a loaded machine takes minutes to start 8 ranks
    while len(metric_steps(run_dir)) < 3:  # training is under way
        assert time.monotonic() < deadline, f"no training steps logged in {run_dir}"
        time.sleep(0.2)
    assert len(metric_steps(run_dir)) < STEPS, f"{run_dir} finished before its interruption"


@pytest.fixture(scope="module")
def interrupted(jobs) -> str:
    """Interrupt the "preempted" and "requeued" jobs while they train; returns what `loco jobs`
    printed for the requeued one right after `scontrol requeue`."""
    import submitit

    run_dir, job_id = jobs["preempted"]
    _running(run_dir)
    submitit.SlurmJob(folder=run_dir / "slurm" / "%j", job_id=job_id)._interrupt()  # SIGTERM, USR2
    # `scontrol requeue` sends SIGTERM to every process of the step, data workers included
    run_dir, job_id = jobs["requeued"]
    _running(run_dir)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert main(["jobs", str(run_dir)]) == 0
    return text.getvalue()


@pytest.mark.slurm
def test_preempted_job_requeues_and_resumes_without_repeating_steps(jobs, interrupted):
    run_dir, job_id = jobs["preempted"]
    state = _wait(job_id, run_dir, lambda s: _finished(s) and s["runs"] >= 2)
    log = _log(run_dir)
    assert state["state"] == "COMPLETED", log[-3000:]
    assert state["runs"] == 2  # one requeue
    assert "stopped by SIG" in log and "resumed from" in log
    assert metric_steps(run_dir) == list(range(1, STEPS + 1))  # each step exactly once
    assert ckpt.load(run_dir / "checkpoint.pt")["step"] == STEPS


@pytest.mark.slurm
def test_scontrol_requeue_with_workers_resumes_exactly(jobs, interrupted):
    run_dir, job_id = jobs["requeued"]
    row = next(ln for ln in interrupted.splitlines() if ln.startswith(job_id))
    assert row.split()[2] == "1", interrupted  # the requeue count is current right away
    state = _wait(job_id, run_dir, lambda s: _finished(s) and s["runs"] >= 2)
    log = _log(run_dir)
    assert state["state"] == "COMPLETED", log[-3000:]
    assert "stopped by SIGTERM" in log and "resumed from" in log, log[-3000:]
    assert "DataLoader worker" not in log and "Traceback" not in log, log[-3000:]
    assert metric_steps(run_dir) == list(range(1, STEPS + 1))  # each step once
    ref_dir, ref_id = jobs["reference"]  # 2 ranks, no workers: the same samples
    _wait(ref_id, ref_dir, _finished)
    a = ckpt.load(ref_dir / "checkpoint.pt")["method"]
    b = ckpt.load(run_dir / "checkpoint.pt")["method"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slurm
def test_error_inside_a_job_is_one_line_and_shown_by_jobs(jobs, capsys):
    run_dir, job_id = jobs["failing"]
    state = _wait(job_id, run_dir, _finished)
    log = _log(run_dir)
    assert state["state"] == "FAILED", log[-3000:]
    errors = [ln for ln in log.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "no-data" in errors[0], log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert main(["jobs", str(run_dir), "-n", "1"]) == 0
    assert f"{job_id} failed with: {errors[0]}" in capsys.readouterr().out


@pytest.mark.slurm
def test_refused_submit_is_one_line_and_leaves_nothing(cluster, tmp_path, capsys):
    for flag, value, said in (
        (
            "--partition",
            "nope",
            "partition 'nope' does not exist on this cluster; partitions: debug",
        ),
        ("--gpus-per-node", "1", "sbatch refused the job: sbatch: error: Invalid generic resource"),
    ):  # the first is our check on the login node, the second sbatch's own refusal
        out = tmp_path / "run"
        argv = ["submit", "pretrain", "--profile", "local", flag, value, f"train.output_dir={out}"]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and said in err and "\n" not in err, err
        assert not out.exists()


@pytest.mark.slurm
def test_two_task_pretraining_completes(jobs):
    run_dir, job_id = jobs["reference"]
    state = _wait(job_id, run_dir, _finished)
    assert state["state"] == "COMPLETED", _log(run_dir)[-3000:]
    assert ckpt.load(run_dir / "checkpoint.pt")["meta"]["world_size"] == 2
    assert metric_steps(run_dir) == list(range(1, STEPS + 1))
    assert "rank 0/2" in _log(run_dir) and "backend gloo" in _log(run_dir)
    record = json.loads((run_dir / "slurm" / "jobs.jsonl").read_text())
    assert record["job_id"] == job_id and Path(record["stderr"]).is_file()


@pytest.mark.slurm
def test_preempted_two_rank_run_matches_uninterrupted_weights(jobs):
    ref_dir, ref_id = jobs["reference"]
    run_dir, job_id = jobs["preempted"]
    _wait(ref_id, ref_dir, _finished)
    assert _wait(job_id, run_dir, _finished)["runs"] >= 2
    a = ckpt.load(ref_dir / "checkpoint.pt")["method"]
    b = ckpt.load(run_dir / "checkpoint.pt")["method"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slurm
def test_time_limit_requeues_then_stops_at_max_requeues(jobs):
    run_dir, job_id = jobs["timeout"]
    state = _wait(job_id, run_dir, lambda s: _finished(s) and s["runs"] >= 2)
    log = _log(run_dir)
    assert state["runs"] == 2, log[-3000:]  # --max-requeues 1
    # not requeued a second time (submitit: "timed-out too many times"); rank 0's error ends
    # the other rank at once (srun --kill-on-bad-exit)
    assert state["state"] == "FAILED"
    assert "requeueing (1/1)" in log and "not requeued" in log
    # USR2 comes 10-40 s into each run (Slurm checks time limits every 30 s). In the training
    # loop, the run saves the current step and requeues; still starting up (a loaded machine),
    # submitit requeues it straight away: either way, no step is logged twice
    steps = metric_steps(run_dir)
    assert steps == list(range(1, len(steps) + 1))
    if steps:
        assert ckpt.load(run_dir / "checkpoint.pt")["step"] == steps[-1]  # saved at the stop


@pytest.mark.slurm
def test_sweep_is_one_array_with_a_dir_per_task(jobs, capsys):
    parent, array_id = jobs["sweep"]
    rows = [json.loads(ln) for ln in (parent / "slurm" / "jobs.jsonl").read_text().splitlines()]
    assert [r["job_id"] for r in rows] == [f"{array_id}_0", f"{array_id}_1"]
    for r in rows:
        state = _wait(r["job_id"], parent, _finished)
        assert state["state"] == "COMPLETED"
    for lr, r in zip(("0.1", "0.3"), rows):
        task = parent / f"base_lr={lr}"
        assert r["run_dir"] == str(task)
        assert ckpt.load(task / "checkpoint.pt")["config"]["optim"]["base_lr"] == float(lr)
        assert (task / "slurm" / "jobs.jsonl").is_file()  # `loco jobs TASK_DIR` works too
    assert main(["jobs", str(parent)]) == 0
    assert capsys.readouterr().out.count("COMPLETED") == 2
