"""Gradient routing of every method, checked against independent autograd computations.

Each test runs the method's optimised step on one copy of the model and recomputes, on a
fresh copy, the gradient the algorithm prescribes from its definition (which losses may
reach which module). Everything is float64 so the comparison can be tight.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loco.config import Config
from loco.methods import build_method
from loco.models.backbone import build_backbone

SIZE = 16


def make(method: str, **overrides) -> tuple[torch.nn.Module, list[torch.Tensor], torch.Tensor]:
    cfg = Config()
    cfg.method.name = method
    cfg.model.backbone = "resnet18"
    cfg.data.image_size = SIZE
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    torch.manual_seed(0)
    backbone = build_backbone(cfg.model, SIZE)
    model = build_method(backbone, cfg).double()
    views = [torch.randn(4, 3, SIZE, SIZE, dtype=torch.float64) for _ in range(2)]
    labels = torch.tensor([0, 1, 0, 1])
    return model, views, labels


def step_grads(model, views, labels) -> list[list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    model.training_step(views, labels)
    return [
        [
            p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for p in model.module_params(k)
        ]
        for k in range(model.backbone.num_modules)
    ]


def inputs_per_module(model, views) -> list[torch.Tensor]:
    """Detached input of every module from one plain forward pass."""
    x = torch.cat(views)
    ins = []
    for k in range(model.backbone.num_modules):
        ins.append(x.detach())
        x = model.backbone.forward_module(k, x.detach())
    return ins


def assert_grads_equal(got, want, what: str) -> None:
    for k, (g_mod, w_mod) in enumerate(zip(got, want)):
        for g, w in zip(g_mod, w_mod):
            assert torch.allclose(g, w, rtol=1e-7, atol=1e-10), (
                f"{what}: module S{k + 1} gradient differs"
            )


def test_greedy_each_module_gets_only_its_own_loss():
    model, views, labels = make("greedy")
    ref = copy.deepcopy(model)
    got = step_grads(model, views, labels)
    ins = inputs_per_module(ref, views)
    want = []
    for k, x in enumerate(ins):
        loss = ref.head_loss(k, ref.backbone.forward_module(k, x))
        want.append(list(torch.autograd.grad(loss, ref.module_params(k))))
    assert_grads_equal(got, want, "greedy")
    # and the upper losses really would change it: their gradient into module k is non-zero
    k = 0
    h = ref.backbone.forward_module(k, ins[0])
    upper = ref.head_loss(k + 1, ref.backbone.forward_module(k + 1, h))
    leak = torch.autograd.grad(upper, ref.module_params(k))
    assert any(g.abs().sum() > 0 for g in leak)


@pytest.mark.parametrize("first_stage_loss", [True, False])
def test_loco_module_gets_own_loss_plus_the_one_above(first_stage_loss):
    model, views, labels = make("loco", method__first_stage_loss=first_stage_loss)
    ref = copy.deepcopy(model)
    got = step_grads(model, views, labels)
    ins = inputs_per_module(ref, views)
    n = ref.backbone.num_modules
    want = []
    for k in range(n):
        h = ref.backbone.forward_module(k, ins[k])  # input detached: nothing reaches k-1 from here
        loss = ref.head_loss(k, h) if (k > 0 or first_stage_loss) else h.sum() * 0
        if k + 1 < n:
            loss = loss + ref.head_loss(k + 1, ref.backbone.forward_module(k + 1, h))
        want.append(list(torch.autograd.grad(loss, ref.module_params(k))))
    assert_grads_equal(got, want, "loco")

    # a module two below a loss gets nothing from it: adding L_{k+2} changes the gradient
    h0 = ref.backbone.forward_module(0, ins[0])
    h2 = ref.backbone.forward_module(2, ref.backbone.forward_module(1, h0))
    two_up = torch.autograd.grad(ref.head_loss(2, h2), ref.module_params(0))
    assert any(g.abs().sum() > 0 for g in two_up), "test is vacuous: L_3 would reach S1"


def test_loco_first_stage_switch_changes_only_s1():
    a, views, labels = make("loco", method__first_stage_loss=True)
    b, _, _ = make("loco", method__first_stage_loss=False)
    # same backbone and upper heads; b has no S1 head
    b.backbone.load_state_dict(a.backbone.state_dict())
    for key, head in b.heads.items():
        head.load_state_dict(a.heads[key].state_dict())
    ga, gb = step_grads(a, views, labels), step_grads(b, views, labels)
    assert not all(torch.allclose(x, y) for x, y in zip(ga[0], gb[0])), "S1 gradient must change"
    for k in range(1, len(ga)):
        for x, y in zip(ga[k], gb[k]):
            assert torch.allclose(x, y, rtol=1e-7, atol=1e-10), f"S{k + 1} must not change"


def test_loco_upper_only_variant():
    model, views, labels = make("loco", method__shared_update="upper")
    ref = copy.deepcopy(model)
    got = step_grads(model, views, labels)
    ins = inputs_per_module(ref, views)
    n = ref.backbone.num_modules
    for k in range(n):
        h = ref.backbone.forward_module(k, ins[k])
        loss = (
            ref.head_loss(k + 1, ref.backbone.forward_module(k + 1, h))
            if k + 1 < n
            else ref.head_loss(k, h)
        )
        want = torch.autograd.grad(loss, ref.module_params(k))
        for g, w in zip(got[k], want):
            assert torch.allclose(g, w, rtol=1e-7, atol=1e-10)


def test_infopro_each_module_gets_its_weighted_loss():
    model, views, labels = make("infopro")
    ref = copy.deepcopy(model)
    got = step_grads(model, views, labels)
    ins = inputs_per_module(ref, views)
    ref._images = torch.cat(views)
    want = []
    for k, x in enumerate(ins):
        loss = ref.head_loss(k, ref.backbone.forward_module(k, x))
        want.append(list(torch.autograd.grad(loss, ref.module_params(k))))
    assert_grads_equal(got, want, "infopro")
    assert model.lambdas[0] == (5.0, 1.0) and model.lambdas[-1] == (0.0, 1.0)


def plain_simclr_loss(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """NT-Xent as in the SimCLR paper, written from its equation, pair by pair."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n, b = z.shape[0], z1.shape[0]
    total = 0.0
    for i in range(n):
        j = (i + b) % n
        sims = torch.stack([z[i] @ z[m] / t for m in range(n) if m != i])
        total = total - (z[i] @ z[j] / t - torch.logsumexp(sims, 0))
    return total / n


def test_e2e_equals_plain_simclr_step():
    model, views, labels = make("e2e")
    ref = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    out = model.training_step(views, labels)
    x = torch.cat(views)
    for k in range(ref.backbone.num_modules):
        x = ref.backbone.forward_module(k, x)
    z = ref.heads[str(ref.backbone.num_modules - 1)](x)
    loss = plain_simclr_loss(z[:4], z[4:], ref.temperature)
    assert torch.allclose(next(iter(out.losses.values())).double(), loss.detach(), rtol=1e-6)
    params = list(ref.parameters())
    want = torch.autograd.grad(loss, params, allow_unused=True)
    for p, w in zip(model.parameters(), want):
        if w is not None:
            assert torch.allclose(p.grad, w, rtol=1e-6, atol=1e-10)


def test_nt_xent_matches_numpy():
    from loco.losses import nt_xent

    rng = np.random.default_rng(0)
    z = rng.standard_normal((6, 5))
    t = 0.3
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    sim = zn @ zn.T / t
    n, b = 6, 3
    want = 0.0
    for i in range(n):
        others = [sim[i, m] for m in range(n) if m != i]
        want += -(sim[i, (i + b) % n] - np.log(np.sum(np.exp(others))))
    want /= n
    got = nt_xent(torch.tensor(z), t).item()
    assert abs(got - want) < 1e-5


def test_impossible_split_is_a_clear_error():
    from loco.config import ModelConfig
    from loco.errors import LocoError

    with pytest.raises(LocoError, match="impossible"):
        build_backbone(ModelConfig(backbone="resnet18", split=99), 16)
    with pytest.raises(LocoError, match="cut points"):
        build_backbone(ModelConfig(backbone="resnet18", split=[3, 2]), 16)
