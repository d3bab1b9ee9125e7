"""The small comparison (docs/results.md): every config of its table parses and trains one
step on real images, the method configs differ from the shared protocol only where they
should, the ImageNet variants parse, and ``tools/compare.py`` runs end to end on a tiny
budget, resumes an interrupted run and skips finished work when run again."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loco import checkpoint as ckpt
from loco.config import load_config
from loco.train import pretrain, request_stop

ROOT = Path(__file__).resolve().parents[1]
SMALL = sorted((ROOT / "configs" / "small").glob("*.yaml"))
IMAGENET = sorted((ROOT / "configs").glob("imagenet_resnet50_*.yaml"))


def tiny_data(root: Path) -> list[str]:
    """A handful of real CIFAR-10 images (2 per class from the val split), batch 8."""
    return [
        "data.dataset=folder",
        f"data.root={root}",
        "data.train_split=val",
        "data.per_class=2",
        "optim.batch_size=8",
        "data.num_workers=0",
    ]


def load_compare():
    spec = importlib.util.spec_from_file_location("compare", ROOT / "tools" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_method_of_the_table_has_a_config():
    names = {p.stem for p in SMALL}
    assert "base" in names
    assert set(load_compare().VARIANTS) <= names


def test_method_configs_change_only_method_and_decoder():
    base = load_config(ROOT / "configs" / "small" / "base.yaml").to_dict()
    for path in SMALL:
        cfg = load_config(path).to_dict()
        for section in ("data", "model", "optim", "monitor"):
            assert cfg[section] == base[section], f"{path.name} changes {section}"
        assert {k: v for k, v in cfg["train"].items() if k != "output_dir"} == {
            k: v for k, v in base["train"].items() if k != "output_dir"
        }
        assert cfg["optim"]["max_steps"] > 0  # the comparison counts steps, not epochs
    conv = {p.stem: load_config(p).decoder.conv_block for p in SMALL}
    # the fair baseline and the local methods share LoCo's decoder; e2e keeps SimCLR's head
    assert conv["e2e"] is False and conv["e2e_deep"] is True
    assert conv["greedy"] and conv["loco"] and conv["loco_no_s1"]
    assert (
        load_config(ROOT / "configs" / "small" / "loco_no_s1.yaml").method.first_stage_loss is False
    )


@pytest.mark.parametrize("path", SMALL, ids=lambda p: p.stem)
def test_small_config_trains_one_step(path, cifar_val_root, tmp_path, one_thread):
    cfg = load_config(
        path,
        [
            *tiny_data(cifar_val_root),
            "optim.max_steps=1",
            f"train.output_dir={tmp_path / path.stem}",
            "train.progress=false",
            "train.log_every=1",
        ],
    )
    run_dir = pretrain(cfg)
    assert ckpt.load(run_dir / "checkpoint.pt")["step"] == 1
    (line,) = (run_dir / "metrics.jsonl").read_text().splitlines()
    losses = {k: v for k, v in json.loads(line).items() if k.startswith("loss/")}
    assert losses and all(math.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("path", IMAGENET, ids=lambda p: p.stem)
def test_imagenet_configs_parse(path):
    cfg = load_config(path)
    assert cfg.model.backbone == "resnet50" and cfg.optim.batch_size * 32 == 4096
    assert cfg.optim.epochs in (100, 800)
    assert f"{cfg.optim.epochs}ep" in path.stem
    assert cfg.train.output_dir.endswith(path.stem.replace("imagenet_resnet50_", ""))


def test_compare_smoke_resume_and_skip(cifar_val_root, tmp_path, one_thread):
    out, docs = tmp_path / "out", tmp_path / "docs"
    argv = [
        "--steps", "2", "--methods", "e2e,loco", "--seeds", "0",
        "--eval-train-per-class", "3", "--eval-val-per-class", "2", "--linear-epochs", "2",
        "--bench-batch", "4", "--bench-steps", "1", "--out", str(out), "--docs", str(docs),
        *tiny_data(cifar_val_root),
    ]  # fmt: skip
    # an interrupted pretraining: the loop stops (and saves) after its first step
    compare = load_compare()
    cfg = compare.pretrain_config(compare.parse_args(argv), "e2e", 0)
    cfg.train.progress = False
    request_stop("test")
    with pytest.raises(SystemExit):
        pretrain(cfg)
    assert ckpt.load(out / "e2e" / "seed0" / "checkpoint.pt")["step"] == 1

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "tools" / "compare.py"), *argv]
    first = subprocess.run(
        [*cmd, "-v"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    assert "resumed from" in first.stderr and "at step 1/2" in first.stderr

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"]["complete"]
    for name in ("random_init", "e2e", "loco", "simclr_independent"):
        entry = summary["methods"][name]
        assert set(entry["knn"]) == set(entry["linear"]) == {"1", "2", "3", "4"}, name
        assert all(0 <= v["mean"] <= 100 for v in entry["knn"].values())
    assert summary["methods"]["e2e"]["seeds"]["0"]["steps"] == 2
    assert summary["methods"]["simclr_independent"]["own_knn_top1"]["mean"] >= 0
    bench = summary["bench"]
    assert bench["e2e"]["ratios"]["flops"] == 1.0
    assert bench["loco"]["ratios"]["flops"] > 1.0  # three more decoders than e2e
    assert bench["e2e"]["ratios"]["step_s"] == 1.0 and bench["loco"]["ratios"]["step_s"] > 0
    text = (docs / "results.md").read_text()
    assert "NOT YET RUN" not in text and "| `loco` |" in text and "loco pretrain --config" in text
    assert (docs / "results_top1.png").stat().st_size > 0

    mtime = (out / "loco" / "seed0" / "checkpoint.pt").stat().st_mtime
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout.count("done, skipped") == 9
    assert (out / "loco" / "seed0" / "checkpoint.pt").stat().st_mtime == mtime
