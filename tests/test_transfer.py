"""Detectron2 transfer (loco/transfer, `loco transfer`, tools/convert_to_detectron2.py).

Real data: coco128-seg (100 train + 100 val COCO images, RLE instance masks) from the
shipped data, extracted once per session. The loco checkpoints are timm ResNets saved in
loco's checkpoint format without pretraining. Tests that need Detectron2 skip when it is
not importable (install: python tools/install_detectron2.py); the rest always run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from loco.config import Config
from loco.errors import LocoError

try:
    import detectron2  # noqa: F401

    HAVE_D2, D2_ERROR = True, ""
except Exception as exc:  # pragma: no cover - depends on the environment
    HAVE_D2, D2_ERROR = False, f"{type(exc).__name__}: {exc}"

REPO = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # Detectron2's COCOEvaluator on an untrained model, and its mask loading under torch 2.x
    pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The given NumPy array is not writable:UserWarning"),
]


def needs_d2(test):
    """Mark ``detectron2`` and skip, with the reason, when it is not importable."""
    reason = (
        f"detectron2 is not importable ({D2_ERROR}); install: python tools/install_detectron2.py"
    )
    return pytest.mark.skipif(not HAVE_D2, reason=reason)(pytest.mark.detectron2(test))


# 4 train2017 images with one large object each (zebra, dog, airplane, bear)
FOUR_IMAGES = (34, 42, 81, 502)
# a Mask R-CNN that trains a few iterations per second on 2 CPU cores
FAST = {
    "INPUT.MIN_SIZE_TRAIN": "(160,)",
    "INPUT.MAX_SIZE_TRAIN": "224",
    "INPUT.MIN_SIZE_TEST": "160",
    "INPUT.MAX_SIZE_TEST": "224",
    "MODEL.FPN.OUT_CHANNELS": "32",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": "32",
    "MODEL.ROI_BOX_HEAD.CONV_DIM": "32",
    "MODEL.ROI_MASK_HEAD.CONV_DIM": "32",
    "TEST.DETECTIONS_PER_IMAGE": "20",
    "SOLVER.WARMUP_ITERS": "10",
}


def kv(*settings: dict[str, str]) -> list[str]:
    """Detectron2 ``KEY VALUE`` override list from dicts."""
    return [x for d in settings for item in d.items() for x in item]


HALF_RESNET18 = {"channels": [32, 64, 128, 256]}


# -- fixtures -----------------------------------------------------------------------------
def _subset(src: Path, dst: Path, ids: tuple[int, ...]) -> Path:
    data = json.loads(src.read_text())
    data["images"] = [im for im in data["images"] if im["id"] in ids]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    dst.write_text(json.dumps(data))
    return dst


@pytest.fixture(scope="session")
def four_train(coco128: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(json, image dir): 4 real train2017 images, all 80 categories listed."""
    out = tmp_path_factory.mktemp("four") / "four.json"
    return _subset(coco128 / "annotations/instances_train2017.json", out, FOUR_IMAGES), (
        coco128 / "images/train2017"
    )


def save_checkpoint(
    path: Path,
    name: str = "resnet18",
    kwargs: dict | None = None,
    image_size: int = 224,
    seed: int = 0,
    **data,
) -> Path:
    """A loco checkpoint of an untrained timm model: {backbone, config, meta, step}."""
    import timm

    cfg = Config()
    cfg.model.backbone, cfg.model.kwargs, cfg.data.image_size = name, dict(kwargs or {}), image_size
    for key, value in data.items():
        setattr(cfg.data, key, value)
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=0, **cfg.model.kwargs)
    if image_size <= 64:  # the checkpoint of a CIFAR run has the small-image stem
        from loco.models.backbone import build_backbone

        model = build_backbone(cfg.model, image_size).body
    state = {
        "backbone": model.state_dict(),
        "config": cfg.to_dict(),
        "meta": {"method": "loco"},
        "step": 7,
    }
    torch.save(state, path)
    return path


@pytest.fixture(scope="session")
def half_r18(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Half-width ResNet-18 loco checkpoint with non-ImageNet input statistics."""
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    return save_checkpoint(path, kwargs=HALF_RESNET18, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])


def _d2_cfg(checkpoint: Path | str, *opts: str):
    from loco.transfer.train import setup_cfg

    return setup_cfg("tiny_cpu", str(checkpoint), list(opts))


# -- without Detectron2 -------------------------------------------------------------------
def test_cli_without_detectron2_names_the_installer():
    """`loco --help` works without Detectron2; `loco transfer train` fails in one line."""
    code = (
        "import sys; sys.modules['detectron2'] = None\n"  # makes `import detectron2` fail
        "from loco.cli import main\n"
        "assert main(['transfer', 'subsample', '--help']) == 0\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert "--images" in res.stdout, res.stdout + res.stderr  # argparse exits 0 after help
    code = (
        "import sys; sys.modules['detectron2'] = None\n"
        "from loco.cli import main\n"
        "sys.exit(main(['transfer', 'train', '--config', 'tiny_cpu']))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "python tools/install_detectron2.py" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.modules['detectron2'] = None\n"
            "from loco.cli import main; main(['--help'])",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert res.returncode == 0 and "transfer" in res.stdout, res.stderr


def test_subsample_coco_is_seeded(coco128: Path, tmp_path: Path):
    from loco.cli import main
    from loco.transfer.datasets import subsample_coco

    src = coco128 / "annotations/instances_train2017.json"
    a, b, c = (tmp_path / f"{n}.json" for n in "abc")
    stats = subsample_coco(src, a, 10, seed=3)
    assert main(["transfer", "subsample", str(src), str(b), "--images", "10", "--seed", "3"]) == 0
    subsample_coco(src, c, 10, seed=4)
    da, db, dc = (json.loads(p.read_text()) for p in (a, b, c))
    ids = {im["id"] for im in da["images"]}
    assert stats["images"] == len(ids) == 10
    assert ids == {im["id"] for im in db["images"]} != {im["id"] for im in dc["images"]}
    assert {x["image_id"] for x in da["annotations"]} == ids  # annotated images only
    full = json.loads(src.read_text())
    assert stats["annotations"] == sum(x["image_id"] in ids for x in full["annotations"])
    assert da["categories"] == full["categories"]
    with pytest.raises(LocoError, match="cannot take 1000 images"):
        subsample_coco(src, a, 1000)


def test_convert_rejects_what_detectron2_resnet_cannot_load(tmp_path: Path):
    from loco.transfer.convert import convert_checkpoint, timm_resnet_to_detectron2

    with pytest.raises(LocoError, match="not a plain timm ResNet"):
        timm_resnet_to_detectron2(
            {"stem.0.weight": torch.zeros(1), "layer1.0.conv1.weight": torch.zeros(1)}
        )
    small = save_checkpoint(tmp_path / "cifar.pt", image_size=32)  # 3x3 stride-1 stem
    with pytest.raises(LocoError, match="small-image stem"):
        convert_checkpoint(small)


# -- the backbone -------------------------------------------------------------------------
@needs_d2
def test_backbone_shapes_weights_and_registry(half_r18: Path, tmp_path: Path):
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import BACKBONE_REGISTRY, build_backbone

    from loco.transfer import backbone as lb

    lb.register()  # a second registration is a no-op, not an AssertionError
    assert (
        "build_loco_fpn_backbone" in BACKBONE_REGISTRY
        and "build_loco_backbone" in BACKBONE_REGISTRY
    )
    cfg = _d2_cfg(half_r18, "MODEL.LOCO.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", "0")
    fpn = build_backbone(cfg, ShapeSpec(channels=3))
    bottom = fpn.bottom_up
    assert isinstance(bottom, lb.LocoBackbone)
    shapes = bottom.output_shape()
    assert {k: (v.stride, v.channels) for k, v in shapes.items()} == {
        "res2": (4, 32),
        "res3": (8, 64),
        "res4": (16, 128),
        "res5": (32, 256),
    }
    saved = torch.load(half_r18, weights_only=True)["backbone"]
    assert all(torch.equal(bottom.body.state_dict()[k], v) for k, v in saved.items())
    out = fpn(torch.randn(1, 3, 96, 128))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        f"p{i}": (1, 64, math.ceil(96 / 2**i), math.ceil(128 / 2**i)) for i in range(2, 7)
    }
    # a CIFAR checkpoint (3x3 stride-1 stem) still gives strides 4..32, weights intact
    small = save_checkpoint(tmp_path / "cifar.pt", image_size=32)
    cfg = _d2_cfg(small, "MODEL.BACKBONE.FREEZE_AT", "0")
    bottom = lb.build_loco_backbone(cfg, ShapeSpec(channels=3))
    assert [s.stride for s in bottom.output_shape().values()] == [4, 8, 16, 32]
    assert bottom.body.conv1.weight.shape[-1] == 3


@needs_d2
@pytest.mark.parametrize("freeze_at", [0, 1, 2, 3, 5])
def test_freeze_at(half_r18: Path, freeze_at: int):
    from detectron2.layers import ShapeSpec
    from torchvision.ops.misc import FrozenBatchNorm2d

    from loco.transfer.backbone import build_loco_backbone

    cfg = _d2_cfg(half_r18, "MODEL.LOCO.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", str(freeze_at))
    bb = build_loco_backbone(cfg, ShapeSpec(channels=3)).train()
    body = bb.body
    parts = {"stem": ["conv1", "bn1"], 2: ["layer1"], 3: ["layer2"], 4: ["layer3"], 5: ["layer4"]}
    for level, paths in parts.items():
        frozen = freeze_at >= (1 if level == "stem" else level)
        for path in paths:
            mod = body.get_submodule(path)
            grads = {p.requires_grad for p in mod.parameters()}
            bns = [m for m in [mod, *mod.modules()] if isinstance(m, torch.nn.BatchNorm2d)]
            frozen_bns = [m for m in [mod, *mod.modules()] if isinstance(m, FrozenBatchNorm2d)]
            assert grads <= ({False} if frozen else {True}), (freeze_at, path)
            assert not (bns if frozen else frozen_bns), (freeze_at, path)  # BN kind
            leaves = [m for m in mod.modules() if not list(m.children())]
            assert {m.training for m in leaves} == {not frozen}, (freeze_at, path)  # eval if frozen
    assert bb.training


@needs_d2
def test_setup_cfg_takes_input_statistics_and_falls_back_from_syncbn(half_r18, four_train, caplog):
    from loco.transfer.train import setup_cfg

    json_file, images = four_train
    with caplog.at_level("WARNING"):
        cfg = setup_cfg(
            "mask_rcnn_R50_FPN_1x_frozen",
            str(half_r18),
            ["MODEL.DEVICE", "cpu"],
            train_json=str(json_file),
            train_images=str(images),
            val_json=str(json_file),
            val_images=str(images),
        )
    assert cfg.MODEL.PIXEL_MEAN == pytest.approx([127.5, 102.0, 76.5])
    assert cfg.MODEL.PIXEL_STD == pytest.approx([51.0, 63.75, 76.5])
    assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.LOCO.BACKBONE == "resnet18"
    assert cfg.MODEL.FPN.NORM == cfg.MODEL.ROI_BOX_HEAD.NORM == cfg.MODEL.ROI_MASK_HEAD.NORM == "BN"
    assert "SyncBN needs several CUDA processes" in caplog.text
    assert (cfg.MODEL.ROI_BOX_HEAD.NUM_CONV, cfg.MODEL.ROI_BOX_HEAD.NUM_FC) == (4, 1)
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 5 and cfg.MODEL.ROI_HEADS.NUM_CLASSES == 80
    assert cfg.INPUT.MASK_FORMAT == "bitmask"  # coco128-seg stores RLE masks
    assert cfg.DATASETS.TRAIN[0].startswith("loco_train_") and len(cfg.DATASETS.LOCO_FILES) == 2
    with pytest.raises(LocoError, match="not found; shipped configs"):
        setup_cfg("no_such_config")
    with pytest.raises(LocoError, match="KEY VALUE pairs"):
        setup_cfg("tiny_cpu", opts=["SOLVER.MAX_ITER"])


@needs_d2
def test_base_config_equals_model_zoo_mask_rcnn_r50_fpn_1x():
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    from loco.transfer.backbone import add_loco_config
    from loco.transfer.train import CONFIG_DIR

    ours, zoo = add_loco_config(get_cfg()), add_loco_config(get_cfg())
    ours.merge_from_file(str(CONFIG_DIR / "Base-LoCo-RCNN-FPN.yaml"))
    zoo.merge_from_file(
        model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    )

    def flat(node, prefix=""):
        out = {}
        for k, v in node.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(ours), flat(zoo)
    differ = {k for k in a if a[k] != b[k]}
    assert differ == {
        "MODEL.WEIGHTS",
        "MODEL.BACKBONE.NAME",
        "MODEL.PIXEL_MEAN",
        "MODEL.PIXEL_STD",
        "INPUT.FORMAT",
    }, differ


# -- training -----------------------------------------------------------------------------
@needs_d2
def test_frozen_backbone_weights_and_bn_statistics_unchanged(half_r18, four_train, tmp_path):
    """FREEZE_AT 5 with plain BN: after training steps the backbone (weights AND running
    statistics) equals the checkpoint, while the FPN and heads moved."""
    from detectron2.utils.events import EventStorage

    from loco.transfer.train import LocoTrainer, setup_cfg

    json_file, images = four_train
    cfg = setup_cfg(
        "tiny_cpu",
        str(half_r18),
        kv(FAST, {"MODEL.LOCO.NORM": "BN", "SOLVER.BASE_LR": "0.02"}),
        train_json=str(json_file),
        train_images=str(images),
        output_dir=str(tmp_path),  # the trainer's writers create it
    )
    trainer = LocoTrainer(cfg)
    model = trainer.model
    bottom = model.backbone.bottom_up
    heads_before = {
        k: v.clone()
        for k, v in model.state_dict().items()
        if not k.startswith("backbone.bottom_up")
    }
    model.train()
    assert model.training and not any(m.training for m in bottom.body.modules())
    with EventStorage(0) as storage:
        trainer.storage = storage
        for trainer.iter in range(3):
            trainer.run_step()
    assert not any(m.training for m in bottom.body.modules())
    saved = torch.load(half_r18, weights_only=True)["backbone"]
    now = bottom.body.state_dict()
    stats = [k for k in saved if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 2 * 21  # every BatchNorm of the half ResNet-18
    for key in saved:
        if key.endswith("num_batches_tracked"):
            continue  # FrozenBatchNorm2d keeps no counter
        assert torch.equal(now[key], saved[key]), key
    moved = [
        k
        for k, v in model.state_dict().items()
        if k in heads_before and not torch.equal(v, heads_before[k])
    ]
    assert any(k.startswith("backbone.fpn_") for k in moved) and any(
        k.startswith("roi_heads.") for k in moved
    )


@needs_d2
def test_train_then_eval_end_to_end_cli(half_r18, four_train, coco128, tmp_path, capsys, caplog):
    """`loco transfer train` (paper's frozen setting, tiny) on real COCO images, COCOEvaluator
    bbox + segm AP into results.json; `loco transfer eval` of the run gives the same AP;
    `loco report` shows the rows."""
    from loco.cli import main
    from loco.eval.results import read_results
    from loco.transfer.datasets import subsample_coco

    json_file, images = four_train
    val = tmp_path / "val4.json"
    subsample_coco(coco128 / "annotations/instances_val2017.json", val, 4, seed=0)
    out = tmp_path / "run"
    common = [
        "--checkpoint",
        str(half_r18),
        "--output-dir",
        str(out),
        "--val-json",
        str(val),
        "--val-images",
        str(coco128 / "images/val2017"),
    ]
    # score threshold 0: an untrained detector still returns boxes and masks to score
    opts = kv(FAST, {"SOLVER.MAX_ITER": "3", "MODEL.ROI_HEADS.SCORE_THRESH_TEST": "0.0"})
    argv = [
        "transfer",
        "train",
        "--config",
        "tiny_cpu",
        "--train-json",
        str(json_file),
        "--train-images",
        str(images),
        *common,
        *opts,
    ]
    with caplog.at_level("INFO"):
        assert main(argv) == 0
    assert "No checkpoint found" not in caplog.text  # ours says where each part comes from
    assert "FPN and heads initialised at random" in caplog.text
    rows = {r["protocol"]: r for r in read_results(out)}
    assert set(rows) == {"maskrcnn-bbox", "maskrcnn-segm"}
    for row in rows.values():
        assert {"ap", "ap50", "ap75", "aps", "apm", "apl"} <= set(row)
        assert "top1" not in row and "top5" not in row  # detection metrics have their own names
        assert 0 <= row["ap"] <= 100
        assert (row["method"], row["backbone"], row["n_train"], row["n_val"]) == (
            "loco",
            "resnet18",
            4,
            4,
        )
        assert row["setting"] == "frozen" and row["freeze_at"] == 5 and row["step"] == 3
    assert (out / "config.yaml").is_file() and (out / "model_final.pth").is_file()
    # the trained weights keep the checkpoint's backbone (frozen readout)
    final = torch.load(out / "model_final.pth", weights_only=False)["model"]
    saved = torch.load(half_r18, weights_only=True)["backbone"]
    prefix = "backbone.bottom_up.staged.body."
    assert all(
        torch.equal(torch.as_tensor(final[prefix + k]), v)
        for k, v in saved.items()
        if not k.endswith("num_batches_tracked")
    )
    # eval of the run from its saved config.yaml: same numbers, rows replaced not duplicated
    assert main(["transfer", "eval", "--output-dir", str(out), "MODEL.DEVICE", "cpu"]) == 0
    again = {r["protocol"]: r for r in read_results(out)}
    assert len(read_results(out)) == 2
    for protocol, row in rows.items():
        assert again[protocol]["ap"] == pytest.approx(row["ap"], abs=1e-6), protocol
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    table = capsys.readouterr().out
    assert "maskrcnn-bbox" in table and "maskrcnn-segm" in table
    assert "| AP | AP50 | AP75 | APs | APm | APl |" in table and "top-1" not in table


@needs_d2
@pytest.mark.slow  # ~50 s on 2 busy CPU cores; runs in CI all the same
def test_overfit_four_images_learns(half_r18, four_train, tmp_path):
    """Fine-tune everything (FREEZE_AT 0, BN) on 4 real images: the training-set AP rises
    from ~0 (untrained) to well above it, so the pipeline (data, targets, losses, optimizer,
    evaluation) learns."""
    import logging

    from detectron2.utils.env import seed_all_rng

    from loco.transfer.train import LocoTrainer, setup_cfg

    json_file, images = four_train
    overfit = {
        "MODEL.BACKBONE.FREEZE_AT": "0",  # train everything
        "MODEL.LOCO.NORM": "BN",
        "INPUT.RANDOM_FLIP": "none",
        "SOLVER.BASE_LR": "0.02",
        "SOLVER.MAX_ITER": "200",
        "SEED": "0",
    }
    opts = kv(FAST, overfit)
    cfg = setup_cfg(
        "tiny_cpu",
        str(half_r18),
        opts,
        train_json=str(json_file),
        train_images=str(images),
        val_json=str(json_file),
        val_images=str(images),
        output_dir=str(tmp_path),
    )
    seed_all_rng(0)  # head initialisation and the data order
    trainer = LocoTrainer(cfg)
    before = LocoTrainer.test(cfg, trainer.model)
    start = time.time()
    trainer.train()
    after = trainer._last_eval_results

    def ap(res, task):
        value = res.get(task, {}).get("AP", float("nan"))
        return 0.0 if value != value else value  # no detection at all: AP 0

    logging.getLogger(__name__).warning(
        "overfit 4 images, 200 iterations in %.0f s: bbox AP %.1f -> %.1f, segm AP %.1f -> %.1f",
        time.time() - start,
        ap(before, "bbox"),
        ap(after, "bbox"),
        ap(before, "segm"),
        ap(after, "segm"),
    )
    assert ap(before, "bbox") < 5 and ap(before, "segm") < 5
    assert ap(after, "bbox") > 30, after  # 75.0 measured
    assert ap(after, "segm") > 10, after  # 60.0 measured


# -- conversion to Detectron2's own ResNet ------------------------------------------------
def _load_tool():
    spec = importlib.util.spec_from_file_location(
        "convert_to_detectron2", REPO / "tools/convert_to_detectron2.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_d2
def test_convert_round_trip_resnet50(tmp_path: Path, capsys):
    """timm resnet50 (random weights AND random BN statistics) -> .pkl -> Detectron2's
    build_resnet_backbone via DetectionCheckpointer: every key mapped, none left over, and
    res2..res5 equal timm's stage outputs (RGB as is; BGR with conv1's channels reversed)."""
    import pickle

    import timm
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    torch.manual_seed(0)
    model = timm.create_model("resnet50", num_classes=0).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    cfg = Config()
    cfg.model.backbone, cfg.data.image_size = "resnet50", 224
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"backbone": model.state_dict(), "config": cfg.to_dict(), "meta": {}}, ckpt)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats = model.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
    tool = _load_tool()
    for fmt in ("RGB", "BGR"):
        pkl = tmp_path / f"r50_{fmt}.pkl"
        assert tool.main([str(ckpt), str(pkl), "--format", fmt]) == 0
        assert "STRIDE_IN_1X1: False" in capsys.readouterr().out
        with open(pkl, "rb") as f:
            payload = pickle.load(f)
        assert payload["__author__"] == "loco" and payload["matching_heuristics"] is True
        d2cfg = get_cfg()
        d2cfg.MODEL.RESNETS.DEPTH = 50
        d2cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
        d2cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
        d2cfg.MODEL.BACKBONE.FREEZE_AT = 0
        resnet = build_resnet_backbone(d2cfg, ShapeSpec(channels=3)).eval()
        assert set(payload["model"]) == set(resnet.state_dict())  # all mapped, none left over
        DetectionCheckpointer(resnet).load(str(pkl))
        with torch.no_grad():
            out = resnet(x if fmt == "RGB" else x.flip(1))
        for name, ref in zip(("res2", "res3", "res4", "res5"), feats):
            scale = ref.abs().max().item()  # random BN statistics: activations reach ~300
            torch.testing.assert_close(
                out[name], ref, rtol=1e-4, atol=1e-5 * scale, msg=(fmt, name)
            )


# -- errors a user meets: missing data, weights of another model, strides, no detections --
@needs_d2
def test_missing_coco_fails_in_one_line_before_anything_is_built(half_r18, tmp_path, monkeypatch):
    """The paper's config without COCO on disk: one line naming the files it looked for and
    the two ways to point elsewhere, raised before the checkpoint is read or the model built
    (a checkpoint path that does not exist would otherwise be the error)."""
    from loco.cli import main
    from loco.transfer.train import setup_cfg

    monkeypatch.chdir(tmp_path)  # Detectron2's builtin COCO paths are datasets/coco/...
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    with pytest.raises(LocoError) as err:
        setup_cfg("mask_rcnn_R50_FPN_1x_frozen", str(tmp_path / "not_read.pt"))
    msg = str(err.value)
    assert "\n" not in msg and "coco_2017_train" in msg
    assert str(tmp_path / "datasets/coco/annotations/instances_train2017.json") in msg
    assert "DETECTRON2_DATASETS" in msg and "--train-json" in msg
    # evaluation needs only the val set: the error names that one
    with pytest.raises(LocoError, match=r"coco_2017_val.*--val-json"):
        setup_cfg("mask_rcnn_R50_FPN_1x_frozen", str(half_r18), train=False)
    argv = ["transfer", "train", "--config", "mask_rcnn_R50_FPN_1x_frozen"]
    assert main([*argv, "--checkpoint", str(half_r18), "--output-dir", str(tmp_path)]) == 2


@pytest.fixture(scope="session")
def val4(coco128: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """``--val-json/--val-images`` of 4 real val2017 images."""
    from loco.transfer.datasets import subsample_coco

    val = tmp_path_factory.mktemp("val4") / "val4.json"
    subsample_coco(coco128 / "annotations/instances_val2017.json", val, 4, seed=0)
    return ["--val-json", str(val), "--val-images", str(coco128 / "images/val2017")]


@pytest.fixture(scope="session")
def tiny_weights(half_r18: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Detectron2 weights (``model_final.pth`` layout) of the untrained tiny_cpu Mask R-CNN
    on ``half_r18``."""
    from loco.transfer.train import LocoTrainer, setup_cfg

    model = LocoTrainer.build_model(setup_cfg("tiny_cpu", str(half_r18), kv(FAST)))
    path = tmp_path_factory.mktemp("weights") / "model_final.pth"
    torch.save({"model": model.state_dict(), "iteration": 0}, path)
    return path


@needs_d2
def test_eval_refuses_weights_of_another_backbone(tiny_weights, val4, tmp_path, capsys):
    """Weights trained on a half-width ResNet-18, evaluated on a quarter-width one: an error
    naming backbone keys, not a warning and results from partly random weights."""
    quarter = save_checkpoint(tmp_path / "quarter.pt", kwargs={"channels": [16, 32, 64, 128]})
    out = tmp_path / "eval"
    argv = ["transfer", "eval", "--config", "tiny_cpu", "--checkpoint", str(quarter)]
    argv += ["--weights", str(tiny_weights), "--output-dir", str(out), *val4, *kv(FAST)]
    from loco.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another shape" in err, err
    assert "backbone.bottom_up.staged.body." in err and "--checkpoint" in err
    assert not (out / "results.json").exists()


@needs_d2
def test_no_detections_is_null_with_a_note_everywhere(
    tiny_weights, half_r18, val4, tmp_path, capsys
):
    """A model that detects nothing (score threshold 1): one row per task, each metric null
    with the reason, strict JSON; the console line and `loco report` show the same."""
    from loco.cli import main

    missing = "n/a"  # loco.eval.results.MISSING
    out = tmp_path / "eval"
    argv = ["transfer", "eval", "--config", "tiny_cpu", "--checkpoint", str(half_r18)]
    argv += ["--weights", str(tiny_weights), "--output-dir", str(out), *val4]
    argv += kv(FAST, {"MODEL.ROI_HEADS.SCORE_THRESH_TEST": "1.0"})
    assert main(argv) == 0

    def no_nan(token: str):
        raise AssertionError(f"results.json holds {token}, which is not JSON")

    rows = json.loads((out / "results.json").read_text(), parse_constant=no_nan)
    assert sorted(r["protocol"] for r in rows) == ["maskrcnn-bbox", "maskrcnn-segm"]
    metrics = ("ap", "ap50", "ap75", "aps", "apm", "apl")
    for row in rows:
        assert all(row[k] is None for k in metrics), row
        assert set(row["notes"]) == set(metrics)
        assert set(row["notes"].values()) == {"the model detected nothing on the val set"}
    stdout = capsys.readouterr().out
    printed = [line for line in stdout.splitlines() if "maskrcnn-" in line]
    assert len(printed) == 2, stdout
    for line in printed:
        assert f"AP {missing}" in line and "detected nothing" in line and "nan" not in line
    assert main(["report", str(out)]) == 0
    report = capsys.readouterr().out
    assert report.count(f"| {missing} |") >= 2 and "detected nothing" in report
    assert "nan" not in report.lower()


def test_detection_rows_schema_notes_and_old_files(tmp_path: Path, capsys):
    """Detection rows hold ap..apl (no top1/top5); a NaN is stored null and needs a note;
    a results.json written before (AP in top1) still reads and reports as detection."""
    from loco.cli import main
    from loco.eval.results import make_row, read_results, write_results

    base = dict(method="loco", backbone="resnet18", stage=4, protocol="maskrcnn-bbox")
    base.update(dataset="d", checkpoint="c", n_train=4, n_val=4)
    nan = float("nan")
    with pytest.raises(ValueError, match="no note for aps"):
        make_row(**base, ap=1.0, ap50=2.0, ap75=0.5, aps=nan, apm=1.0, apl=2.0)
    row = make_row(
        **base, ap=1.0, ap50=2.0, ap75=0.5, aps=nan, apm=1.0, apl=2.0, notes={"aps": "why"}
    )
    assert row["aps"] is None and row["notes"] == {"aps": "why"} and "top1" not in row
    old = {**base, "top1": 12.5, "top5": 30.0, "ap": 12.5, "ap50": 30.0, "ap75": 10.0}
    old.update(aps=1.0, apm=2.0, apl=3.0, metric_names={"top1": "AP", "top5": "AP50"})
    (tmp_path / "results.json").write_text(json.dumps([old]))
    (legacy,) = read_results(tmp_path)
    assert "top1" not in legacy and legacy["ap"] == 12.5
    write_results(tmp_path, [row])  # same identity: replaces the old row
    assert read_results(tmp_path) == [row]
    (tmp_path / "results.json").write_text(json.dumps([old]))
    assert main(["report", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| 12.50 | 30.00 | 10.00 | 1.00 | 2.00 | 3.00 |" in table


def test_coco_nan_becomes_null_with_the_reason():
    """COCOEvaluator's NaN: all six (no detection) or one size range (no such object)."""
    pytest.importorskip("detectron2")
    from loco.transfer.train import metrics_and_notes

    nan = float("nan")
    values, notes = metrics_and_notes(
        {"AP": 10.0, "AP50": 20.0, "AP75": 5.0, "APs": nan, "APm": 7.0, "APl": 12.0}
    )
    assert values == {"ap": 10.0, "ap50": 20.0, "ap75": 5.0, "aps": None, "apm": 7.0, "apl": 12.0}
    assert notes == {"aps": "the val set has no small (< 32^2 px) object"}
    values, notes = metrics_and_notes(
        dict.fromkeys(("AP", "AP50", "AP75", "APs", "APm", "APl"), nan)
    )
    assert set(values.values()) == {None} and len(set(notes.values())) == 1


@needs_d2
def test_strides_that_are_not_powers_of_two_are_refused():
    """A stage that resizes by interpolation (here res3: 32 -> 30 px before its stride-2
    conv, stride 8.53 at 128 px, 8.62 at 224) cannot feed Detectron2's FPN: one-line error.
    The plain ResNet-18 is accepted with strides 4..32."""
    from loco.config import ModelConfig
    from loco.models.backbone import build_backbone
    from loco.transfer.backbone import LocoBackbone

    def resize(module, args):
        (x,) = args
        return torch.nn.functional.interpolate(x, scale_factor=15 / 16, mode="bilinear")

    cfg = ModelConfig(backbone="resnet18", kwargs={"channels": [16, 32, 64, 128]})
    plain = LocoBackbone(build_backbone(cfg, 128))
    assert [s.stride for s in plain.output_shape().values()] == [4, 8, 16, 32]
    staged = build_backbone(cfg, 128)
    staged.body.layer2[0].register_forward_pre_hook(resize)  # the stage's first block
    with pytest.raises(LocoError, match="not increasing powers of two") as err:
        LocoBackbone(staged)
    assert "8.62" in str(err.value) and "\n" not in str(err.value)


def test_convert_refuses_what_stock_detectron2_rejects(tmp_path: Path, capsys):
    """A narrow ResNet-18 (res2 16 channels): stock Detectron2 asserts RES2_OUT_CHANNELS 64
    for R18/R34, so the converter stops with one line pointing to the loco backbone instead
    of printing a config Detectron2 rejects."""
    narrow = save_checkpoint(tmp_path / "narrow.pt", kwargs={"channels": [16, 32, 64, 128]})
    tool = _load_tool()
    assert tool.main([str(narrow), str(tmp_path / "narrow.pkl")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "RES2_OUT_CHANNELS 64" in err, err
    assert "loco transfer train --checkpoint" in err and not (tmp_path / "narrow.pkl").exists()
    if HAVE_D2:  # the refusal matches Detectron2's own rule
        from detectron2.config import get_cfg
        from detectron2.layers import ShapeSpec
        from detectron2.modeling.backbone.resnet import build_resnet_backbone

        cfg = get_cfg()
        cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 18, 16
        with pytest.raises(AssertionError, match="RES2_OUT_CHANNELS = 64"):
            build_resnet_backbone(cfg, ShapeSpec(channels=3))


@needs_d2
def test_prefix_picks_the_backbone_of_a_foreign_checkpoint(tmp_path):
    """A DINO-style file holds a teacher and a student backbone: ``loco transfer`` takes the
    teacher, as ``loco eval`` does, and the student with ``--prefix`` (kept in the config)."""
    import timm
    from detectron2.layers import ShapeSpec

    from loco.cli import build_parser
    from loco.transfer.backbone import build_loco_backbone
    from loco.transfer.train import _cfg_from_args

    torch.manual_seed(0)
    teacher = timm.create_model("resnet18", num_classes=0).state_dict()
    student = {k: v + 1 if v.is_floating_point() else v for k, v in teacher.items()}
    dino = tmp_path / "dino.pth"
    torch.save(
        {
            "teacher": {f"backbone.{k}": v for k, v in teacher.items()},
            "student": {f"module.backbone.{k}": v for k, v in student.items()},
        },
        dino,
    )
    head = ["transfer", "eval", "--config", "tiny_cpu", "--checkpoint", str(dino)]
    tail = ["MODEL.LOCO.BACKBONE", "resnet18"]  # Detectron2 overrides come last

    def cfg_of(*extra: str):
        args = build_parser("transfer").parse_args([*head, *extra, *tail])
        return _cfg_from_args(args, args.config, train=False)

    for extra, expected in (([], teacher), (["--prefix", "student.module.backbone."], student)):
        cfg = cfg_of(*extra)
        body = build_loco_backbone(cfg, ShapeSpec(channels=3)).body
        assert torch.equal(body.conv1.weight, expected["conv1.weight"]), extra
        assert cfg.MODEL.LOCO.PREFIX == (extra[1] if extra else None)
    with pytest.raises(LocoError, match="--prefix 'nope.' matches no key"):
        cfg_of("--prefix", "nope.")
