"""fp16 with gradient scaling (for GPUs without bf16), run on CPU's fp16 autocast, and
Weights & Biases logging in offline mode."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_overrides

from loco.config import load_config
from loco.train import Pretrainer, pretrain


def _cfg(root, out, *extra):
    over = ["optim.name=sgd", "train.device=cpu", "monitor.online_linear=false", *extra]
    return load_config(None, tiny_overrides(root, out, *over))


def _grads(trainer: Pretrainer) -> dict[str, torch.Tensor]:
    """Unscaled gradients of one step on the first batch. Under fp16 an overflowing first
    scale (65536) is lowered as the scaler does between steps, until the step is finite."""
    from loco.train import autocast_for

    views, labels, _ = next(iter(trainer.loader))
    trainer.method.train()
    for _ in range(24):
        trainer.optimizer.zero_grad(set_to_none=True)
        with torch.random.fork_rng(), autocast_for(trainer.cfg, trainer.device):
            torch.manual_seed(0)
            trainer.method.training_step(views, labels)
        grads = {n: p.grad for n, p in trainer.method.named_parameters() if p.grad is not None}
        if not trainer.scaler.is_enabled():
            return grads
        trainer.scaler.unscale_(trainer.optimizer)
        if all(torch.isfinite(g).all() for g in grads.values()):
            return grads
        trainer.scaler.update()  # overflow: halve the scale
    raise AssertionError("fp16 gradients never became finite")


@pytest.mark.parametrize("method", ["e2e", "loco"])
def test_fp16_scaled_gradients_match_fp32(tiny_folder_root, tmp_path, method, one_thread):
    """Every local loss is scaled by the same factor and unscaled once: the gradients of all
    modules and decoders are those of fp32, up to fp16 rounding."""
    ref = _grads(Pretrainer(_cfg(tiny_folder_root, tmp_path / "a", f"method.name={method}")))
    half_trainer = Pretrainer(
        _cfg(tiny_folder_root, tmp_path / "b", f"method.name={method}", "train.precision=fp16")
    )
    assert half_trainer.scaler.get_scale() > 1  # a real scale, not 1
    half = _grads(half_trainer)
    assert half.keys() == ref.keys() and len(ref) > 10
    for name in ref:
        assert torch.isfinite(half[name]).all(), name
        err = (half[name] - ref[name]).norm() / ref[name].norm().clamp_min(1e-8)
        assert err < 0.15, (name, float(err))  # fp16 rounding; a missed or doubled scale is >= 1
    flat_ref = torch.cat([g.flatten() for g in ref.values()])
    flat_half = torch.cat([half[n].flatten() for n in ref])
    assert (flat_half - flat_ref).norm() / flat_ref.norm() < 0.03


def test_fp16_inf_gradient_skips_the_step_on_every_module(tiny_folder_root, tmp_path, one_thread):
    trainer = Pretrainer(
        _cfg(tiny_folder_root, tmp_path / "r", "method.name=loco", "train.precision=fp16")
    )
    original = trainer.method.training_step

    def poisoned(views, labels=None):
        out = original(views, labels)
        top = trainer.method.backbone.module_parameters(trainer.method.backbone.num_modules - 1)
        top[0].grad[0] = float("inf")  # one gradient entry of the top module overflows
        return out

    trainer.method.training_step = poisoned
    before = {n: p.detach().clone() for n, p in trainer.method.named_parameters()}
    scale = trainer.scaler.get_scale()
    values = trainer.train_step(next(iter(trainer.loader)))
    assert all(torch.equal(p, before[n]) for n, p in trainer.method.named_parameters())
    assert values["loss_scale"] == scale / 2
    trainer.method.training_step = original
    for _ in range(24):  # unpoisoned: steps are skipped only while the scale overflows fp16
        scale = trainer.scaler.get_scale()
        if trainer.train_step(next(iter(trainer.loader)))["loss_scale"] >= scale:
            break
    assert any(not torch.equal(p, before[n]) for n, p in trainer.method.named_parameters())


def test_wandb_offline_logs_metrics_and_continues_the_same_run(
    tiny_folder_root, tmp_path, monkeypatch
):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    cfg = _cfg(tiny_folder_root, out, "optim.max_steps=2", "train.wandb=true")
    run = pretrain(cfg)
    run_id = (run / "wandb_id").read_text().strip()
    first = sorted((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(first) == 1
    # a requeued job (same run dir, train.resume=extend to a longer horizon) logs into the same id
    pretrain(
        _cfg(tiny_folder_root, out, "optim.max_steps=3", "train.wandb=true", "train.resume=extend")
    )
    assert (run / "wandb_id").read_text().strip() == run_id
    assert len(sorted((run / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
    # the scalars of metrics.jsonl are in both W&B run files (protobuf keeps keys as text)
    keys = set(json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])) - {"step"}
    assert {"loss/s4", "lr"} <= keys
    for log_file in (run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"):
        data = log_file.read_bytes()
        assert all(k.encode() in data for k in keys), log_file
