"""loco/weights.py: other toolkits' checkpoints in, on fakes with each toolkit's key layout
(tiny tensors; nothing can be downloaded here). Each fake holds the true backbone plus
decoy branches (momentum encoders, DINO's student, heads) whose tensors differ, so taking
the wrong branch fails the weight check; kNN then runs on every layout."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch

from loco.errors import LocoError
from loco.eval.network import load_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

KWARGS = {"channels": [16, 32, 64, 128]}
OVER = [
    "model.kwargs={channels: [16, 32, 64, 128]}",
    "model.small_image=false",
    "data.num_workers=0",
]


@pytest.fixture(scope="module")
def timm_state() -> dict[str, torch.Tensor]:
    """A trained-looking timm resnet18 state dict (random, seeded), classifier included."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10, **KWARGS)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _shift(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A decoy branch: same keys under ``prefix``, different values."""
    return {prefix + k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}


def _under(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def layouts(sd: dict[str, torch.Tensor]) -> dict[str, tuple[dict, list[str]]]:
    """name -> (checkpoint object, groups its drop log line must name)."""
    body = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    mlp = {"fc.0.weight": torch.randn(8, 128), "fc.2.weight": torch.randn(4, 8)}
    optimizer = {"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"lr": 0.1}]}
    return {
        "timm": (dict(sd), []),
        "torchvision-ddp": (_under(sd, "module."), []),
        "moco-v2": (
            {
                "epoch": 200,
                "arch": "resnet18",
                "state_dict": {
                    **_under({**body, **mlp}, "module.encoder_q."),
                    **_shift({**body, **mlp}, "module.encoder_k."),
                    "module.queue": torch.randn(4, 16),
                    "module.queue_ptr": torch.zeros(1, dtype=torch.long),
                },
                "optimizer": optimizer,
            },
            ["state_dict.module.encoder_k.", "state_dict.module.queue"],
        ),
        "moco-v3": (
            {
                "state_dict": {
                    **_under({**body, **mlp}, "module.base_encoder."),
                    **_shift({**body, **mlp}, "module.momentum_encoder."),
                    "module.predictor.0.weight": torch.randn(8, 4),
                }
            },
            ["state_dict.module.momentum_encoder.", "state_dict.module.predictor."],
        ),
        "dino": (
            {
                "teacher": {**_under(body, "backbone."), "head.mlp.0.weight": torch.randn(8, 128)},
                "student": {
                    **_shift(body, "module.backbone."),
                    "module.head.last_layer.weight": torch.randn(8, 8),
                },
                "epoch": 100,
            },
            ["teacher.head.", "student.module.backbone."],
        ),
        "solo-learn": (
            {
                "state_dict": {
                    **_under(body, "backbone."),
                    **_shift(body, "momentum_backbone."),
                    "projector.0.weight": torch.randn(8, 128),
                    "classifier.weight": torch.randn(10, 128),
                },
                "hyper_parameters": {"method": "byol"},
            },
            ["state_dict.momentum_backbone.", "state_dict.projector.", "state_dict.classifier."],
        ),
        "lightly": (
            {
                **_under(body, "backbone."),
                **_shift(body, "backbone_momentum."),
                "projection_head.layers.0.weight": torch.randn(8, 128),
                "prototypes.layers.weight": torch.randn(16, 8),
            },
            ["backbone_momentum.", "projection_head.", "prototypes."],
        ),
    }


def _assert_same_body(backbone, sd: dict[str, torch.Tensor]) -> None:
    own = backbone.body.state_dict()
    assert own.keys() == {k for k in sd if not k.startswith("fc.")}
    for k, v in own.items():
        assert torch.equal(v, sd[k]), k


def test_every_layout_loads_the_online_backbone_and_drops_the_rest(timm_state, tmp_path, caplog):
    for name, (obj, dropped) in layouts(timm_state).items():
        path = tmp_path / f"{name}.pth"
        torch.save(obj, path)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="loco.weights"):
            _, backbone, source = load_backbone(path, overrides=OVER, backbone_name="resnet18")
        _assert_same_body(backbone, timm_state)
        assert source.method == name and source.config is None
        lines = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
        if dropped:
            assert len(lines) == 1, (name, lines)
            for group in dropped:
                assert f" {group}" in lines[0], (name, group, lines)
        else:
            assert lines == [], name


def test_safetensors_file(timm_state, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in timm_state.items()}, str(path))
    _, backbone, source = load_backbone(path, overrides=OVER, backbone_name="resnet18")
    _assert_same_body(backbone, timm_state)
    assert source.method == "resnet18" and len(source.weights_id) == 16


def test_ambiguous_prefix_missing_keys(timm_state, tmp_path):
    body = {k: v for k, v in timm_state.items() if not k.startswith("fc.")}
    two = tmp_path / "two.pth"
    torch.save({**_under(body, "encoder."), **_shift(body, "backbone.")}, two)
    with pytest.raises(LocoError, match=r"several backbones \(backbone\., encoder\.\).*--prefix"):
        load_backbone(two, overrides=OVER, backbone_name="resnet18")
    _, backbone, _ = load_backbone(two, overrides=OVER, backbone_name="resnet18", prefix="encoder")
    _assert_same_body(backbone, timm_state)
    with pytest.raises(LocoError, match="--prefix 'nope' matches no key"):
        load_backbone(two, overrides=OVER, backbone_name="resnet18", prefix="nope")
    # DINO's student on request
    dino = tmp_path / "dino.pth"
    torch.save(layouts(timm_state)["dino"][0], dino)
    _, student, _ = load_backbone(
        dino, overrides=OVER, backbone_name="resnet18", prefix="student.module.backbone."
    )
    assert torch.equal(student.body.conv1.weight, timm_state["conv1.weight"] + 1)
    # a backbone without its last stage: an error naming the missing keys
    short = tmp_path / "short.pth"
    torch.save(
        _under({k: v for k, v in body.items() if not k.startswith("layer4")}, "backbone."), short
    )
    with pytest.raises(LocoError, match=r"missing keys: layer4\.0\."):
        load_backbone(short, overrides=OVER, backbone_name="resnet18")


def test_knn_runs_on_foreign_checkpoints_with_the_same_result(
    timm_state, tiny_folder_root, tmp_path
):
    """kNN on each layout equals kNN on the plain timm file: the same weights were read."""
    from loco.eval import evaluate_run

    over = [*OVER, f"data.root={tiny_folder_root}", "data.dataset=folder"]
    top1: dict[str, list[float]] = {}
    for name, (obj, _) in layouts(timm_state).items():
        path = tmp_path / f"{name}.pth"
        torch.save(obj, path)
        rows = evaluate_run(
            None,
            path,
            tmp_path / name,
            overrides=over,
            backbone_name="resnet18",
            stages="2,4",
            linear=False,
            ks=[5],
            device="cpu",
            progress=False,
        )
        assert [r["stage"] for r in rows] == [2, 4] and all(r["method"] == name for r in rows)
        top1[name] = [r["top1"] for r in rows]
    assert all(v == top1["timm"] for v in top1.values()), top1


def test_random_init_keeps_the_checkpoints_architecture(tmp_path):
    from loco.weights import read_weights

    source = read_weights(None, random_init=True, seed=3)
    assert (
        source.random_init and source.weights_id == "random-init-seed3" and source.cache_id is None
    )
    with pytest.raises(LocoError, match="nothing to evaluate"):
        read_weights(None)
    with pytest.raises(LocoError, match="not found"):
        read_weights(Path(tmp_path / "missing.safetensors"))
