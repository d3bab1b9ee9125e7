"""Stage parallelism with real gloo processes on CPU, in float64.

``sync`` must equal the single-process step (today's ``training_step`` + optimizer, or its
data-parallel version with replicas); ``pipelined`` must equal a single-process simulation
of the schedule stated in loco/parallel/stage.py, written here independently (deep copies
of the model instead of weight stashing, recomputation instead of two-pass graphs). The
sabotage cases drop a send or a feedback and check that the comparison then fails.
"""

from __future__ import annotations

import copy

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
def _pretrain_worker(rank, port, overrides, stop_on, out) -> None:
    import os

    from loco import train

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
    try:
        train.pretrain(cfg)
        out[rank] = "done"
    except SystemExit as exc:
        out[rank] = f"exit {exc.code}"
    finally:
        dist.destroy_process_group()


def pretrain_2_ranks(root, run_dir, *extra, stop_on=-1) -> dict:
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
        mp.spawn(_pretrain_worker, args=(free_port(), overrides, stop_on, out), nprocs=2)
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
