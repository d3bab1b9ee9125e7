"""Detectron2 as installed by tools/install_detectron2.py (or an upstream from-source build).

Skipped when detectron2 is not importable: install it with `python tools/install_detectron2.py`.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import detectron2  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the environment
    pytest.skip(
        f"detectron2 is not importable ({type(exc).__name__}: {exc}); "
        "install it with: python tools/install_detectron2.py",
        allow_module_level=True,
    )

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

pytestmark = [
    pytest.mark.detectron2,
    pytest.mark.filterwarnings("ignore:.*torch.jit.script.*deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:pkg_resources is deprecated:UserWarning"),
    pytest.mark.filterwarnings("ignore:torch.meshgrid:UserWarning"),
    # pycocotools' mask decoding under numpy 2
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy"),
]

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tools" / "install_detectron2.py"
CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"


def _standin() -> bool:
    from detectron2 import _C

    return bool(getattr(_C, "__loco_standin__", False))


def test_detectron2_imports():
    import detectron2.checkpoint  # noqa: F401
    import detectron2.data  # noqa: F401
    import detectron2.engine  # noqa: F401
    import detectron2.evaluation  # noqa: F401
    import detectron2.layers  # noqa: F401
    import detectron2.model_zoo  # noqa: F401
    import detectron2.modeling  # noqa: F401
    from detectron2 import _C  # noqa: F401  (compiled, or loco's stand-in)

    assert detectron2.__version__


def test_route_is_detected():
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stdout + res.stderr
    expected = "loco stand-in build" if _standin() else "upstream build with compiled"
    assert expected in res.stdout, res.stdout


def test_standin_ops_raise_clear_error():
    if not _standin():
        pytest.skip("upstream Detectron2 with compiled ops is installed: no stand-in to test")
    from detectron2 import _C
    from detectron2.layers import nms_rotated
    from detectron2.utils.collect_env import collect_env_info

    fix = "this Detectron2 was installed without its compiled ops (tools/install_detectron2.py)"
    with pytest.raises(NotImplementedError) as err:
        _C.deform_conv_forward  # noqa: B018  (access alone raises)
    assert str(err.value).startswith("detectron2._C.deform_conv_forward is not available: " + fix)
    assert "build Detectron2 from source for deform_conv_forward" in str(err.value)
    # the COCOeval fast path names the pycocotools way out
    with pytest.raises(AttributeError, match="use_fast_impl=False"):
        _C.COCOevalEvaluateImages  # noqa: B018
    # an absent op is an absent attribute to hasattr/getattr-with-default
    assert not hasattr(_C, "nms_rotated")
    assert getattr(_C, "has_cuda", lambda: True)() is False
    # rotated ops reach the stand-in through torch.ops.detectron2
    boxes = torch.tensor([[5.0, 5.0, 4.0, 2.0, 30.0], [5.0, 5.0, 4.0, 2.0, 35.0]])
    with pytest.raises(NotImplementedError, match=r"detectron2\._C\.nms_rotated is not available"):
        nms_rotated(boxes, torch.tensor([0.9, 0.8]), 0.5)
    # what default_setup logs still works
    assert "loco stand-in" in collect_env_info()


def test_installed_wheel_record_is_valid():
    if not _standin():
        pytest.skip("upstream Detectron2 build: not installed by tools/install_detectron2.py")
    dist = importlib.metadata.distribution("detectron2")
    assert dist.version.endswith("+loco")
    build = json.loads(dist.read_text("loco_build.json"))
    assert build["standin"] == "detectron2/_C.py"
    files = [f for f in dist.files if f.hash is not None]
    assert any(str(f) == "detectron2/_C.py" for f in files)
    assert not any(str(f).startswith("tools/") or str(f).endswith(".so") for f in dist.files)
    for f in files:
        data = Path(f.locate()).read_bytes()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert (f.hash.mode, f.hash.value) == ("sha256", digest), f


@pytest.fixture(scope="module")
def coco_sample(coco128: Path) -> tuple[Path, list[dict]]:
    """One val2017 image of coco128-seg and its COCO annotations (RLE masks)."""
    ann = json.loads((coco128 / "annotations" / "instances_val2017.json").read_text())
    image = ann["images"][0]
    anns = [a for a in ann["annotations"] if a["image_id"] == image["id"] and not a["iscrowd"]]
    cats = sorted(c["id"] for c in ann["categories"])
    for a in anns:
        a["category_id"] = cats.index(a["category_id"])  # contiguous ids, as DatasetCatalog does
    return coco128 / "images" / "val2017" / image["file_name"], anns


def _cfg():
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(CONFIG))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.INPUT.MIN_SIZE_TEST = 256
    cfg.INPUT.MAX_SIZE_TEST = 384
    return cfg


def _load(path: Path, short_edge: int) -> tuple[torch.Tensor, float]:
    """The image as detectron2 wants it (uint8 BGR, CHW), resized to short_edge; and the scale."""
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    scale = short_edge / min(rgb.size)
    w, h = round(rgb.width * scale), round(rgb.height * scale)
    bgr = np.asarray(rgb.resize((w, h), Image.BILINEAR))[:, :, ::-1]
    return torch.as_tensor(bgr.transpose(2, 0, 1).copy()), scale


def test_mask_rcnn_r50_fpn_forward_cpu(coco_sample):
    from detectron2.modeling import build_model

    cfg = _cfg()
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # random weights: keep detections, run mask head
    cfg.TEST.DETECTIONS_PER_IMAGE = 20
    torch.manual_seed(0)
    model = build_model(cfg).eval()

    path, _ = coco_sample
    with Image.open(path) as im:
        w, h = im.size
    image, _ = _load(path, cfg.INPUT.MIN_SIZE_TEST)
    with torch.no_grad():
        (out,) = model([{"image": image, "height": h, "width": w}])

    inst = out["instances"]
    assert inst.image_size == (h, w)
    assert 0 < len(inst) <= 20
    assert inst.pred_boxes.tensor.shape == (len(inst), 4)
    assert inst.pred_masks.shape == (len(inst), h, w)
    assert inst.scores.shape == inst.pred_classes.shape == (len(inst),)
    assert int(inst.pred_classes.max()) < cfg.MODEL.ROI_HEADS.NUM_CLASSES


def test_mask_rcnn_r50_fpn_losses_cpu(coco_sample):
    """Training mode on the image's real (RLE) annotations: finite losses, gradients flow."""
    from detectron2.data import detection_utils
    from detectron2.modeling import build_model
    from detectron2.structures import BitMasks, BoxMode, Instances
    from detectron2.utils.events import EventStorage

    cfg = _cfg()
    cfg.MODEL.BACKBONE.FREEZE_AT = 5  # keep it fast on 2 CPU cores: no backward into ResNet
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 1000
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 256
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
    torch.manual_seed(0)
    model = build_model(cfg).train()

    path, anns = coco_sample
    with Image.open(path) as im:
        w, h = im.size
    image, scale = _load(path, 224)
    for a in anns:
        a["bbox_mode"] = BoxMode.XYWH_ABS
    full = detection_utils.annotations_to_instances(anns, (h, w), mask_format="bitmask")
    assert len(full) > 0
    # the targets, resized like the image
    size = tuple(image.shape[1:])
    full.gt_boxes.scale(scale, scale)
    masks = F.interpolate(full.gt_masks.tensor[None].float(), size=size, mode="nearest")[0]
    targets = Instances(
        size, gt_boxes=full.gt_boxes, gt_classes=full.gt_classes, gt_masks=BitMasks(masks > 0)
    )
    with EventStorage():  # detectron2 logs training statistics into the current storage
        losses = model([{"image": image, "instances": targets}])
    assert set(losses) >= {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.bottom_up.stem.conv1.weight.grad is None  # frozen
    assert model.backbone.fpn_output5.weight.grad.abs().sum() > 0
    assert model.roi_heads.mask_head.predictor.weight.grad.abs().sum() > 0
