"""Every method's optimised step leaves exactly the gradients of the straightforward
reference (:mod:`loco.methods.reference`: each loss recomputes its own window and runs its
own full backward), for every split and with recomputation off, partial and on.

float64 and a tight tolerance: the optimised steps reorder the same arithmetic (split
input/weight passes, summed cotangents, recomputed segments), so anything beyond rounding
is a routing bug. The reference always runs without recomputation.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_CHANNELS

from loco.config import Config
from loco.methods import build_method
from loco.methods.reference import Reference, loss_windows
from loco.models.backbone import build_backbone

SIZE = 16
# timm zero-initialises each residual branch's last BatchNorm; with it about half of the
# comparisons would be 0 == 0
TINY = {"channels": list(TINY_CHANNELS), "zero_init_last": False}  # a resnet18 in milliseconds
# the other families whose units differ: ConvNeXt (downsample units, no BatchNorm) and ViT
# (the embedding pseudo-unit, tokens, the final norm joining the last module)
OTHER_BACKBONES = {
    "convnext_atto": {"dims": [8, 16, 24, 32], "depths": [1, 1, 2, 1]},
    "vit_tiny_patch16_224": {"patch_size": 4, "depth": 4, "embed_dim": 16, "num_heads": 2},
}

METHODS = [
    ("e2e", {}),
    ("greedy", {}),
    ("infopro", {}),
    ("loco", {}),
    ("loco", {"shared_update": "upper"}),
    ("loco", {"first_stage_loss": False}),
]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: faster on busy cores

# every routing with every objective but simclr (the cases above); the conv-block decoder
# where configs/small uses it
OBJECTIVES = ["mocov3", "byol", "barlow", "vicreg"]
OBJECTIVE_CASES = [
    (name, objective) for name in ("e2e", "greedy", "infopro", "loco") for objective in OBJECTIVES
]


def make(
    name: str,
    method_opts: dict,
    split: str,
    backbone: str = "resnet18",
    conv_block: bool = False,
):
    cfg = Config()
    cfg.model.backbone = backbone
    cfg.model.kwargs = dict(OTHER_BACKBONES.get(backbone, TINY))
    cfg.model.split = split
    cfg.data.image_size = SIZE
    cfg.decoder.hidden_dim = 32
    cfg.decoder.out_dim = 16
    cfg.decoder.conv_block = conv_block
    cfg.method.name = name
    for key, value in method_opts.items():
        setattr(cfg.method, key, value)
    torch.manual_seed(0)
    return build_method(build_backbone(cfg.model, SIZE), cfg).double()


def all_grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def views() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, SIZE, SIZE, generator=g, dtype=torch.float64) for _ in range(2)]


def _id(case: tuple[str, dict]) -> str:
    return "-".join([case[0], *map(str, case[1].values())])


@pytest.mark.parametrize("recompute", ["none", "all"])
@pytest.mark.parametrize("split", ["stages", "blocks"])
@pytest.mark.parametrize("name,opts", METHODS, ids=map(_id, METHODS))
def test_optimised_step_equals_reference(name, opts, split, recompute, views):
    check_against_reference(name, opts, split, recompute, views)


@pytest.mark.parametrize("split", ["stages", "blocks"])
@pytest.mark.parametrize(
    "name,opts", [m for m in METHODS if m[0] == "loco"], ids=map(_id, METHODS[3:])
)
def test_loco_with_partial_recompute_equals_reference(name, opts, split, views):
    """Only the first segment of each module recomputed: mixed checkpointed/plain units."""
    check_against_reference(name, opts, split, "partial", views)


OTHER_CASES = [  # InfoPro needs feature maps: a ViT is refused (test_every_parameter_trained)
    (backbone, name, opts)
    for backbone in OTHER_BACKBONES
    for name, opts in METHODS[:4]
    if not (name == "infopro" and backbone.startswith("vit"))
]


@pytest.mark.parametrize("recompute", ["none", "all"])
@pytest.mark.parametrize(
    "backbone,name,opts", OTHER_CASES, ids=[f"{b}-{_id((n, o))}" for b, n, o in OTHER_CASES]
)
def test_other_families_equal_reference(backbone, name, opts, recompute, views):
    check_against_reference(name, opts, "stages", recompute, views, backbone=backbone)


@pytest.mark.parametrize("name,opts", METHODS[:4], ids=map(_id, METHODS[:4]))
def test_conv_block_decoders_equal_reference(name, opts, views):
    """``decoder.conv_block=true``: the decoders' own convolutions and BatchNorms too."""
    check_against_reference(name, opts, "stages", "partial", views, conv_block=True)


@pytest.mark.parametrize(
    "name,objective", OBJECTIVE_CASES, ids=[f"{n}-{o}" for n, o in OBJECTIVE_CASES]
)
def test_every_objective_equals_reference(name, objective, views):
    """Each (routing, objective) pair, momentum targets included (the copies are moved away
    from the online weights first, so a target computed from the online network, or with a
    gradient, would show)."""
    conv_block = name in ("greedy", "loco")
    check_against_reference(
        name, {"objective": objective}, "stages", "partial", views, conv_block=conv_block
    )


def check_against_reference(
    name: str,
    opts: dict,
    split: str,
    recompute: str,
    views: list[torch.Tensor],
    backbone: str = "resnet18",
    conv_block: bool = False,
) -> None:
    model = make(name, opts, split, backbone, conv_block)
    if model.momentum is not None:  # a target that is not the online network
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in model.momentum.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    reference = Reference(copy.deepcopy(model))
    n = model.backbone.num_modules
    model.backbone.recompute = {"none": [False] * n, "partial": [1] * n, "all": [True] * n}[
        recompute
    ]

    model.zero_grad(set_to_none=True)
    out = model.training_step(views)
    got = all_grads(model)
    reference.zero_grad(set_to_none=True)
    ref_out = reference.training_step(views)
    want = all_grads(reference.method)

    assert got.keys() == want.keys()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(got[n] is not None for n in trained), "some parameter got no gradient"
    assert all(got[n] is None for n in got.keys() - trained), "a momentum copy got a gradient"
    for key in got:
        g, w = got[key], want[key]
        assert (g is None) == (w is None), f"{key}: gradient present in only one of the two"
        if g is not None:
            assert torch.allclose(g, w, rtol=1e-9, atol=1e-12), (
                f"{key}: max diff {(g - w).abs().max():.3g}"
            )
    assert out.losses.keys() == ref_out.losses.keys()
    for key, loss in out.losses.items():
        assert torch.allclose(loss, ref_out.losses[key], rtol=1e-12)
    assert torch.allclose(out.features, ref_out.features, rtol=1e-12)


def test_every_parameter_is_trained_and_windows_follow_the_definition():
    model = make("loco", {}, "stages")
    windows = loss_windows(model)
    n = model.backbone.num_modules
    assert [w.window for w in windows] == [(0,)] + [(k - 1, k) for k in range(1, n)]
    upper = loss_windows(make("loco", {"shared_update": "upper"}, "stages"))
    assert [w.updates for w in upper] == [()] + [(k - 1,) for k in range(1, n - 1)] + [
        (n - 2, n - 1)
    ]
    assert [w.window for w in loss_windows(make("e2e", {}, "stages"))] == [tuple(range(n))]


def test_reference_is_not_vacuous(views):
    """Dropping the feedback from L_{k+1} (greedy routing) changes LoCo's gradients."""
    loco, greedy = make("loco", {}, "stages"), make("greedy", {}, "stages")
    greedy.backbone.load_state_dict(loco.backbone.state_dict())
    for key, head in greedy.heads.items():
        head.load_state_dict(loco.heads[key].state_dict())
    Reference(loco).training_step(views)
    Reference(greedy).training_step(views)
    a = loco.backbone.module_parameters(0)[0].grad
    b = greedy.backbone.module_parameters(0)[0].grad
    assert not torch.allclose(a, b)


def test_naive_loco_shares_the_momentum_network(views):
    """``loco_naive`` with a momentum objective: the reference uses (and updates) the
    method's one momentum copy, the one the trainer saves as ``backbone_ema``."""
    from loco.methods.reference import NaiveLoCo

    cfg = make("loco", {"objective": "byol"}, "stages").cfg
    naive = NaiveLoCo(build_backbone(cfg.model, SIZE), cfg).double()
    assert naive.momentum is naive.method.momentum is not None
    naive.training_step(views)
    before = [p.clone() for p in naive.momentum.parameters()]
    naive.method.backbone.body.conv1.weight.data.add_(1.0)
    assert naive.update_momentum(0, 10) == pytest.approx(0.996)
    after = list(naive.momentum.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
