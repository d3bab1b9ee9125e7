"""Every backbone parameter of every advertised family gets a gradient from every method.

One small model per family the README lists (ResNet, ConvNeXt, RegNet, EfficientNet,
MobileNet, ViT), built with ``zero_init_last=False`` where timm has it (timm otherwise
zero-initialises the last BatchNorm of each residual block, and half of the parameters
would have an exactly zero first-step gradient for a reason that has nothing to do with
routing). After one ``training_step`` each trainable backbone parameter must hold a
``.grad`` that exists and is non-zero. timm's post-pooling head modules (ConvNeXt's
``head.norm``, MobileNetV3's ``conv_head``) are not part of the backbone at all
(docs/methods.md, "Backbones"); that, and that exports still load into plain timm, is
checked here too.
"""

from __future__ import annotations

import pytest
import timm
import torch

from loco.config import Config
from loco.errors import LocoError
from loco.methods import build_method
from loco.models.backbone import build_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32
# name -> (timm kwargs, modules timm runs after pooling, which the backbone does not have,
#          modules after the last feature stage that join the last local module)
FAMILIES = {
    "resnet18": ({"channels": [8, 16, 32, 64], "zero_init_last": False}, [], []),
    "convnext_atto": ({"dims": (8, 16, 24, 32), "depths": (1, 1, 2, 1)}, ["head.norm"], []),
    "regnetx_002": ({"zero_init_last": False}, [], []),
    "test_efficientnet": ({}, [], ["conv_head", "bn2"]),
    "mobilenetv3_small_050": ({}, ["conv_head"], []),
    "vit_tiny_patch16_224": (
        {"patch_size": 8, "depth": 4, "embed_dim": 32, "num_heads": 2},
        [],
        ["norm"],
    ),
}
METHODS = ["e2e", "greedy", "loco", "infopro"]


def make(backbone: str, method: str, small_image: str = "auto") -> torch.nn.Module:
    cfg = Config()
    cfg.model.backbone = backbone
    cfg.model.small_image = small_image
    cfg.model.kwargs = dict(FAMILIES[backbone][0])
    cfg.data.image_size = SIZE
    cfg.decoder.hidden_dim = 32
    cfg.decoder.out_dim = 16
    cfg.method.name = method
    torch.manual_seed(0)
    return build_method(build_backbone(cfg.model, SIZE), cfg)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backbone", FAMILIES)
def test_one_step_reaches_every_backbone_parameter(backbone, method):
    if method == "infopro" and backbone.startswith("vit"):
        with pytest.raises(LocoError, match="convolutional backbone"):
            make(backbone, method)
        return
    model = make(backbone, method)
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(4, 3, SIZE, SIZE, generator=g) for _ in range(2)]
    model.training_step(views)
    named = list(model.backbone.body.named_parameters())
    assert named, "no parameters"
    missing = [n for n, p in named if p.grad is None]
    zero = [n for n, p in named if p.grad is not None and not p.grad.any()]
    assert not missing, f"{backbone}/{method}: no gradient for {missing}"
    assert not zero, f"{backbone}/{method}: zero gradient for {zero}"
    # and the per-module lists the steps select from cover exactly the body
    listed = [id(p) for k in range(model.backbone.num_modules) for p in model.module_params(k)]
    assert sorted(listed) == sorted(id(p) for _, p in named)


@pytest.mark.parametrize("backbone", FAMILIES)
def test_head_removed_trailing_trained_and_export_loads_in_plain_timm(backbone):
    kwargs, head, trailing = FAMILIES[backbone]
    bb = make(backbone, "e2e", small_image="false").backbone  # timm's own stem
    assert [u.path for u in bb.groups[-1] if u.trailing] == trailing
    for path in head:
        assert isinstance(bb.body.get_submodule(path), torch.nn.Identity), path
    # the export (a checkpoint's "backbone" entry) in timm.create_model(name, num_classes=0):
    # strict=False, and what is missing is exactly the removed post-pooling head
    timm_kwargs = {**kwargs, **({"img_size": SIZE} if backbone.startswith("vit") else {})}
    plain = timm.create_model(backbone, num_classes=0, **timm_kwargs)
    result = plain.load_state_dict(bb.body.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert sorted({k.rpartition(".")[0] for k in result.missing_keys}) == sorted(head)
    x = torch.randn(2, 3, SIZE, SIZE)
    bb.eval(), plain.eval()
    if not head:  # same network: timm's forward_features equals our last module's output
        torch.testing.assert_close(plain.forward_features(x), bb(x)[-1])


def test_convnext_checkpoint_loads_for_eval(tmp_path):
    """A ConvNeXt run's checkpoint, an older one still holding ``head.norm``, and a plain timm
    state dict with a classifier all load into the backbone that ``loco eval`` builds."""
    from loco import checkpoint as ckpt
    from loco.eval.network import load_backbone

    model = make("convnext_atto", "e2e")
    model.cfg.model.kwargs = {"dims": [8, 16, 24, 32], "depths": [1, 1, 2, 1]}
    saved = model.backbone.body.state_dict()
    run = {"backbone": saved, "config": model.cfg.to_dict(), "step": 1, "meta": {}}
    ckpt.atomic_save(run, tmp_path / "run.pt")
    old = {**saved, "head.norm.weight": torch.ones(32), "head.norm.bias": torch.zeros(32)}
    ckpt.atomic_save({**run, "backbone": old}, tmp_path / "old.pt")
    for name in ("run.pt", "old.pt"):
        _, bb, _ = load_backbone(tmp_path / name)
        got = bb.body.state_dict()
        assert got.keys() == saved.keys()
        assert all(torch.equal(got[k], saved[k]) for k in saved), name

    plain = timm.create_model("convnext_atto", num_classes=10, **FAMILIES["convnext_atto"][0])
    ckpt.atomic_save(plain.state_dict(), tmp_path / "timm.pt")
    _, bb, _ = load_backbone(
        tmp_path / "timm.pt", cfg=model.cfg, overrides=["model.small_image=false"]
    )
    torch.testing.assert_close(bb.body.stages.state_dict(), plain.stages.state_dict())
    # a key of a module the backbone really has must still match
    bad = {**saved, "stages.0.blocks.0.gamma": torch.zeros(3)}
    with pytest.raises(LocoError, match="shape mismatch: stages.0.blocks.0.gamma"):
        ckpt.load_backbone_weights(model.backbone.body, bad, "bad.pt")


def test_stem_width_without_effect_is_refused():
    """timm ignores ``stem_width`` for the plain ResNet stem (conv1 keeps 64 channels): a
    config setting it describes another network than the one built."""
    from loco.config import ModelConfig

    kwargs = {"channels": [8, 16, 32, 64]}
    with pytest.raises(LocoError, match="stem_width=16 has no effect on 'resnet18'"):
        build_backbone(ModelConfig(backbone="resnet18", kwargs={**kwargs, "stem_width": 16}), 16)
    bb = build_backbone(ModelConfig(backbone="resnet18", kwargs=kwargs), 16)
    assert bb.body.conv1.out_channels == 64
    # a deep stem reads it: accepted, and it sets the stem's width
    deep = {**kwargs, "stem_type": "deep", "stem_width": 16}
    bb = build_backbone(ModelConfig(backbone="resnet18", small_image="false", kwargs=deep), 16)
    assert bb.body.conv1[0].out_channels == 16
