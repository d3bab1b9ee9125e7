"""Linear probes: the cached lr sweep against an independent logistic regression, and the
augmented probe leaving the frozen backbone (weights and BN statistics) untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loco.config import load_config
from loco.errors import LocoError
from loco.eval.features import FeatureSet
from loco.eval.linear import (
    PRESETS,
    linear_probe_augmented,
    linear_probe_cached,
    preset_for,
    stratified_holdout,
)
from loco.models.backbone import build_backbone

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: faster on busy cores


def gaussians(n_train, n_val, C, D, spread, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(C, D)) * 3
    scale = rng.uniform(0.2, 5, size=D)  # uneven feature scales: BN in front matters

    def draw(n):
        y = np.arange(n) % C
        return ((centers[y] + spread * rng.normal(size=(n, D))) * scale).astype(np.float32), y

    return draw(n_train), draw(n_val)


def sets(x, y, stage=1):
    return {stage: FeatureSet(x, y, stage)}


def test_separable_features_high_accuracy_and_lr_reported():
    (xt, yt), (xv, yv) = gaussians(400, 200, 4, 32, spread=0.5)
    proj = np.random.default_rng(1).normal(size=(32, 48)).astype(np.float32)
    train = {1: FeatureSet(xt, yt, 1), 2: FeatureSet(xt @ proj, yt, 2)}
    val = {1: FeatureSet(xv, yv, 1), 2: FeatureSet(xv @ proj, yv, 2)}
    lrs = (0.001, 0.1, 1.0)
    results = linear_probe_cached(train, val, lrs, epochs=15, batch_size=64, device="cpu")
    assert [r.stage for r in results] == [1, 2]
    for r in results:
        assert r.protocol == "linear-cached"
        assert r.top1 > 95 and r.top5 == 100
        assert r.lr in lrs and set(r.sweep) == {"0.001", "0.1", "1"}
        assert r.holdout_top1 == max(r.sweep.values())
        assert (r.n_train, r.n_val, r.epochs) == (400, 200, 15)


def reference_logistic(xt, yt, xv, C, steps=400):
    """Independent: standardise with the training mean/std, full-batch Adam on softmax CE."""
    x = torch.from_numpy(xt).double()
    mean, std = x.mean(0), x.std(0, unbiased=False)
    x = (x - mean) / std
    y = torch.from_numpy(yt)
    torch.manual_seed(0)
    W = torch.zeros(x.shape[1], C, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(C, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=0.05)
    for _ in range(steps):
        loss = F.cross_entropy(x @ W + b, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    xv_ = (torch.from_numpy(xv).double() - mean) / std
    return (xv_ @ W + b).argmax(1).numpy()


def test_cached_probe_matches_independent_logistic_regression():
    C = 6
    (xt, yt), (xv, yv) = gaussians(900, 600, C, 24, spread=7, seed=2)
    (r,) = linear_probe_cached(
        sets(xt, yt), sets(xv, yv), (0.01, 0.1, 1.0), epochs=30, batch_size=128, device="cpu"
    )
    ref = 100 * np.mean(reference_logistic(xt, yt, xv, C) == yv)
    assert 50 < ref < 90  # a non-trivial problem
    assert abs(r.top1 - ref) < 4, (r.top1, ref)


def test_cached_probe_is_seeded_and_checks_inputs():
    (xt, yt), (xv, yv) = gaussians(120, 60, 3, 8, spread=2.0)
    a = linear_probe_cached(sets(xt, yt), sets(xv, yv), (0.1, 1.0), epochs=3, device="cpu")
    b = linear_probe_cached(sets(xt, yt), sets(xv, yv), (0.1, 1.0), epochs=3, device="cpu")
    assert a == b
    with pytest.raises(LocoError, match="stages"):
        linear_probe_cached(sets(xt, yt), sets(xv, yv, stage=2), (0.1,), epochs=1)
    with pytest.raises(LocoError, match="positive lrs"):
        linear_probe_cached(sets(xt, yt), sets(xv, yv), (0.0,), epochs=1)


def test_holdout_is_stratified_and_seeded():
    y = np.repeat(np.arange(5), [10, 20, 30, 2, 1])
    fit, held = stratified_holdout(y, 0.1, seed=3)
    assert len(np.intersect1d(fit, held)) == 0 and len(fit) + len(held) == len(y)
    assert np.bincount(y[held], minlength=5).tolist() == [1, 2, 3, 1, 0]
    np.testing.assert_array_equal(held, stratified_holdout(y, 0.1, seed=3)[1])
    assert not np.array_equal(held, stratified_holdout(y, 0.1, seed=4)[1])


def test_presets_by_architecture():
    assert preset_for("resnet50").name == "resnet"
    assert preset_for("vit_small_patch16_224").name == "vit"
    assert preset_for("resnet50", "vit").name == "vit"
    assert PRESETS["resnet"].aug_lr / PRESETS["vit"].aug_lr >= 1e3  # orders of magnitude apart
    assert PRESETS["resnet"].aug_schedule == "step" and PRESETS["resnet"].aug_momentum == 0
    with pytest.raises(LocoError, match="unknown"):
        preset_for("resnet50", "convnet")


def _probe_input(root):
    """A quarter-width ResNet-18 at seed 0 and the config of the images it probes."""
    over = ["data.dataset=folder", "model.kwargs={channels: [16, 32, 64, 128]}"]
    cfg = load_config(None, [f"data.root={root}", *over, "data.num_workers=0"])
    torch.manual_seed(0)
    return cfg, build_backbone(cfg.model, cfg.data.image_size)


@pytest.mark.parametrize("schedule", ["step", "cosine"])
def test_augmented_probe_leaves_backbone_untouched(tiny_folder_root, schedule):
    cfg, backbone = _probe_input(tiny_folder_root)
    backbone.train()
    # non-trivial BN statistics, so a forward pass in train mode would visibly change them
    with torch.no_grad():
        for m in backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    results = linear_probe_augmented(
        cfg,
        backbone,
        "3,4",
        schedule=schedule,
        epochs=1,
        batch_size=16,
        device="cpu",
        progress=False,
    )
    after = backbone.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"{k} changed"
    assert backbone.training  # mode restored
    assert all(p.grad is None for p in backbone.parameters())
    assert [(r.stage, r.protocol, r.lr, r.epochs) for r in results] == [
        (3, f"linear-aug-{schedule}", 30.0, 1),
        (4, f"linear-aug-{schedule}", 30.0, 1),
    ]
    assert all((r.n_train, r.n_val) == (40, 20) for r in results)
    assert all(0 <= r.top1 <= r.top5 <= 100 for r in results)


def test_step_schedule_divides_by_ten_at_30_60_90_percent():
    """The paper's schedule on 100 epochs: x0.1 at epochs 30, 60 and 90."""
    from loco.eval.linear import _lr_factor

    got = {e: _lr_factor("step", e, 100) for e in (0, 29, 30, 59, 60, 89, 90, 99)}
    assert got == pytest.approx(
        {0: 1, 29: 1, 30: 0.1, 59: 0.1, 60: 0.01, 89: 0.01, 90: 1e-3, 99: 1e-3}
    )


def test_augmented_probe_trains_with_the_step_schedule(tiny_folder_root, monkeypatch):
    """The lr of every optimizer step of a real 10-epoch probe: base lr 30 x batch/256,
    x0.1 from epoch 3, 6 and 9 (30/60/90 %)."""
    cfg, backbone = _probe_input(tiny_folder_root)
    seen: list[float] = []
    step = torch.optim.SGD.step

    def recording_step(self, *args, **kwargs):  # observe the lr, then the real step
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    linear_probe_augmented(
        cfg,
        backbone,
        "last",
        epochs=10,
        batch_size=8,
        train_per_class=1,
        val_per_class=1,
        device="cpu",
        progress=False,
    )
    per_epoch = len(seen) // 10
    assert per_epoch >= 1 and len(seen) == 10 * per_epoch
    base = 30.0 * 8 / 256
    expected = [base] * 3 + [base / 10] * 3 + [base / 100] * 3 + [base / 1000]
    assert seen == pytest.approx([lr for lr in expected for _ in range(per_epoch)])
