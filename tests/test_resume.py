"""Resuming with a changed config: refused by default, ``extend`` and ``weights:PATH``."""

from __future__ import annotations

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
