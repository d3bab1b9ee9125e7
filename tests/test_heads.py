"""LoCo's decoder conv block: one residual block with stride-2 downsampling, built from the
backbone's own block family (the paper's Sec. 4.5), at the module's channel count."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from loco.config import Config, DecoderConfig, ModelConfig
from loco.errors import LocoError
from loco.methods import build_method
from loco.models.backbone import build_backbone
from loco.models.heads import ProjectionDecoder, conv_block


def _n(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_resnet50_blocks_are_stride2_bottlenecks_under_15M(one_thread):
    bb = build_backbone(ModelConfig(backbone="resnet50", small_image="false"), 64)
    assert bb.channels == [256, 512, 1024, 2048]
    total = 0
    for k, c in enumerate(bb.channels):
        block = conv_block(bb, k)
        w = c // 4  # ResNet-50's own bottleneck width: 64, 128, 256, 512
        convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
        shapes = [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in convs]
        assert shapes == [
            (c, w, (1, 1), (1, 1)),
            (w, w, (3, 3), (2, 2)),
            (w, c, (1, 1), (1, 1)),
            (c, c, (1, 1), (2, 2)),  # projection shortcut
        ]
        # independent count: the four convs plus a BatchNorm (weight, bias) after each
        assert _n(block) == c * w + 9 * w * w + w * c + c * c + 2 * (w + w + c + c)
        h = torch.randn(2, c, 8, 8)
        assert block.eval()(h).shape == (2, c, 4, 4)
        total += _n(block)
    assert total <= 15e6  # 11.5 M (the old basic block: 106 M)


FAMILIES = [  # (timm model, kwargs): one small model per conv family
    ("resnet18", {"channels": [16, 32, 64, 128]}),  # basic blocks
    ("regnetx_002", {}),
    ("convnext_atto", {}),
    ("efficientnet_b0", {}),
    ("mobilenetv3_small_100", {}),  # depthwise-separable and inverted residuals
]


@pytest.mark.parametrize("name,kwargs", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_each_conv_family_builds_and_trains(name, kwargs, one_thread):
    cfg = Config()
    cfg.model = ModelConfig(backbone=name, kwargs=kwargs)
    cfg.decoder = DecoderConfig(conv_block=True, hidden_dim=32, out_dim=16)
    cfg.method.name = "greedy"
    cfg.method.gather_negatives = False
    torch.manual_seed(0)
    method = build_method(build_backbone(cfg.model, 32), cfg).train()
    views = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    method.training_step(views)
    with torch.no_grad():
        outs = method.backbone(torch.cat(views))
    for k, h in enumerate(outs):
        head = method.heads[str(k)]
        assert not isinstance(head.block, nn.Identity)
        with torch.no_grad():
            y = head.block(h)
        # channel count kept, spatial size halved (rounded up)
        assert y.shape == (8, h.shape[1], (h.shape[2] + 1) // 2, (h.shape[3] + 1) // 2)
        for pname, p in head.block.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"S{k + 1} {pname}"


def test_token_backbone_conv_block_is_a_one_line_error(one_thread):
    bb = build_backbone(
        ModelConfig(backbone="vit_tiny_patch16_224", kwargs={"patch_size": 8, "depth": 4}), 32
    )
    with pytest.raises(LocoError, match="token backbones use conv_block=false"):
        ProjectionDecoder.for_module(bb, 0, DecoderConfig(conv_block=True))
    assert isinstance(ProjectionDecoder.for_module(bb, 0, DecoderConfig()).block, nn.Identity)
