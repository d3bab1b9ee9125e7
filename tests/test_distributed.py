"""Cross-rank negatives with 2 real gloo processes, and Slurm node-list parsing."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from loco.distributed import expand_nodelist

B, D, W, T = 3, 5, 2, 0.5


def global_loss(z_by_rank: list[torch.Tensor]) -> torch.Tensor:
    """NT-Xent over the union of all ranks, written directly: every other embedding is a
    negative, the other view of the same image (same rank, index +-B) the positive."""
    z = F.normalize(torch.cat(z_by_rank), dim=1)
    n = z.shape[0]
    losses = []
    for r in range(W):
        for i in range(2 * B):
            q = r * 2 * B + i
            pos = r * 2 * B + (i + B) % (2 * B)
            logits = torch.stack([z[q] @ z[m] / T for m in range(n) if m != q])
            losses.append(torch.logsumexp(logits, 0) - z[q] @ z[pos] / T)
    return torch.stack(losses).mean()


def _worker(rank: int, init_file: str, data: torch.Tensor, out: dict) -> None:
    from loco.distributed import average_gradients
    from loco.losses import nt_xent

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W)
    z = data[rank].clone().requires_grad_(True)
    loss = nt_xent(z, T, gather=True)
    loss.backward()
    # the trainer averages parameter gradients over ranks; do the same for a "parameter"
    param = torch.nn.Parameter(torch.zeros(1))
    param.grad = torch.tensor([float(rank + 1)])
    average_gradients([param])
    out[rank] = (loss.detach(), z.grad.clone(), param.grad.clone())
    dist.destroy_process_group()


@pytest.mark.distributed
def test_nt_xent_negatives_from_all_ranks(tmp_path):
    torch.manual_seed(0)
    data = torch.randn(W, 2 * B, D, dtype=torch.float64)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(str(tmp_path / "init"), data, out), nprocs=W, join=True)
        results = dict(out)

    leaves = [data[r].clone().requires_grad_(True) for r in range(W)]
    ref = global_loss(leaves)
    ref.backward()
    mean_loss = sum(results[r][0] for r in range(W)) / W
    assert torch.allclose(mean_loss, ref.detach(), rtol=1e-9)
    for r in range(W):
        # rank r's gradient covers all ranks' losses; averaged over W it is the global one
        assert torch.allclose(results[r][1] / W, leaves[r].grad, rtol=1e-8, atol=1e-12)
        assert results[r][2].item() == pytest.approx(1.5)


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
        ("node1", ["node1"]),
        ("a[1-2],b3", ["a1", "a2", "b3"]),
        ("rack1-n[008-010]", ["rack1-n008", "rack1-n009", "rack1-n010"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def _uneven_worker(rank: int, init_file: str, out: dict) -> None:
    from loco.losses import gather_with_grad

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W)
    x = torch.full((rank + 1, 2), float(rank), requires_grad=True)  # rank 0: 1 row, rank 1: 2 rows
    gathered, start = gather_with_grad(x)
    (gathered.sum() * (rank + 1)).backward()
    out[rank] = (gathered.detach(), start, x.grad.clone())
    dist.destroy_process_group()


@pytest.mark.distributed
def test_gather_handles_uneven_batches(tmp_path):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_uneven_worker, args=(str(tmp_path / "init"), out), nprocs=W, join=True)
        results = dict(out)
    for rank in range(W):
        gathered, start, grad = results[rank]
        assert gathered[:, 0].tolist() == [0.0, 1.0, 1.0]
        assert start == rank  # rank 1's rows start after rank 0's single row
        assert torch.all(grad == 3.0)  # d/dx of sum over ranks of (rank+1) * sum(gathered)


def _pretrain_worker(rank: int, init_file: str, root: str, run: str, out: dict) -> None:
    """Rank 1's loss turns NaN at step 3 (checkpoints every 2 steps); then both ranks resume."""
    from conftest import tiny_cfg
    from timm.layers import drop_path

    from loco.errors import LocoError
    from loco.train import Pretrainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W)
    cfg = tiny_cfg(root, run, "optim.max_steps=4", "train.ckpt_every=2", "optim.batch_size=4")
    trainer = Pretrainer(cfg)
    weights = torch.cat([p.detach().flatten() for p in trainer.method.parameters()])
    draws = drop_path(torch.ones(64, 1, 1, 1), 0.5, training=True).flatten()
    original = trainer.method.training_step

    def nan_on_rank_1(views, labels):
        result = original(views, labels)
        if rank == 1 and trainer.step == 2:  # the 3rd step
            key = next(iter(result.losses))
            result.losses[key] = torch.tensor(float("nan"))
        return result

    trainer.method.training_step = nan_on_rank_1
    try:
        trainer.fit()
        error = None
    except LocoError as exc:
        error = str(exc)
    again = Pretrainer(cfg)  # train.resume=auto: each rank gets its own generators back
    again.maybe_resume()
    out[rank] = (weights, draws, error, again.step, torch.get_rng_state())
    dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_draw_apart_stop_together_and_resume_their_own_rng(cifar_val_root, tmp_path):
    from loco import checkpoint as ckpt
    from loco.rundir import RunDir

    run = tmp_path / "run"
    args = (str(tmp_path / "init"), str(cifar_val_root), str(run))
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_pretrain_worker, args=(*args, out), nprocs=W, join=True)
        results = dict(out)
    (w0, d0, e0, s0, rng0), (w1, d1, e1, s1, rng1) = results[0], results[1]
    assert torch.equal(w0, w1)  # identical initial weights
    assert not torch.equal(d0, d1)  # but each rank drops different paths
    for error in (e0, e1):  # one clear error, at the same step, on every rank
        assert error is not None and "\n" not in error
        assert "non-finite loss at step 3 on rank 1" in error and "is kept" in error
    state = ckpt.load(RunDir(run).checkpoint)
    assert state["step"] == 2  # the last good checkpoint
    saved = [r["torch"] for r in state["rng_per_rank"]]
    assert not torch.equal(saved[0], saved[1])
    assert (s0, s1) == (2, 2)
    assert torch.equal(rng0, saved[0]) and torch.equal(rng1, saved[1])
    assert not RunDir(run).lock.exists()  # rank 0 held it and released it on the error
