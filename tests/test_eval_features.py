"""Feature cache (reuse, invalidation, correctness), checkpoint loading, and the end-to-end
``evaluate_run`` / ``loco eval`` / ``loco report`` path on a real (tiny) pretraining run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import tiny_overrides

from loco.cli import main
from loco.config import load_config
from loco.data.augment import eval_transform
from loco.data.folder import load_rgb
from loco.errors import LocoError
from loco.eval import features as feat_mod
from loco.eval.features import extract_features, state_hash
from loco.eval.network import load_backbone
from loco.models.heads import pool
from loco.rundir import RunDir

CHANNELS = (16, 32, 64, 128)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: faster on busy cores


def overrides(root: Path, out: Path | None) -> list[str]:
    over = ["optim.batch_size=16", "optim.max_steps=2", "monitor.online_linear=false"]
    return tiny_overrides(root, out, *over, channels=CHANNELS, image_size=32)


@pytest.fixture(scope="module")
def run_dir(tiny_folder_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 2-step LoCo pretraining run: RUN/checkpoint.pt."""
    from loco.train import pretrain

    out = tmp_path_factory.mktemp("run")
    torch.set_num_threads(1)
    pretrain(load_config(None, overrides(tiny_folder_root, out)))
    assert (out / "checkpoint.pt").is_file()
    return out


def test_features_match_a_direct_forward_pass_and_are_reused(run_dir, tmp_path, monkeypatch):
    cfg, backbone, source = load_backbone(run_dir / "checkpoint.pt")
    assert (source.method, source.step) == ("loco", 2)
    assert RunDir.from_checkpoint(source.path).root == run_dir.resolve()
    sets = extract_features(
        cfg, backbone, "val", "1,2,3,4", tmp_path, weights_id=source.weights_id, progress=False
    )
    assert sorted(sets) == [1, 2, 3, 4] and not any(fs.cached for fs in sets.values())
    folder = sets[1].path.parent
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["checkpoint"] == source.weights_id and meta["n"] == 20
    assert meta["transform"] == {
        "resize": 32,
        "center_crop": 32,
        "mean": cfg.data.mean,
        "std": cfg.data.std,
    }

    # the same numbers as the frozen backbone on eval-transformed images, in folder order
    root = Path(cfg.data.root) / "val"
    paths = sorted(root.glob("*/*"))
    x = torch.stack([eval_transform(cfg.data)(load_rgb(p)) for p in paths])
    backbone.eval()
    with torch.no_grad():
        outs = backbone(x)
    for s, fs in sets.items():
        assert fs.features.dtype == np.float16 and isinstance(fs.features, np.memmap)
        assert fs.features.shape == (20, backbone.channels[s - 1])
        np.testing.assert_allclose(fs.features, pool(outs[s - 1]).numpy(), rtol=2e-3, atol=2e-3)
    assert sets[4].labels.tolist() == [i // 2 for i in range(20)]
    assert sets[4].classes[0] == "airplane"

    # same inputs: read back, nothing recomputed (extraction would fail now)
    mtimes = {s: os.stat(fs.path).st_mtime_ns for s, fs in sets.items()}

    def boom(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(feat_mod, "_extract", boom)
    again = extract_features(
        cfg, backbone, "val", [2, 4], tmp_path, weights_id=source.weights_id, progress=False
    )
    assert all(fs.cached for fs in again.values())
    assert {s: os.stat(fs.path).st_mtime_ns for s, fs in again.items()} == {
        s: mtimes[s] for s in (2, 4)
    }
    np.testing.assert_array_equal(again[4].features, sets[4].features)


def test_changed_checkpoint_invalidates_cache(run_dir, tmp_path):
    ckpt_path = run_dir / "checkpoint.pt"
    cfg, backbone, source = load_backbone(ckpt_path)
    first = extract_features(
        cfg, backbone, "val", "last", tmp_path, weights_id=source.weights_id, progress=False
    )

    state = torch.load(ckpt_path, weights_only=True)
    state["backbone"]["conv1.weight"] += 0.5
    changed = tmp_path / "changed.pt"
    torch.save(state, changed)
    cfg2, backbone2, source2 = load_backbone(changed)
    assert source2.weights_id != source.weights_id
    second = extract_features(
        cfg2, backbone2, "val", "last", tmp_path, weights_id=source2.weights_id, progress=False
    )
    assert not second[4].cached
    assert second[4].path.parent != first[4].path.parent
    assert not np.array_equal(second[4].features, first[4].features)
    # without a weights id the state hash keys the cache, and also sees the change
    assert state_hash(backbone) != state_hash(backbone2)


def test_plain_state_dicts_random_init_and_mismatch(tiny_folder_root, tmp_path):
    over = overrides(tiny_folder_root, None)
    torch.manual_seed(1)
    model = timm.create_model("resnet18", num_classes=10, channels=[16, 32, 64, 128])
    model.conv1 = torch.nn.Conv2d(
        3, model.conv1.out_channels, 3, 1, 1, bias=False
    )  # small-image stem
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, plain)
    with pytest.raises(LocoError, match="--backbone"):
        load_backbone(plain, overrides=over)
    cfg, backbone, source = load_backbone(plain, overrides=over, backbone_name="resnet18")
    assert source.method == "plain" and source.step is None
    assert torch.equal(backbone.body.conv1.weight, model.conv1.weight)

    # random init: seeded, same architecture, named as the floor
    _, a, src_a = load_backbone(None, overrides=over, random_init=True, seed=3)
    _, b, _ = load_backbone(None, overrides=over, random_init=True, seed=3)
    _, c, _ = load_backbone(None, overrides=over, random_init=True, seed=4)
    assert state_hash(a) == state_hash(b) != state_hash(c)
    assert (src_a.method, src_a.weights_id) == ("random-init", "random-init-seed3")
    with pytest.raises(LocoError, match="--checkpoint PATH or --random-init"):
        load_backbone(None, overrides=over)

    # a checkpoint of another architecture: one error naming missing and unexpected keys
    wrong = {k.replace("layer4.", "stage4."): v for k, v in model.state_dict().items()}
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(LocoError, match=r"missing keys: layer4\..*unexpected keys: stage4\."):
        load_backbone(tmp_path / "wrong.pt", overrides=over, backbone_name="resnet18")
    with pytest.raises(LocoError, match="stage"):
        extract_features(cfg, backbone, "val", "5", tmp_path, progress=False)


def test_evaluate_run_cli_and_report(run_dir, tiny_folder_root, tmp_path, capsys, caplog):
    from loco.eval import evaluate_run

    cfg = load_config(None, overrides(tiny_folder_root, run_dir))
    rows = evaluate_run(
        cfg, run_dir / "checkpoint.pt", run_dir, stages="3,4", epochs=3, progress=False
    )
    floor = evaluate_run(cfg, None, tmp_path / "random", stages="last", epochs=3, progress=False)
    protocols = {(r["protocol"], r["stage"], r.get("k")) for r in rows}
    # 40 training images: k = 100, 200 are skipped in this quick evaluation
    assert protocols == {
        ("knn-dino", 3, 10),
        ("knn-dino", 3, 20),
        ("linear-cached", 3, None),
        ("knn-dino", 4, 10),
        ("knn-dino", 4, 20),
        ("linear-cached", 4, None),
    }
    for r in rows + floor:
        assert r["n_train"] == 40 and r["n_val"] == 20 and r["dataset"] == tiny_folder_root.name
        assert 0 <= r["top1"] <= r["top5"] <= 100
    assert {r["method"] for r in rows} == {"loco"} and {r["method"] for r in floor} == {
        "random-init"
    }
    assert all(r["lr"] is not None for r in rows if r["protocol"] == "linear-cached")

    # the CLI adds kNN rows of another protocol; earlier rows stay
    ckpt = str(run_dir / "checkpoint.pt")
    assert (
        main(
            [
                "eval",
                "knn",
                "--checkpoint",
                ckpt,
                "--protocol",
                "instdisc",
                "--k",
                "30",
                "--stages",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "knn-instdisc-custom" in capsys.readouterr().out
    saved = json.loads((run_dir / "results.json").read_text())
    assert len(saved) == len(rows) + 1
    # one policy for k > the training set, in `loco eval` as in evaluate_run: skip that k,
    # one warning line naming it (not one per stage); no k left is an error
    caplog.clear()
    assert main(["eval", "knn", "--checkpoint", ckpt, "--stages", "3,4", "--no-progress"]) == 0
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert skipped == ["kNN knn-dino: skipping k=100,200 (only 40 training images)"]
    table_out = capsys.readouterr().out
    assert "| S4 | knn-dino | k=20 |" in table_out and "k=100" not in table_out
    assert (
        main(
            ["eval", "knn", "--checkpoint", ckpt, "--k", "50,60", "--stages", "4", "--no-progress"]
        )
        == 2
    )
    assert "every k (50,60) exceeds the 40 training images" in capsys.readouterr().err

    assert (
        main(
            ["features", "--checkpoint", ckpt, "--split", "val", "--stages", "1,4", "--no-progress"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| S1 | 20 | 16 | new |" in out and "| S4 | 20 | 128 | reused |" in out

    md, png = tmp_path / "table.md", tmp_path / "plot.png"
    assert (
        main(
            ["report", str(run_dir), str(tmp_path / "random"), "--out", str(md), "--plot", str(png)]
        )
        == 0
    )
    table = md.read_text()
    assert "| knn-dino | k=20 |" in table and "random-init" in table and "linear-cached" in table
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_augmented_probe_takes_one_lr_everywhere(run_dir, capsys):
    """Several lrs for the augmented probe: the same one-line error from evaluate_run and
    from `loco eval`, before any weights are read (the old evaluate_run took lrs[0])."""
    from loco.eval import evaluate_run

    with pytest.raises(LocoError, match=r"trains one lr, got 2 \(0.1,1\)"):
        evaluate_run(
            None, run_dir / "checkpoint.pt", knn=False, linear_protocol="augmented", lrs=[0.1, 1]
        )
    ckpt = str(run_dir / "checkpoint.pt")
    argv = ["eval", "linear", "--checkpoint", ckpt, "--protocol", "augmented", "--lrs", "0.1,1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trains one lr, got 2 (0.1,1)" in err
