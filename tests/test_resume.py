"""Resuming with a changed config: refused by default, ``extend`` and ``weights:PATH``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_cfg

from loco import checkpoint as ckpt
from loco import resume
from loco.config import load_config
from loco.errors import LocoError
from loco.rundir import RunDir
from loco.train import Pretrainer


@pytest.fixture(scope="module")
def done(cifar_val_root, tmp_path_factory):
    """A finished 3-step run (batch 8 of 40 images: 5 steps per epoch)."""
    out = tmp_path_factory.mktemp("resume") / "run"
    Pretrainer(tiny_cfg(cifar_val_root, out, "optim.max_steps=3")).fit()
    return out


def test_changed_schedule_is_refused_listing_every_key(cifar_val_root, done):
    before = RunDir(done).config.read_text()
    other = tiny_cfg(cifar_val_root, done, "optim.max_steps=6", "optim.base_lr=0.6")
    with pytest.raises(LocoError) as err:
        Pretrainer(other).fit()
    msg = str(err.value)
    assert "\n" not in msg
    assert "optim.base_lr: 0.3 -> 0.6, optim.max_steps: 3 -> 6" in msg
    assert f"train.resume=weights:{RunDir(done).checkpoint}" in msg
    assert "extend" not in msg  # not only the horizon differs
    longer = tiny_cfg(cifar_val_root, done, "optim.max_steps=6")
    with pytest.raises(LocoError, match="max_steps: 3 -> 6; .*train.resume=extend"):
        Pretrainer(longer).fit()
    assert RunDir(done).config.read_text() == before  # a refused start leaves the run as it was


def test_world_size_and_free_keys():
    cfg = load_config(None, [])
    moved = load_config(None, ["data.root=/elsewhere", "train.log_every=1", "monitor.knn_every=5"])
    assert resume.differences(cfg.to_dict(), moved, 1, 1) == {}
    assert resume.differences(cfg.to_dict(), cfg, 2, 4) == {"world size": (2, 4)}


def test_extend_rebuilds_the_schedule_for_the_new_horizon(cifar_val_root, done):
    cfg = tiny_cfg(cifar_val_root, done, "optim.max_steps=6", "train.resume=extend")
    trainer = Pretrainer(cfg)
    trainer.maybe_resume()
    state = ckpt.load(RunDir(done).checkpoint)
    assert trainer.step == 3
    # the optimizer (momentum) goes on; the lr follows a cosine over 6 steps, at step 3
    saved = state["optimizer"]["state"]
    restored = trainer.optimizer.state_dict()["state"]
    assert restored.keys() == saved.keys() and saved
    for i, s in restored.items():
        assert all(torch.equal(v, saved[i][k]) for k, v in s.items()), i
    trainer.scheduler.step_update(3)
    base = 0.3 * 8 / 256  # base_lr * global batch / 256, warm-up 0, min lr 0
    expected = 0.5 * base * (1 + math.cos(math.pi * 3 / 6))
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-6)
    # anything beyond the horizon is refused even with extend
    wider = tiny_cfg(
        cifar_val_root, done, "optim.max_steps=6", "train.resume=extend", "optim.momentum=0.8"
    )
    with pytest.raises(LocoError, match="also differs in optim.momentum: 0.9 -> 0.8"):
        Pretrainer(wider).maybe_resume()


def test_weights_start_a_new_schedule_in_a_new_run(cifar_val_root, done, tmp_path):
    src = RunDir(done).checkpoint
    cfg = tiny_cfg(
        cifar_val_root, tmp_path / "new", "optim.max_steps=4", "optim.base_lr=0.6",
        f"train.resume=weights:{src}",
    )  # fmt: skip
    trainer = Pretrainer(cfg)
    trainer.maybe_resume()
    assert trainer.step == 0 and trainer.optimizer.state_dict()["state"] == {}
    saved = ckpt.load(src)["method"]
    for k, v in trainer.method.state_dict().items():
        assert torch.equal(v, saved[k]), k
    trainer.scheduler.step_update(0)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.6 * 8 / 256)
    into_old = tiny_cfg(cifar_val_root, done, f"train.resume=weights:{src}")
    with pytest.raises(LocoError, match="starts a new run, but .* already holds one"):
        Pretrainer(into_old).fit()


def test_checkpoint_saved_with_a_stem_width_timm_ignored_resumes_and_evaluates(
    cifar_val_root, done, tmp_path, caplog
):
    """Runs saved before loco refused ``model.kwargs.stem_width`` on a plain ResNet stem
    (timm ignores it there: the same network) resume and evaluate without it, with a
    one-line warning; where it shapes the stem (a deep stem) it stays."""
    import shutil

    from loco.config import ModelConfig
    from loco.eval.network import load_backbone

    old = tmp_path / "old"
    shutil.copytree(done, old, symlinks=True)
    path = RunDir(old).checkpoint.resolve()
    state = ckpt.load(path)
    state["config"]["model"]["kwargs"]["stem_width"] = 8  # as the quickstart once wrote
    ckpt.atomic_save(state, path)

    with caplog.at_level("WARNING", logger="loco.models"):
        trainer = Pretrainer(tiny_cfg(cifar_val_root, old, "optim.max_steps=3"))
        trainer.maybe_resume()
        cfg, backbone, _ = load_backbone(path)
    assert trainer.step == 3
    assert "stem_width" not in cfg.model.kwargs
    assert torch.equal(backbone.body.conv1.weight, state["backbone"]["conv1.weight"])
    warnings = [r.getMessage() for r in caplog.records if "stem_width=8" in r.getMessage()]
    assert len(warnings) == 2 and all("\n" not in w for w in warnings)
    from loco.models.backbone import drop_ignored_kwargs

    deep = ModelConfig(backbone="resnet18", kwargs={"stem_type": "deep", "stem_width": 16})
    assert drop_ignored_kwargs(deep, "deep.pt") is deep
    with pytest.raises(LocoError, match="remove stem_width"):  # in a config of one's own
        Pretrainer(
            tiny_cfg(cifar_val_root, old, "model.kwargs={channels: [8, 16, 32, 64], stem_width: 8}")
        )


# -- momentum (EMA) objectives ---------------------------------------------------------------
EMA = ("method.name=loco", "method.objective=byol", "optim.max_steps=4")


@pytest.fixture(scope="module")
def ema_run(cifar_val_root, tmp_path_factory):
    """BYOL under loco (a momentum copy of every module and decoder), 4 steps."""
    out = tmp_path_factory.mktemp("ema") / "run"
    Pretrainer(tiny_cfg(cifar_val_root, out, *EMA)).fit()
    return out


def test_momentum_objective_resumes_exactly(cifar_val_root, ema_run, tmp_path):
    """Stopped after step 2 and resumed, BYOL leaves the online weights, every momentum copy
    (method state) and the momentum backbone (``backbone_ema``) of the uninterrupted run."""
    from loco.stop import request_stop

    part = Pretrainer(tiny_cfg(cifar_val_root, tmp_path / "part", *EMA))
    original = part.train_step

    def step_then_stop(batch):
        values = original(batch)
        if part.step == 1:  # step 2 is running
            request_stop("test")
        return values

    part.train_step = step_then_stop
    with pytest.raises(SystemExit):
        part.fit()
    assert ckpt.load(RunDir(tmp_path / "part").checkpoint)["step"] == 2
    Pretrainer(tiny_cfg(cifar_val_root, tmp_path / "part", *EMA)).fit()
    a, b = ckpt.load(RunDir(ema_run).checkpoint), ckpt.load(RunDir(tmp_path / "part").checkpoint)
    assert b["step"] == 4
    assert any(k.startswith("momentum.") for k in a["method"])
    for key in ("method", "backbone", "backbone_ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs after resume"
    logged = [json.loads(line) for line in RunDir(ema_run).metrics.read_text().splitlines()]
    assert all(line["collapse/std"] > 0 for line in logged)  # the collapse check is logged
    for line in logged:  # the trainer moved the copies after each optimizer step (0-based k)
        k = line["step"] - 1
        assert line["momentum"] == pytest.approx(1 - 0.004 * (math.cos(math.pi * k / 4) + 1) / 2)
    # the momentum backbone is its own network, not the online one
    assert any(not torch.equal(a["backbone"][k], v) for k, v in a["backbone_ema"].items())


def test_eval_and_export_read_the_momentum_backbone(ema_run, done, tmp_path):
    from loco.eval.evaluate import evaluate_run
    from loco.eval.network import load_backbone
    from loco.export import export

    state = ckpt.load(RunDir(ema_run).checkpoint)
    _, backbone, source = load_backbone(RunDir(ema_run).checkpoint, ema=True)
    assert source.method == "loco+byol-ema" and source.weights_id.endswith("-ema")
    for k, v in backbone.body.state_dict().items():
        assert torch.equal(v, state["backbone_ema"][k]), k
    rows = evaluate_run(
        None, RunDir(ema_run).checkpoint, tmp_path, ema=True, linear=False, stages="last",
        ks=[5], train_per_class=4, val_per_class=2, progress=False,
    )  # fmt: skip
    assert {r["method"] for r in rows} == {"loco+byol-ema"}
    out = export(ema_run, "timm", tmp_path / "ema.pth", ema=True)
    exported = torch.load(out.path)
    assert out.metadata["weights"] == "ema"
    assert exported.keys() <= state["backbone_ema"].keys()
    assert all(torch.equal(v, state["backbone_ema"][k]) for k, v in exported.items())
    with pytest.raises(LocoError, match=r"holds no momentum \(EMA\) weights.*drop --ema"):
        load_backbone(RunDir(done).checkpoint, ema=True)
