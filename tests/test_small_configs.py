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


def test_compare_smoke_resume_and_skip(cifar_val_root, tmp_path, one_thread, capsys):
    out, docs = tmp_path / "compare", tmp_path / "docs"
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

    # the objectives section's SimCLR rows and floor are these runs: skipped, and reported
    # with the e2e-minus-loco gap and the collapse check from their cached eval features
    rows = ["--section", "objectives", "--methods", "e2e_simclr,loco_simclr"]
    shared = [a for i, a in enumerate(argv) if "--out" not in argv[i - 1 : i + 1]]
    shared = [a for i, a in enumerate(shared) if "--methods" not in shared[i - 1 : i + 1]]
    objectives = [*rows, "--runs", str(tmp_path), *shared]
    capsys.readouterr()
    assert compare.main(objectives) == 0
    assert capsys.readouterr().out.count("done, skipped") == 5  # floor + 2 x (pretrain, eval)
    assert (out / "loco" / "seed0" / "checkpoint.pt").stat().st_mtime == mtime
    block = (docs / "results.md").read_text().split("<!-- section: objectives -->")[1]
    summary = json.loads((tmp_path / "compare_objectives" / "summary.json").read_text())
    e2e, loco = (summary["methods"][f"{r}_simclr"]["knn"]["4"]["mean"] for r in ("e2e", "loco"))
    assert f"| kNN | e2e − loco | simclr | {e2e - loco:+.1f} ± " in block
    spread = summary["methods"]["loco_simclr"]["seeds"]["0"]["feature_spread"]
    assert spread["stage"] == 4 and spread["dim"] == 128 and spread["mean"] > 0
    import numpy as np
    import torch

    (cached,) = [  # the val features: 2 per class (the train ones: 3)
        f.parent / "stage4.npy"
        for f in (out / "loco" / "seed0" / "eval" / "features").glob("*/meta.json")
        if json.loads(f.read_text())["data"]["per_class"] == 2
    ]
    x = torch.nn.functional.normalize(torch.from_numpy(np.load(cached)).double(), dim=1)
    assert spread["mean"] == pytest.approx(float(x.std(0, unbiased=False).mean()) * 128**0.5)
    assert f"| `loco_simclr` | 0 | {spread['mean']:.3f} |" in block
    assert (docs / "results_objectives.png").stat().st_size > 0


# -- the sections of docs/results.md ------------------------------------------------------------
PRESNET_LEGACY = [
    "--methods", "e2e,greedy,loco", "--seeds", "0,1", "--out", "runs/compare_presnet",
    "--docs", "runs/compare_presnet/docs", "--no-reference",
    "model.backbone=presnet50", "model.kwargs={width: 0.25}",
]  # fmt: skip


def test_presnet_section_is_the_legacy_presnet_command(tmp_path, monkeypatch):
    """`--section presnet` plans exactly the runs of the command the lead started by hand
    (same jobs, folders, configs and commands) and accepts that command's protocol pin
    without rewriting it, so those runs are reused, not re-run."""
    from loco.compare.plan import check_protocol, commands, jobs, pretrain_config, run_dir

    monkeypatch.chdir(tmp_path)
    compare = load_compare()
    legacy = compare.parse_args(PRESNET_LEGACY)
    section = compare.parse_args(["--section", "presnet"])
    assert jobs(section) == jobs(legacy)
    assert len(jobs(legacy)) == 3 + 2 * (
        1 + 3 * 2
    )  # benches; per seed: floor + 3 x (pretrain, eval)
    for kind, name, seed in jobs(legacy):
        if seed is None:
            continue
        assert run_dir(section, name, seed) == run_dir(legacy, name, seed)
        assert run_dir(section, name, seed) == Path("runs/compare_presnet") / name / f"seed{seed}"
        assert commands(section, name, seed) == commands(legacy, name, seed)
        if kind == "pretrain":
            cfg = pretrain_config(section, name, seed)
            assert cfg.to_dict() == pretrain_config(legacy, name, seed).to_dict()
            assert cfg.model.backbone == "presnet50" and cfg.model.kwargs == {"width": 0.25}
    check_protocol(legacy)
    pin = Path("runs/compare_presnet/protocol.json").read_bytes()
    check_protocol(section)
    assert Path("runs/compare_presnet/protocol.json").read_bytes() == pin


def test_objectives_section_reuses_the_methods_runs(tmp_path):
    """The SimCLR rows and the floor of the objectives section are the methods section's
    runs (same folder, same config, checked against its pin); the other rows are built
    without loading their configs (method.objective may not exist yet)."""
    from loco.compare.plan import (
        FLOOR,
        check_protocol,
        jobs,
        pretrain_config,
        pretrain_overrides,
        run_dir,
    )
    from loco.errors import LocoError

    runs = tmp_path / "runs"
    compare = load_compare()
    obj = compare.parse_args(["--section", "objectives", "--runs", str(runs)])
    methods = compare.parse_args(["--runs", str(runs)])
    assert (
        run_dir(obj, "e2e_simclr", 1)
        == run_dir(methods, "e2e", 1)
        == runs / "compare" / "e2e" / "seed1"
    )
    assert run_dir(obj, FLOOR, 0) == run_dir(methods, FLOOR, 0)
    assert run_dir(obj, "loco_byol", 0) == runs / "compare_objectives" / "loco_byol" / "seed0"
    assert ("pretrain", "greedy_vicreg", 1) in jobs(obj)
    # per seed: floor + 9 grid rows x (pretrain, eval); seed 0 also the 10 other pairs
    assert len(jobs(obj)) == 2 * (1 + 9 * 2) + 10 * 2
    pairs = {n for kind, n, seed in jobs(obj) if kind == "pretrain" and seed == 0} - {
        n for kind, n, seed in jobs(obj) if kind == "pretrain" and seed == 1
    }
    assert pairs == {
        *(f"{r}_{o}" for r in ("e2e", "greedy", "loco", "infopro") for o in ("mocov3", "barlow")),
        "infopro_byol",
        "infopro_vicreg",
    }
    for name in pairs:  # every pair's config loads: the routing and objective it names
        cfg = pretrain_config(obj, name, 0)
        assert f"{cfg.method.name}_{cfg.method.objective}" == name
    assert "method.objective=vicreg" in pretrain_overrides(obj, "greedy_vicreg", 1)
    for routing in ("e2e", "greedy", "loco"):
        assert not any(
            "method.objective" in o for o in pretrain_overrides(obj, f"{routing}_simclr", 0)
        )
        a = pretrain_config(obj, f"{routing}_simclr", 0).to_dict()
        assert a == pretrain_config(methods, routing, 0).to_dict()
    # the pin: the reused rows are checked against (and recorded in) the methods folder's
    simclr = compare.parse_args(
        ["--section", "objectives", "--runs", str(runs), "--methods", "e2e_simclr,loco_simclr"]
    )
    check_protocol(simclr)
    pinned = json.loads((runs / "compare" / "protocol.json").read_text())["configs"]
    assert set(pinned) == {"e2e", "loco"}
    check_protocol(methods)  # the methods section accepts what the objectives section pinned
    other = compare.parse_args(
        ["--section", "objectives", "--runs", str(runs), "--methods", "e2e_simclr", "--steps", "3"]
    )
    with pytest.raises(LocoError, match="'e2e' runs made with another config"):
        check_protocol(other)


def test_protocol_pin_accepts_a_new_key_at_its_default(tmp_path):
    """A config key added to loco later (e.g. method.objective) does not make old runs look
    like another protocol while it holds its default; any other difference is refused."""
    from loco.compare.plan import check_protocol
    from loco.errors import LocoError

    compare = load_compare()
    args = compare.parse_args(["--methods", "e2e", "--out", str(tmp_path)])
    check_protocol(args)
    path = tmp_path / "protocol.json"
    pin = json.loads(path.read_text())
    del pin["configs"]["e2e"]["train"]["stage_schedule"]  # as written before the key existed
    path.write_text(json.dumps(pin))
    check_protocol(args)
    assert "stage_schedule" not in json.loads(path.read_text())["configs"]["e2e"]["train"]
    changed = compare.parse_args(
        ["--methods", "e2e", "--out", str(tmp_path), "train.stage_schedule=pipelined"]
    )
    with pytest.raises(LocoError, match="train.stage_schedule"):
        check_protocol(changed)


@pytest.mark.distributed
def test_sections_regenerate_alone_and_stage_parallel_runs(
    cifar_val_root, tmp_path, one_thread, capsys
):
    """The stage_parallel section trains on 2 torchrun processes (2 steps), writes its own
    block and plot, and leaves the page's other blocks byte for byte; the methods section
    rewritten afterwards leaves the stage_parallel block alone; a re-run skips finished jobs.
    (In-process, as ``tools/compare.py`` runs it; only the pretraining is 2 processes.)"""
    from loco.compare.page import assemble, blocks

    runs, docs = tmp_path / "runs", tmp_path / "docs"
    docs.mkdir()
    # the shipped page, with presnet as a section never run (whatever the docs hold today)
    found = blocks((ROOT / "docs" / "results.md").read_text())
    found.pop("presnet", None)
    page = assemble(found)
    (docs / "results.md").write_text(page)
    small = [
        "--steps", "2", "--seeds", "0", "--eval-train-per-class", "3", "--eval-val-per-class",
        "2", "--linear-epochs", "2", "--runs", str(runs), "--docs", str(docs),
        *tiny_data(cifar_val_root),
    ]  # fmt: skip
    compare = load_compare()
    stage = [*small, "--section", "stage_parallel", "--methods", "loco_pipelined"]
    assert compare.main(stage) == 0, capsys.readouterr()
    rd = runs / "compare_stage_parallel" / "loco_pipelined" / "seed0"
    state = ckpt.load(rd / "checkpoint.pt")
    assert state["step"] == 2 and state["meta"]["ranks"] == 2
    assert state["meta"]["stage_parallel"] == 2
    assert state["config"]["train"]["stage_schedule"] == "pipelined"
    logged = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 2 and {"loss/s1", "loss/s2"} <= set(logged[-1])
    summary = json.loads((runs / "compare_stage_parallel" / "summary.json").read_text())
    entry = summary["methods"]["loco_pipelined"]
    assert summary["status"]["complete"] and set(entry["knn"]) == {"1", "2", "3", "4"}
    assert entry["seeds"]["0"]["curves"]["loss/s2"][-1] == [2, logged[-1]["loss/s2"]]
    assert (docs / "results_stage_parallel.png").stat().st_size > 0

    before, after = blocks(page), blocks((docs / "results.md").read_text())
    assert set(after) == {"methods", "presnet", "stage_parallel", "objectives"}
    for name in ("methods", "presnet", "objectives"):
        assert after[name] == before[name], name
    assert "| `loco_pipelined` |" in after["stage_parallel"]
    assert "Not run yet" not in after["stage_parallel"]
    assert "Not run yet: `python tools/compare.py --section presnet`" in after["presnet"]

    # the methods section rewritten (from what exists: nothing) leaves the others alone
    assert compare.main([*small, "--methods", "e2e", "--report-only"]) == 0
    text = (docs / "results.md").read_text()
    again = blocks(text)
    assert "NOT YET RUN" in again["methods"] and again["methods"] != before["methods"]
    for name in ("presnet", "stage_parallel", "objectives"):
        assert again[name] == after[name], name
    assert text.split("<!-- section:")[0] == page.split("<!-- section:")[0]  # the header

    # finished jobs are skipped: nothing retrained
    mtime = (rd / "checkpoint.pt").stat().st_mtime
    capsys.readouterr()
    assert compare.main(stage) == 0
    assert capsys.readouterr().out.count("done, skipped") == 2
    assert (rd / "checkpoint.pt").stat().st_mtime == mtime
    assert blocks((docs / "results.md").read_text())["methods"] == again["methods"]


def test_objectives_pair_grid_reports_every_pair_and_collapse():
    """The every-pair table: a cell per routing x objective from seed 0's last stage, its
    margin over the seed-0 floor, and NO for a collapsed spread or no margin."""
    from loco.compare.report_objectives import SPREAD_FLOOR, pair_grid

    def run(knn: float, spread: float) -> dict:
        return {"seeds": {"0": {"knn": {"4": knn}, "feature_spread": {"mean": spread}}}}

    summary = {
        "methods": {
            "random_init": {"seeds": {"0": {"knn": {"4": 26.0}}}},
            "loco_barlow": run(33.25, 0.4),
            "greedy_mocov3": run(31.0, SPREAD_FLOOR / 2),  # collapsed spread
            "infopro_byol": run(26.5, 0.3),  # not above the floor
        }
    }
    rows = {r.split("|")[1].strip(): r.split("|")[2:-1] for r in pair_grid(summary)[2:]}
    assert set(rows) == {"`e2e`", "`greedy`", "`loco`", "`infopro`"}
    assert rows["`loco`"][3].strip() == "33.2 (0.40, floor +7.2) ok"
    assert rows["`greedy`"][1].strip().endswith("**NO**")
    assert rows["`infopro`"][2].strip() == "26.5 (0.30, floor +0.5) **NO**"
    assert rows["`e2e`"][1].strip() == "-"
    assert "methods section" in rows["`infopro`"][0]
