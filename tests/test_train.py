"""The training loop on real images: falling loss, atomic checkpoints, exact resume."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from conftest import metric_rows, tiny_cfg

from loco import checkpoint as ckpt
from loco.errors import LocoError
from loco.train import Pretrainer, pretrain


def weights(run_dir):
    return ckpt.load(run_dir / "checkpoint.pt")["method"]


@pytest.fixture(scope="module")
def uninterrupted(cifar_val_root, tmp_path_factory):
    """The 8-step run of each method, trained once for the module."""
    runs = {}

    def get(method):
        if method not in runs:
            out = tmp_path_factory.mktemp(f"full-{method}")
            pretrain(tiny_cfg(cifar_val_root, out, "optim.max_steps=8", f"method.name={method}"))
            runs[method] = out
        return runs[method]

    return get


# 5 steps per epoch (40 images, batch 8): a stop after step 5 is at an epoch end (saved by
# the epoch-end save), after step 3 mid-epoch (saved by the stop path; the resumed loader
# skips the epoch's first 3 batches)
@pytest.mark.parametrize("method, stop_after", [("loco", 5), ("greedy", 5), ("loco", 3)])
def test_resume_after_sigterm_equals_uninterrupted(
    cifar_val_root, tmp_path, uninterrupted, method, stop_after
):
    part = tiny_cfg(cifar_val_root, tmp_path / "part", "optim.max_steps=8", f"method.name={method}")
    trainer = Pretrainer(part)
    original = trainer.train_step

    def step_then_preempt(batch):
        values = original(batch)
        if trainer.step == stop_after - 1:  # this step is running: SIGTERM arrives mid-run
            os.kill(os.getpid(), signal.SIGTERM)
        return values

    trainer.train_step = step_then_preempt
    with pytest.raises(SystemExit):
        trainer.fit()
    assert ckpt.load(tmp_path / "part" / "checkpoint.pt")["step"] == stop_after
    pretrain(part)  # resume=auto

    a, b = weights(uninterrupted(method)), weights(tmp_path / "part")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    steps = [row["step"] for row in metric_rows(tmp_path / "part")]
    assert steps == list(range(1, 9)), "metrics must have each step exactly once"


def test_loss_falls_on_real_images(cifar_val_root, tmp_path):
    cfg = tiny_cfg(
        cifar_val_root,
        tmp_path / "run",
        "optim.max_steps=30",
        "data.per_class=8",
        "optim.batch_size=32",
        "optim.name=adamw",
        "optim.base_lr=0.004",
        "optim.weight_decay=0",
    )
    pretrain(cfg)
    rows = metric_rows(tmp_path / "run")
    first = sum(r["loss/s4"] for r in rows[:5]) / 5
    last = sum(r["loss/s4"] for r in rows[-5:]) / 5
    assert last < first - 0.05, (first, last)
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_resume_rejects_other_model(cifar_val_root, tmp_path):
    pretrain(tiny_cfg(cifar_val_root, tmp_path / "r", "optim.max_steps=1"))
    other = tiny_cfg(cifar_val_root, tmp_path / "r", "optim.max_steps=2", "method.name=greedy")
    with pytest.raises(LocoError, match="differs in .*method.name: loco -> greedy"):
        pretrain(other)


def test_checkpoint_loading_errors(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(LocoError, match="cannot read checkpoint"):
        ckpt.load(bad)
    import timm

    model = timm.create_model("resnet18", num_classes=0)
    state = timm.create_model("resnet34", num_classes=0).state_dict()
    with pytest.raises(LocoError, match="does not fit this backbone.*unexpected keys"):
        ckpt.load_backbone_weights(model, state, "r34.pt")


def test_atomic_save_keeps_old_checkpoint_on_failure(tmp_path, monkeypatch):
    ckpt.save_run_checkpoint(tmp_path, {"step": 1}, 1)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        ckpt.save_run_checkpoint(tmp_path, {"step": 2}, 2)
    assert ckpt.load(tmp_path / "checkpoint.pt")["step"] == 1


def test_knn_monitor_and_online_probe_are_logged(cifar_val_root, tmp_path):
    cfg = tiny_cfg(
        cifar_val_root,
        tmp_path / "m",
        "optim.max_steps=2",
        "monitor.knn_every=2",
        "monitor.knn_train_per_class=3",
        "monitor.knn_val_per_class=2",
        "monitor.knn_k=5",
        "data.val_split=val",
    )
    pretrain(cfg)
    rows = metric_rows(tmp_path / "m")
    assert 0.0 <= rows[-1]["monitor/knn_top1"] <= 100.0
    assert {"online/acc", "online/loss", "lr", "img_per_s", "peak_mem_mb"} <= rows[-1].keys()


# loco: its own two-pass graphs (ModuleGraph); e2e, greedy, infopro: torch.utils.checkpoint
@pytest.mark.parametrize("method", ["loco", "e2e", "greedy", "infopro"])
def test_recompute_plan_changes_memory_not_the_step(cifar_val_root, tmp_path, method):
    """``train.recompute`` takes bench's plans; recomputation must not change the step."""
    runs = {}
    for plan in ("none", "S1=all;S2=1"):
        cfg = tiny_cfg(
            cifar_val_root,
            tmp_path / plan,
            "optim.max_steps=3",
            f"train.recompute={plan}",
            f"method.name={method}",
        )
        trainer = Pretrainer(cfg)
        runs[plan] = trainer
        trainer.fit()
    assert all(r.method.name == method for r in runs.values())
    assert runs["S1=all;S2=1"].method.backbone.recompute[:2] == [True, 1]
    # weights and BatchNorm running statistics (a recomputed forward must not count twice)
    a, b = (r.method.state_dict() for r in runs.values())
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    stem_bn = runs["S1=all;S2=1"].method.backbone.body.bn1  # in S1, recomputed each step
    assert stem_bn.num_batches_tracked.item() == 3
    with pytest.raises(LocoError, match="S1..S4"):
        Pretrainer(tiny_cfg(cifar_val_root, tmp_path / "bad", "train.recompute=S7=1"))
