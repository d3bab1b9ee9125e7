"""``model.split``: its grammar checked at config load, and ``balanced:K`` cuts."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from loco import checkpoint as ckpt
from loco.bench import module_profile
from loco.config import Config, ModelConfig, load_config
from loco.errors import LocoError
from loco.models.backbone import build_backbone
from loco.models.balance import balanced_cuts
from loco.plans import parse_split
from loco.train import pretrain


@pytest.mark.parametrize(
    "value", ["stagez", "balanced", "balanced:0", "balanced:4:bytes", "balanced:x", "[3, 2]", "0"]
)
def test_bad_split_fails_at_config_load(value):
    with pytest.raises(LocoError, match="model.split"):
        load_config(None, [f"model.split={value}"])


@pytest.mark.parametrize(
    "value, kind, count",
    [
        ("stages", "stages", 0),
        ("blocks", "blocks", 0),
        ("3", "count", 3),
        ("[2, 4]", "cuts", 0),
        ("balanced:4", "balanced", 4),
        ("balanced:4:flops", "balanced", 4),
    ],
)
def test_good_split_loads(value, kind, count):
    cfg = load_config(None, [f"model.split={value}"])
    spec = parse_split(cfg.model.split)
    assert (spec.kind, spec.count) == (kind, count)
    assert spec.metric == ("flops" if value.endswith("flops") else "saved")


def test_balanced_cuts_match_brute_force():
    rng = random.Random(0)
    for _ in range(30):
        n, k = rng.randint(1, 9), rng.randint(1, 5)
        if k > n:
            continue
        costs = [rng.randint(1, 50) for _ in range(n)]
        best = min(
            max(sum(costs[a:b]) for a, b in zip((0, *cuts), (*cuts, n)))
            for cuts in itertools.combinations(range(1, n), k - 1)
        )
        cuts = balanced_cuts(costs, k)
        assert len(cuts) == k - 1 and cuts == sorted(set(cuts)) and all(0 < c < n for c in cuts)
        assert max(sum(costs[a:b]) for a, b in zip((0, *cuts), (*cuts, n))) == best


def _spread(cfg: Config) -> float:
    """max/min of the modules' saved bytes, measured module by module by loco bench."""
    views = [torch.randn(2, 3, cfg.data.image_size, cfg.data.image_size)] * 2
    saved = [m["saved_bytes"] for m in module_profile(cfg, "none", views, 0)]
    return max(saved) / min(saved)


@pytest.mark.usefixtures("one_thread")
def test_balanced_split_covers_blocks_and_evens_resnet50():
    cfg = load_config(None, ["model.backbone=resnet50", "data.image_size=32"])
    blocks = build_backbone(
        ModelConfig(backbone="resnet50", split="blocks"), 32
    ).groups  # one unit list per block
    units = [u for g in blocks for u in g]
    cfg.model.split = "balanced:4"
    bb = build_backbone(cfg.model, 32)
    assert bb.num_modules == 4 and all(bb.groups)
    assert [u for g in bb.groups for u in g] == units  # every unit once, in order
    assert bb.block_costs is not None and len(bb.block_costs) == len(blocks)
    balanced = _spread(cfg)
    cfg.model.split = "stages"
    stages = _spread(cfg)
    assert balanced < stages, (balanced, stages)

    cfg.model.split = "balanced:4:flops"
    flops = build_backbone(cfg.model, 32)
    assert flops.cuts != bb.cuts  # the other measurement cuts elsewhere on ResNet-50
    # given cuts (a resumed run's) are used as they are, without measuring
    again = build_backbone(cfg.model, 32, cuts=bb.cuts)
    assert again.cuts == bb.cuts and again.block_costs is None


def test_balanced_cuts_are_kept_in_checkpoint_meta(cifar_val_root, tmp_path):
    from conftest import tiny_cfg

    cfg = tiny_cfg(cifar_val_root, tmp_path / "r", "optim.max_steps=1", "model.split=balanced:3")
    run_dir = pretrain(cfg)
    state = ckpt.load(run_dir / "checkpoint.pt")
    measured = build_backbone(cfg.model, cfg.data.image_size).cuts
    assert state["meta"]["split_cuts"] == measured and len(measured) == 2
    assert state["config"]["model"]["split"] == "balanced:3"  # the config stays as written


def test_resume_takes_the_checkpoints_cuts(cifar_val_root, tmp_path):
    """A resumed balanced run splits where its checkpoint says, not where a new measurement
    would (the measurement could change with the code or torch)."""
    from conftest import tiny_cfg

    from loco.train import Pretrainer

    cfg = tiny_cfg(cifar_val_root, tmp_path / "r", "optim.max_steps=1", "model.split=balanced:3")
    run_dir = pretrain(cfg)
    path = run_dir / "checkpoint.pt"
    state = ckpt.load(path)
    measured = state["meta"]["split_cuts"]
    other = [1, 2] if measured != [1, 2] else [2, 3]
    state["meta"]["split_cuts"] = other
    ckpt.atomic_save(state, path.resolve())
    assert Pretrainer(cfg).method.backbone.cuts == other


@pytest.mark.usefixtures("one_thread")
def test_eval_and_export_cut_a_balanced_run_where_its_checkpoint_says(tmp_path):
    """``loco eval`` (its random-init floor too) and ``loco export`` build a ``balanced:K``
    run's modules from the checkpoint's ``meta.split_cuts``, not from a new measurement."""
    from loco.eval.network import load_backbone
    from loco.export import _stage_names, export_metadata
    from loco.weights import read_weights

    cfg = load_config(
        None,
        [
            "model.kwargs={channels: [8, 16, 32, 64]}",
            "data.image_size=16",
            "model.split=balanced:3",
        ],
    )
    measured = build_backbone(cfg.model, 16)
    other = [1, 2] if measured.cuts != [1, 2] else [2, 3]
    torch.manual_seed(0)
    trained = build_backbone(cfg.model, 16, cuts=other)
    path = tmp_path / "checkpoint.pt"
    meta = {"method": "loco", "split_cuts": other}
    state = {"backbone": trained.body.state_dict(), "config": cfg.to_dict(), "meta": meta}
    ckpt.atomic_save({**state, "step": 1}, path)

    _, backbone, _ = load_backbone(path)
    assert backbone.cuts == other and backbone.block_costs is None  # nothing measured
    assert torch.equal(backbone.body.conv1.weight, trained.body.conv1.weight)
    assert load_backbone(path, random_init=True)[1].cuts == other
    assert load_backbone(path, overrides=["model.split=stages"])[1].num_modules == 4
    stages = export_metadata(read_weights(path), state["config"])["stages"]
    assert stages == _stage_names(trained) != _stage_names(measured)
