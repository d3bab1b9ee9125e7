"""Stage parallelism with real gloo processes on CPU, in float64.

``sync`` must equal the single-process step (today's ``training_step`` + optimizer, or its
data-parallel version with replicas); ``pipelined`` must equal a single-process simulation
of the schedule stated in loco/parallel/stage.py, written here independently (deep copies
of the model instead of weight stashing, recomputation instead of two-pass graphs). The
sabotage cases drop a send or a feedback and check that the comparison then fails.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_cfg

from loco.config import Config
from loco.methods import build_method
from loco.models.backbone import build_backbone
from loco.optim import build_optimizer, build_scheduler

SIZE, B = 16, 4


def make_cfg(method: str, stages: int) -> Config:
    cfg = Config()
    cfg.method.name = method
    cfg.model.backbone = "resnet18"
    cfg.model.kwargs = {"channels": [8, 16, 32, 64]}
    cfg.model.split = stages
    cfg.data.image_size = SIZE
    cfg.decoder.hidden_dim, cfg.decoder.out_dim = 32, 16
    cfg.optim.name, cfg.optim.base_lr, cfg.optim.momentum = "sgd", 0.5, 0.9
    cfg.optim.batch_size, cfg.optim.max_steps, cfg.optim.warmup_epochs = B, 10, 0
    return cfg


def make_model(cfg: Config, replicas: int = 1):
    torch.manual_seed(0)
    method = build_method(build_backbone(cfg.model, SIZE), cfg).double()
    opt = build_optimizer(method, cfg.optim, replicas)
    sched = build_scheduler(opt, cfg.optim, cfg.optim.max_steps, 100)
    return method, opt, sched


def batch(replica: int, t: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * replica + t)
    return [torch.randn(B, 3, SIZE, SIZE, generator=g, dtype=torch.float64) for _ in range(2)]


def reference(cfg: Config, steps: int, replica: int = 0, replicas: int = 1) -> dict:
    """Today's step: ``training_step``, gradient average (with replicas), optimizer."""
    from loco.distributed import average_gradients

    method, opt, sched = make_model(cfg, replicas)
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        method.training_step(batch(replica, t))
        average_gradients(list(method.parameters()), ref_group)
        sched.step_update(t)
        opt.step()
    return {n: p.detach().clone() for n, p in method.named_parameters()}


ref_group = None


def _worker(rank, world, stages, cfg, schedule, steps, drains, sabotage, init, out) -> None:
    global ref_group
    from loco.losses import negatives_group
    from loco.parallel.layout import check_request, make_groups
    from loco.parallel.stage import StageEngine, owned_parameter_names

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    layout = check_request(stages, world, cfg.method.name, stages)
    groups = make_groups(layout, rank)
    method, opt, sched = make_model(cfg, layout.replicas)
    engine = StageEngine(method, opt, sched, layout, rank, groups, schedule)
    if sabotage:
        real_recv = engine._recv

        def recv(src, device):  # drop what comes from below (send) or above (feedback)
            x = real_recv(src, device)
            dropped = (sabotage == "send" and src < rank) or (sabotage == "feedback" and src > rank)
            return torch.zeros_like(x) if dropped else x

        engine._recv = recv
    replica = layout.replica_of(rank)
    for t in range(steps):
        engine.feed(batch(replica, t), None)
        if t + 1 in drains:
            engine.drain()
    engine.drain()
    named = dict(method.named_parameters())
    mine = {n: named[n].detach().clone() for n in owned_parameter_names(method, engine.k)}
    ref = None
    ref_ranks = list(range(layout.replicas))  # today's data parallelism on R ranks
    ref_group = dist.new_group(ref_ranks)
    if rank in ref_ranks and schedule == "sync":
        with negatives_group(ref_group):
            ref = reference(cfg, steps, rank, layout.replicas)
    out[rank] = (layout.stage_of(rank), replica, mine, ref, engine.applied)
    dist.destroy_process_group()


def run(method, world, stages, schedule="sync", steps=2, drains=(), sabotage=None, tmp=None):
    cfg = make_cfg(method, stages)
    tmp.mkdir(parents=True, exist_ok=True)
    with mp.Manager() as manager:
        out = manager.dict()
        args = (world, stages, cfg, schedule, steps, set(drains), sabotage, str(tmp / "init"), out)
        mp.spawn(_worker, args=args, nprocs=world, join=True)
        return cfg, dict(out)


def max_difference(results: dict, want_by_replica: dict[int, dict]) -> float:
    worst = 0.0
    for stage, replica, mine, _, _ in results.values():
        want = want_by_replica[replica]
        assert mine, f"stage {stage} owns no parameters"
        for n, p in mine.items():
            worst = max(worst, float((p - want[n]).detach().abs().max()))
    return worst


CASES = [  # (method, world, stages)
    ("greedy", 2, 2),
    ("loco", 2, 2),
    ("loco", 4, 4),
    ("greedy", 4, 2),  # 2 stages x 2 replicas
    ("loco", 4, 2),
]


@pytest.mark.distributed
@pytest.mark.parametrize("method, world, stages", CASES)
def test_sync_equals_single_process_step(method, world, stages, tmp_path):
    _, results = run(method, world, stages, tmp=tmp_path)
    refs = {r: results[r][3] for r in range(world // stages)}
    # the weights move: a test that compares unchanged weights would pass trivially
    start = dict(make_model(make_cfg(method, stages))[0].named_parameters())
    assert max_difference(results, {r: start for r in refs}) > 1e-3
    assert max_difference(results, refs) < 1e-10
    assert all(applied == 2 for *_, applied in results.values())


@pytest.mark.distributed
@pytest.mark.parametrize(
    "method, world, stages, sabotage",
    [("greedy", 2, 2, "send"), ("loco", 4, 2, "feedback")],
)
def test_sync_comparison_fails_when_a_message_is_dropped(method, world, stages, sabotage, tmp_path):
    _, results = run(method, world, stages, sabotage=sabotage, tmp=tmp_path)
    refs = {r: results[r][3] for r in range(world // stages)}
    assert max_difference(results, refs) > 1e-6


def simulate_pipelined(cfg: Config, steps: int, drains: set[int]) -> dict:
    """loco's pipelined schedule as stated in loco/parallel/stage.py, in one process:
    a stage below the top runs batch t on a deep copy of the model taken before it applies
    batch t-1's update, and updates with the gradient of L_k(t) + <h_k(t), fb_k(t)> on that
    copy once the stage above has produced fb_k(t); the top runs on the live model."""
    method, opt, sched = make_model(cfg)
    top = method.backbone.num_modules - 1

    def stage_names(k: int) -> list[str]:
        from loco.parallel.stage import owned_parameter_names

        return owned_parameter_names(method, k)

    def update(k: int, t: int, model, objective: torch.Tensor) -> None:
        names = stage_names(k)
        params = dict(model.named_parameters())
        grads = torch.autograd.grad(objective, [params[n] for n in names], allow_unused=True)
        live = dict(method.named_parameters())
        for n, g in zip(names, grads):
            live[n].grad = g
        sched.step_update(t)
        opt.step()
        opt.zero_grad(set_to_none=True)

    pending: dict[int, tuple] = {}  # stage -> (t, copy, loss, h)
    feedback: dict[int, torch.Tensor] = {}  # stage -> dL_{k+1}/dh_k of its pending batch
    for t in range(steps):
        x = torch.cat(batch(0, t))
        for k in range(top + 1):
            model = method if k == top else copy.deepcopy(method)
            x_in = x.detach().requires_grad_(k > 0)
            h = model.backbone.forward_module(k, x_in)
            loss = model.head_loss(k, h)
            if k > 0:
                (feedback[k - 1],) = torch.autograd.grad(loss, x_in, retain_graph=True)
            if k == top:
                update(k, t, model, loss)
            else:
                if k in pending:
                    t0, m0, loss0, h0 = pending.pop(k)
                    update(k, t0, m0, loss0 + (h0 * feedback[k]).sum())
                pending[k] = (t, model, loss, h)
            x = h
        if t + 1 in drains or t + 1 == steps:
            for k, (t0, m0, loss0, h0) in sorted(pending.items()):
                update(k, t0, m0, loss0 + (h0 * feedback[k]).sum())
            pending.clear()
    return {n: p.detach().clone() for n, p in method.named_parameters()}


@pytest.mark.distributed
def test_pipelined_greedy_equals_single_process_step(tmp_path):
    """greedy has no feedback: pipelining changes when an update happens, not what it is."""
    _, results = run("greedy", 2, 2, "pipelined", steps=4, drains={2}, tmp=tmp_path)
    assert max_difference(results, {0: reference(make_cfg("greedy", 2), 4)}) < 1e-10


@pytest.mark.distributed
def test_pipelined_loco_follows_the_stated_schedule(tmp_path):
    """3 stages (a middle one sends feedback and waits for it), a drain after step 3 as
    before a checkpoint; two runs are bitwise equal; the stale schedule differs from sync."""
    cfg, first = run("loco", 3, 3, "pipelined", steps=5, drains={3}, tmp=tmp_path / "a")
    _, second = run("loco", 3, 3, "pipelined", steps=5, drains={3}, tmp=tmp_path / "b")
    for rank in first:
        for n, p in first[rank][2].items():
            assert torch.equal(p, second[rank][2][n]), f"rank {rank}: {n} differs between runs"
    assert max_difference(first, {0: simulate_pipelined(cfg, 5, {3})}) < 1e-10
    assert max_difference(first, {0: reference(cfg, 5)}) > 1e-6  # feedback really is stale
    assert all(applied == 5 for *_, applied in first.values())


# -- the trainer: torchrun-style environment, real images, checkpoints ------------------------
def _poison(rank: int, poison: dict[str, int] | None) -> None:
    """Sabotage rank 1 (stage S2) at a given batch (0 = the first): ``inf_grad`` puts an inf
    into one gradient entry before the update (an fp16 overflow); ``nan_weight`` a NaN into
    one weight before the forward (a non-finite loss on that stage only)."""
    from loco.parallel.stage import StageEngine

    if rank != 1 or not poison:
        return
    apply, feed = StageEngine._apply, StageEngine.feed

    def _apply(self, t):
        if t == poison.get("inf_grad"):
            self.params[0].grad.view(-1)[0] = float("inf")
        apply(self, t)

    def _feed(self, views, labels):
        if self.fed == poison.get("nan_weight"):
            with torch.no_grad():
                self.params[0].view(-1)[0] = float("nan")
        feed(self, views, labels)

    StageEngine._apply, StageEngine.feed = _apply, _feed


def _pretrain_worker(rank, port, overrides, stop_on, out, poison=None) -> None:
    import os

    from loco import train
    from loco.errors import LocoError

    torch.set_num_threads(1)
    os.environ.update(
        WORLD_SIZE="2",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    cfg = tiny_cfg(*overrides)
    if rank == stop_on:
        train.request_stop("test")  # as USR2 through loco.launch.job: stop after one step
    _poison(rank, poison)
    try:
        train.pretrain(cfg)
        out[rank] = "done"
    except SystemExit as exc:
        out[rank] = f"exit {exc.code}"
    except LocoError as exc:
        out[rank] = f"error: {exc}"
    finally:
        dist.destroy_process_group()


def pretrain_2_ranks(root, run_dir, *extra, stop_on=-1, poison=None) -> dict:
    from loco.distributed import free_port

    overrides = [
        root,
        run_dir,
        "optim.max_steps=4",
        "train.ckpt_every=2",
        "method.name=loco",
        "model.split=2",
        "train.stage_parallel=2",
        *extra,
    ]
    with mp.Manager() as manager:
        out = manager.dict()
        args = (free_port(), overrides, stop_on, out, poison)
        mp.spawn(_pretrain_worker, args=args, nprocs=2)
        return dict(out)


@pytest.mark.distributed
def test_trainer_checkpoint_stop_and_exact_resume(cifar_val_root, tmp_path):
    from loco import checkpoint as ckpt
    from loco.train import pretrain

    assert pretrain_2_ranks(cifar_val_root, tmp_path / "full") == {0: "done", 1: "done"}
    # a stop request on rank 1 only: both ranks stop and save at the same step
    stopped = pretrain_2_ranks(cifar_val_root, tmp_path / "part", stop_on=1)
    assert stopped == {0: "exit 130", 1: "exit 130"}
    assert ckpt.load(tmp_path / "part" / "checkpoint.pt")["step"] == 1
    assert pretrain_2_ranks(cifar_val_root, tmp_path / "part") == {0: "done", 1: "done"}
    full = ckpt.load(tmp_path / "full" / "checkpoint.pt")
    part = ckpt.load(tmp_path / "part" / "checkpoint.pt")
    assert full["step"] == part["step"] == 4
    for name, value in full["method"].items():
        assert torch.equal(value, part["method"][name]), f"{name} differs after resume"
    # one checkpoint in today's format: every entry of the single-process model, full size
    cfg = tiny_cfg(cifar_val_root, tmp_path / "one", "method.name=loco", "model.split=2")
    model = build_method(build_backbone(cfg.model, cfg.data.image_size), cfg)
    assert set(full["method"]) == set(model.state_dict())
    for name, value in model.state_dict().items():
        assert full["method"][name].shape == value.shape, name
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(full["optimizer"]["state"]) == trainable  # every stage's momentum
    # ... which the single-process trainer resumes (without stage parallelism)
    cfg = tiny_cfg(
        cifar_val_root,
        tmp_path / "full",
        "method.name=loco",
        "model.split=2",
        "optim.max_steps=5",
        "train.ckpt_every=2",
        "train.resume=extend",
    )
    pretrain(cfg)
    assert ckpt.load(tmp_path / "full" / "checkpoint.pt")["step"] == 5


@pytest.mark.distributed
def test_trainer_holds_the_run_lock(cifar_val_root, tmp_path):
    """Another run (here: this process) holds the run dir: both stage ranks stop in one line
    before writing anything."""
    from loco.rundir import RunDir
    from loco.runlock import RunLock

    run_dir = tmp_path / "run"
    with RunLock(RunDir(run_dir).lock):
        out = pretrain_2_ranks(cifar_val_root, run_dir)
    assert set(out) == {0, 1}
    for rank, result in out.items():
        assert result.startswith("error: run dir") and "in use" in result, (rank, result)
        assert "\n" not in result
    assert not RunDir(run_dir).metrics.exists() and not (run_dir / "checkpoint.pt").exists()


@pytest.mark.distributed
def test_trainer_bf16_balanced_split_and_wandb(cifar_val_root, tmp_path, monkeypatch):
    """bf16 autocast across 2 stages; ``balanced:2:flops`` cuts the same on both ranks and
    stored in the checkpoint's meta; W&B (offline) gets the metrics."""
    from loco import checkpoint as ckpt

    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    extra = ["optim.max_steps=2", "model.split=balanced:2:flops", "train.precision=bf16"]
    assert pretrain_2_ranks(cifar_val_root, run_dir, *extra, "train.wandb=true") == {
        0: "done",
        1: "done",
    }
    state = ckpt.load(run_dir / "checkpoint.pt")
    cfg = tiny_cfg(cifar_val_root, run_dir, "method.name=loco", "model.split=balanced:2:flops")
    want = build_backbone(cfg.model, cfg.data.image_size).cuts  # measured here, independently
    assert state["meta"]["split_cuts"] == want and len(want) == 1
    assert state["config"]["model"]["split"] == "balanced:2:flops"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["loss/s1"]) and math.isfinite(r["loss/s2"]), r
        assert r["peak_mem_mb/s1"] > 0 and r["peak_mem_mb/s2"] > 0
    run_id = (run_dir / "wandb_id").read_text().strip()
    assert sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))


@pytest.mark.distributed
def test_trainer_fp16_overflow_skips_on_both_stages_and_a_nan_stops_both(cifar_val_root, tmp_path):
    """fp16: an inf in stage S2's gradient (step 1) halves the one scale and skips the step
    on S1 too; a NaN loss on S2 (step 4) stops both ranks, keeping the step-3 checkpoint."""
    from loco import checkpoint as ckpt
    from loco.rundir import RunDir

    run_dir = tmp_path / "run"
    extra = ["optim.max_steps=5", "train.ckpt_every=1", "train.keep_checkpoints=5"]
    poison = {"inf_grad": 0, "nan_weight": 3}
    out = pretrain_2_ranks(cifar_val_root, run_dir, *extra, "train.precision=fp16", poison=poison)
    for rank in (0, 1):  # S1's own loss is finite: it stops because S2's is not
        assert out[rank].startswith("error: non-finite loss at step 4 on rank(s) 1"), out[rank]
        assert "\n" not in out[rank]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss_scale"] == 65536 / 2  # the inf on S2 halved the scale of both
    cfg = tiny_cfg(cifar_val_root, run_dir, "method.name=loco", "model.split=2")
    torch.manual_seed(cfg.train.seed)
    start = build_method(build_backbone(cfg.model, cfg.data.image_size), cfg).state_dict()
    first = ckpt.load(RunDir(run_dir).step_checkpoint(1))
    assert first["step"] == 1 and first["scaler"]["scale"] == rows[0]["loss_scale"]
    trained = [n for n in start if n.endswith(".weight") and start[n].dtype.is_floating_point]
    # S1 (not poisoned) skipped too: every weight of both stages is still the initial one
    for name in trained:
        assert torch.equal(first["method"][name], start[name]), name
    last = ckpt.load(run_dir / "checkpoint.pt")
    assert last["step"] == 3  # the last good checkpoint is kept
    assert any(not torch.equal(last["method"][n], start[n]) for n in trained)


@pytest.mark.parametrize(
    "stages, world, method, modules, message",
    [
        (3, 4, "greedy", 3, "does not divide the world size 4"),
        (2, 4, "loco", 4, "model.split gives 4 local modules"),
        (2, 2, "e2e", 2, "needs a local method"),
    ],
)
def test_bad_requests_fail_in_one_line(stages, world, method, modules, message):
    from loco.errors import LocoError
    from loco.parallel.layout import check_request

    with pytest.raises(LocoError, match=message) as err:
        check_request(stages, world, method, modules)
    assert "\n" not in str(err.value)


def test_bad_config_fails_before_any_process_starts():
    from loco.config import load_config
    from loco.errors import LocoError
    from loco.parallel.layout import check_modules, stage_mapping
    from loco.parallel.trainer import check_config

    with pytest.raises(LocoError, match="e2e"):
        load_config(None, ["method.name=e2e", "train.stage_parallel=2"])
    with pytest.raises(LocoError, match="no trainable parameters"):
        check_modules([120, 0, 40])
    cfg = load_config(None, ["method.name=loco", "train.stage_parallel=2"])
    with pytest.raises(LocoError, match="torchrun --nproc_per_node=2"):
        check_config(cfg, world=1)
    for bad, message in [
        (["train.precision=fp16", "train.stage_schedule=pipelined"], "precision=fp16"),
        (["train.compile=true"], "train.compile"),
    ]:
        cfg = load_config(None, ["method.name=loco", "train.stage_parallel=2", *bad])
        with pytest.raises(LocoError, match=message) as err:
            check_config(cfg, world=2)
        assert "\n" not in str(err.value)
    with pytest.raises(LocoError, match="does not divide"):
        stage_mapping("pretrain", 4, nodes=1, tasks_per_node=2)
    mapping = stage_mapping("pretrain", 2, nodes=2, tasks_per_node=2)
    assert "task 2 (node 1, local 0) -> stage S1, replica 1" in mapping


def test_schedule_model_on_hand_computed_costs():
    from loco.parallel.schedule import StageCost, predict

    # greedy: stage 1 = 1 + 0.5 + 2 = 3.5 s, stage 2 = 2 + 0.5 + 3 = 5.5 s, 9 s in one process
    greedy = [StageCost(1, 0.5, 0, 2, 0), StageCost(2, 0.5, 0, 3, 0)]
    assert predict(greedy, False, "pipelined")["speedup"] == pytest.approx(9 / 5.5)
    assert predict(greedy, False, "sync")["speedup"] == pytest.approx(9 / (1 + 5.5))
    # loco: stage 1's weight pass (2 s) waits for stage 2's one backward pass (3 s); 1 byte
    # per second makes the 1-byte activation and the cotangent cost 1 s each way
    loco = [StageCost(1, 0.5, 0, 2, 1), StageCost(2, 0.5, 0, 3, 1)]
    # sync: stage 2 starts at 1 + 1 (send), its feedback is ready at 2 + 5.5, arrives at 8.5
    assert predict(loco, True, "sync", bandwidth=1)["step_s"] == pytest.approx(8.5 + 2)
    # pipelined: both start at 0; feedback ready at 5.5, arrives at 6.5
    assert predict(loco, True, "pipelined", bandwidth=1)["step_s"] == pytest.approx(6.5 + 2)


def test_memory_model_per_stage():
    from loco.parallel.schedule import StageCost, memory

    mib = 2**20
    costs = [StageCost(1, 0, 0, 2, 0, saved_bytes=10 * mib, param_bytes=mib, head_saved_bytes=mib)]
    costs += [StageCost(1, 0, 0, 2, 0, saved_bytes=4 * mib, param_bytes=3 * mib) for _ in range(2)]
    sync = memory(costs, True, "sync", opt_slots=1, input_bytes=5 * mib)
    # weights: params + grads + 1 momentum; activations: saved (+ the decoder's on S1)
    assert [m["total_bytes"] // mib for m in sync] == [3 + 11, 9 + 4, 9 + 4]
    piped = memory(costs, True, "pipelined", opt_slots=2, input_bytes=5 * mib)
    # below the top: two batches' graphs and a stash of the weights; stage k queues k inputs
    assert [m["batches_kept"] for m in piped] == [2, 2, 1]
    assert [m["queued_batches"] for m in piped] == [0, 1, 2]
    assert [m["total_bytes"] // mib for m in piped] == [5 + 21, 15 + 8 + 5, 12 + 4 + 10]
    greedy = memory(costs, False, "pipelined", opt_slots=1)
    assert [m["batches_kept"] for m in greedy] == [1, 1, 1]


def test_stage_bytes_add_up_to_the_whole_forward():
    """Each stage's saved bytes (its module run on a detached input) add up to what one
    forward of the whole backbone saves, counted independently, plus the boundary tensor
    that each side of a cut keeps; they scale with the batch."""
    from loco.parallel.schedule import stage_bytes
    from loco.profiling import SavedTensorTracker

    cfg = make_cfg("greedy", 2)
    torch.manual_seed(0)
    method = build_method(build_backbone(cfg.model, SIZE), cfg).train()
    rows = stage_bytes(method, SIZE, images=2)
    x = torch.randn(4, 3, SIZE, SIZE)
    with SavedTensorTracker([*method.parameters(), *method.buffers()]) as whole:
        outs = method.backbone(x)  # kept: its graph holds what was saved
        want = whole.live
    del outs
    # the boundary: S1's last op and S2's first both save it; on two devices it is held twice
    assert sum(r["saved_bytes"] for r in rows) == want + rows[0]["out_bytes"]
    assert want > 0
    assert all(r["head_saved_bytes"] > 0 and r["param_bytes"] > 0 for r in rows)
    doubled = stage_bytes(method, SIZE, images=4)
    assert [r["saved_bytes"] for r in doubled] == [2 * r["saved_bytes"] for r in rows]


def test_bench_flops_model_only(tmp_path, capsys):
    """``loco bench --stage-parallel K --steps 0 --flops-model ...``: no timing; greedy's
    pipelined speed-up is 1 / the largest FLOP share (backward = 2 x forward everywhere)."""
    from loco.cli import main

    out = tmp_path / "stage.json"
    argv = ["bench", "--stage-parallel", "2", "--steps", "0", "--batch", "4",
            "--flops-model", "resnet18:32:balanced:2:flops", "--out", str(out),
            "decoder.hidden_dim=32", "decoder.out_dim=16"]  # fmt: skip
    assert main(argv) == 0
    assert "FLOPs model" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["rows"] == []  # nothing timed
    rows = {(r["method"], r["schedule"]): r for r in result["flops_model"]}
    assert len(rows) == 4 and all(len(r["cuts"]) == 1 for r in rows.values())
    greedy = rows["greedy", "pipelined"]
    assert abs(sum(greedy["flop_shares_pct"]) - 100) < 0.2
    assert greedy["predicted_speedup"] == pytest.approx(100 / max(greedy["flop_shares_pct"]), 0.01)
    kept = [m["batches_kept"] for m in rows["loco", "pipelined"]["memory"]]
    assert kept == [2, 1] and [m["batches_kept"] for m in rows["loco", "sync"]["memory"]] == [1, 1]
