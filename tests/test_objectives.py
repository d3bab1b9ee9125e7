"""The objectives (loco.objectives): each loss against an independent numpy computation,
fp32 under bf16 autocast, the same over 2 gloo ranks as on the concatenated batch; config
rules; head sizes; the momentum update; objective=simclr is today's step."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loco.config import Config, load_config
from loco.errors import LocoError
from loco.objectives import OBJECTIVES, build_objective, head_config
from loco.objectives.barlow import barlow_loss
from loco.objectives.byol import byol_loss
from loco.objectives.mocov3 import mocov3_loss
from loco.objectives.vicreg import vicreg_loss

pytestmark = pytest.mark.usefixtures("one_thread")
B, D = 6, 5


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def barlow_np(z1, z2, lambd):
    """Barlow Twins from the paper's equation, element by element."""
    n, d = z1.shape
    a = (z1 - z1.mean(0)) / np.sqrt(z1.var(0) + 1e-5)
    b = (z2 - z2.mean(0)) / np.sqrt(z2.var(0) + 1e-5)
    c = np.array(
        [[sum(a[k, i] * b[k, j] for k in range(n)) / n for j in range(d)] for i in range(d)]
    )
    on = sum((1 - c[i, i]) ** 2 for i in range(d))
    off = sum(c[i, j] ** 2 for i in range(d) for j in range(d) if i != j)
    return on + lambd * off


def vicreg_np(z1, z2, sim, std, cov):
    """VICReg's three terms as the paper writes them."""
    invariance = np.mean(np.sum((z1 - z2) ** 2, axis=1)) / z1.shape[1]

    def v(z):
        return np.mean(np.maximum(0, 1 - np.sqrt(z.var(0, ddof=1) + 1e-4)))

    def c(z):
        m = np.cov(z, rowvar=False)
        return (np.sum(m**2) - np.sum(np.diag(m) ** 2)) / z.shape[1]

    return sim * invariance + std * (v(z1) + v(z2)) / 2 + cov * (c(z1) + c(z2))


def byol_np(p1, p2, t1, t2):
    """||p/|p| - t'/|t'|||^2 both ways, mean over images."""
    return np.mean(np.sum((unit(p1) - unit(t2)) ** 2, 1) + np.sum((unit(p2) - unit(t1)) ** 2, 1))


def mocov3_np(q1, q2, k1, k2, t):
    """ctr(q1, k2) + ctr(q2, k1), ctr = 2t * cross-entropy of q . k / t, positives on the
    diagonal."""

    def ctr(q, k):
        logits = unit(q) @ unit(k).T / t
        lse = np.log(np.exp(logits).sum(1))
        return 2 * t * np.mean(lse - np.diag(logits))

    return ctr(q1, k2) + ctr(q2, k1)


def cfg_for(objective: str, *overrides: str) -> Config:
    return load_config(None, [f"method.objective={objective}", *overrides])


@pytest.fixture
def z():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2 * B, D, generator=g, dtype=torch.float64), torch.randn(
        2 * B, D, generator=g, dtype=torch.float64
    )


def test_barlow_matches_the_equation(z):
    z, _ = z
    want = barlow_np(_np(z[:B]), _np(z[B:]), 0.3)
    objective = build_objective(cfg_for("barlow", "objective.barlow.lambd=0.3"))
    assert objective.loss(z, None).item() == pytest.approx(want, rel=1e-10)
    scaled = cfg_for("barlow", "objective.barlow.lambd=0.3", "objective.barlow.scale_loss=0.5")
    assert build_objective(scaled).loss(z, None).item() == pytest.approx(want / 2, rel=1e-10)


def test_vicreg_matches_its_three_terms(z):
    z, _ = z
    cfg = cfg_for(
        "vicreg", "objective.vicreg.sim_coeff=2", "objective.vicreg.std_coeff=3",
        "objective.vicreg.cov_coeff=5",
    )  # fmt: skip
    want = vicreg_np(_np(z[:B]), _np(z[B:]), 2, 3, 5)
    assert build_objective(cfg).loss(z, None).item() == pytest.approx(want, rel=1e-10)
    # each term matters: dropping one changes the loss
    for sim, std, cov in ((0, 3, 5), (2, 0, 5), (2, 3, 0)):
        assert vicreg_np(_np(z[:B]), _np(z[B:]), sim, std, cov) != pytest.approx(want)


def test_byol_is_the_normalised_mse_to_the_other_views_target(z):
    p, t = z
    want = byol_np(_np(p[:B]), _np(p[B:]), _np(t[:B]), _np(t[B:]))
    assert build_objective(cfg_for("byol")).loss(p, t).item() == pytest.approx(want, rel=1e-10)


def test_mocov3_is_symmetric_infonce_with_the_momentum_keys(z):
    q, k = z
    want = mocov3_np(_np(q[:B]), _np(q[B:]), _np(k[:B]), _np(k[B:]), 0.7)
    objective = build_objective(cfg_for("mocov3", "objective.mocov3.temperature=0.7"))
    q = q.clone().requires_grad_(True)
    k = k.clone().requires_grad_(True)
    assert objective.loss(q, k).item() == pytest.approx(want, rel=1e-10)
    objective.loss(q, k).backward()
    assert k.grad is None, "the keys are a constant"


LOSSES = {
    "barlow": lambda z, t: barlow_loss(z, 5e-3, gather=False),
    "vicreg": lambda z, t: vicreg_loss(z, 25, 25, 1, gather=False),
    "byol": lambda z, t: byol_loss(z, t),
    "mocov3": lambda z, t: mocov3_loss(z, t, 0.2, gather=False),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_bf16_autocast_gives_the_fp32_loss_and_gradient(name):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(64, 128, generator=gen)
    t = torch.randn(64, 128, generator=gen)

    def run(autocast: bool):
        leaf = z.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = LOSSES[name](leaf, t)
        loss.backward()
        return loss.item(), leaf.grad

    ref_loss, ref_grad = run(False)
    loss, grad = run(True)
    assert loss == pytest.approx(ref_loss, rel=1e-6, abs=1e-6)
    assert (grad - ref_grad).abs().max().item() <= 1e-6 * max(1.0, ref_grad.abs().max().item())
    assert grad.dtype == torch.float32


# -- across ranks ---------------------------------------------------------------------------
W = 2


def _rank_losses(rank: int, init_file: str, z: torch.Tensor, t: torch.Tensor, out: dict):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W)
    torch.set_num_threads(1)
    results = {}
    for name in sorted(GATHERED):
        leaf = z[rank].clone().requires_grad_(True)
        loss = GATHERED[name](leaf, t[rank])
        loss.backward()
        results[name] = (loss.detach(), leaf.grad.clone())
    out[rank] = results
    dist.destroy_process_group()


GATHERED = {
    "barlow": lambda z, t: barlow_loss(z, 5e-3),
    "vicreg": lambda z, t: vicreg_loss(z, 25, 25, 1),
    "byol": lambda z, t: byol_loss(z, t),
    "mocov3": lambda z, t: mocov3_loss(z, t, 0.2),
}


def views_of_all(per_rank: torch.Tensor) -> torch.Tensor:
    """[z1 of every rank; z2 of every rank]: the concatenated batch on one rank."""
    b = per_rank.shape[1] // 2
    return torch.cat([per_rank[:, :b].reshape(-1, D), per_rank[:, b:].reshape(-1, D)])


@pytest.mark.distributed
def test_two_ranks_equal_one_rank_on_the_concatenated_batch(tmp_path):
    """Rank losses average to the one-rank loss of the whole batch, and each rank's gradient
    (which covers every rank's loss) averaged over ranks is the one-rank gradient: what the
    trainer's gradient averaging then applies."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(W, 2 * 3, D, generator=g, dtype=torch.float64)
    t = torch.randn(W, 2 * 3, D, generator=g, dtype=torch.float64)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_losses, args=(str(tmp_path / "init"), z, t, out), nprocs=W, join=True)
        results = dict(out)
    for name, fn in GATHERED.items():
        leaf = views_of_all(z).requires_grad_(True)
        want = fn(leaf, views_of_all(t))
        want.backward()
        mean = sum(results[r][name][0] for r in range(W)) / W
        assert torch.allclose(mean, want.detach(), rtol=1e-10), name
        for r in range(W):
            got = results[r][name][1] / W
            rows = torch.cat(
                [leaf.grad[r * 3 : r * 3 + 3], leaf.grad[W * 3 + r * 3 : W * 3 + r * 3 + 3]]
            )
            assert torch.allclose(got, rows, rtol=1e-8, atol=1e-12), f"{name}: rank {r} gradient"


def test_collapse_std_is_zero_when_collapsed_and_one_when_spread():
    from loco.monitor import collapse_std

    rng = np.random.default_rng(0)
    spread = rng.standard_normal((4096, 64))
    normed = spread / np.linalg.norm(spread, axis=1, keepdims=True)
    want = normed.std(0, ddof=1).mean() * 8  # numpy, sqrt(64) = 8
    assert collapse_std(torch.tensor(spread)) == pytest.approx(want, rel=1e-5)
    assert want == pytest.approx(1.0, abs=0.02)
    constant = torch.ones(32, 64) + 1e-3 * torch.randn(32, 64)
    assert collapse_std(constant) < 0.01


# -- configuration --------------------------------------------------------------------------
def test_objective_options_belong_to_their_objective():
    with pytest.raises(LocoError, match="objective.vicreg.sim_coeff=10.0 has no effect with "
                       "method.objective=byol: it is an option of vicreg"):  # fmt: skip
        load_config(None, ["method.objective=byol", "objective.vicreg.sim_coeff=10"])
    with pytest.raises(LocoError, match="method.supervised=True .* option of simclr"):
        load_config(
            None, ["method.name=infopro", "method.objective=vicreg", "method.supervised=true"]
        )
    with pytest.raises(LocoError, match="method.temperature=0.5 .* option of simclr"):
        load_config(None, ["method.objective=mocov3", "method.temperature=0.5"])
    with pytest.raises(LocoError, match="did you mean 'byol'"):
        load_config(None, ["method.objective=boyl"])
    with pytest.raises(LocoError, match="momentum .* train.stage_parallel=1"):
        load_config(None, ["method.objective=byol", "train.stage_parallel=2"])
    with pytest.raises(
        LocoError, match=r"objective.byol.base_momentum must be in \[0, 1\], got 1.5"
    ):
        load_config(None, ["method.objective=byol", "objective.byol.base_momentum=1.5"])
    with pytest.raises(LocoError, match="objective.vicreg.cov_coeff must be >= 0"):
        load_config(None, ["method.objective=vicreg", "objective.vicreg.cov_coeff=-1"])
    with pytest.raises(LocoError, match="mocov3.temperature must be > 0"):
        load_config(None, ["method.objective=mocov3", "objective.mocov3.temperature=0"])
    # defaults never count as set, and an objective's own options are accepted
    cfg = load_config(None, ["method.objective=vicreg", "objective.vicreg.sim_coeff=10"])
    assert cfg.objective.vicreg.sim_coeff == 10
    assert set(OBJECTIVES) == {"simclr", "mocov3", "byol", "barlow", "vicreg"}


def test_head_sizes_recommended_unless_decoder_is_set():
    cfg = load_config(None, ["method.objective=vicreg"])
    d = head_config(cfg)
    head = OBJECTIVES["vicreg"].head
    assert (d.mlp_layers, d.hidden_dim, d.out_dim) == (
        head.mlp_layers,
        head.hidden_dim,
        head.out_dim,
    )
    cfg = load_config(
        None, ["method.objective=vicreg", "decoder.out_dim=64", "decoder.conv_block=true"]
    )
    d = head_config(cfg)
    assert (d.mlp_layers, d.hidden_dim, d.out_dim, d.conv_block) == (3, head.hidden_dim, 64, True)
    simclr = load_config(None, [])
    assert head_config(simclr) == simclr.decoder  # simclr: today's head


# -- the step -------------------------------------------------------------------------------
SIZE = 16
TINY = {"channels": [8, 16, 32, 64], "zero_init_last": False}


def make(name: str, objective: str):
    from loco.methods import build_method
    from loco.models.backbone import build_backbone

    cfg = Config()
    cfg.method.name, cfg.method.objective = name, objective
    cfg.model.kwargs = dict(TINY)
    cfg.data.image_size = SIZE
    cfg.decoder.hidden_dim, cfg.decoder.out_dim = 32, 16
    torch.manual_seed(0)
    return build_method(build_backbone(cfg.model, SIZE), cfg).double()


@pytest.mark.parametrize("name", ["e2e", "greedy", "infopro", "loco"])
def test_simclr_objective_is_todays_step(name):
    """objective=simclr adds no module and its step is, bit for bit, the step with the
    loss written as before the registry: NT-Xent on the decoder's output."""
    from loco.losses import nt_xent

    model = make(name, "simclr")
    assert model.momentum is None and model.predictors is None
    assert all(not n.startswith(("momentum.", "predictors.")) for n, _ in model.named_parameters())
    old = copy.deepcopy(model)
    if name == "infopro":
        from loco.losses import reconstruction_bce

        def infopro_loss(k, h, x=None):  # InfoPro's head loss before the registry
            lam_rec, lam_con = old.lambdas[k]
            loss = lam_con * nt_xent(old.heads[str(k)](h), old.temperature, gather=old.gather)
            if lam_rec > 0:
                target = (old._images * old.std + old.mean).clamp(0, 1)
                loss = loss + lam_rec * reconstruction_bce(old.decoders[str(k)](h), target)
            return loss

        old.head_loss = infopro_loss
    else:
        old.head_loss = lambda k, h, x=None: nt_xent(
            old.heads[str(k)](h), old.temperature, gather=old.gather
        )
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(4, 3, SIZE, SIZE, generator=g, dtype=torch.float64) for _ in range(2)]
    out, want = model.training_step(views), old.training_step(views)
    assert out.losses.keys() == want.losses.keys()
    assert all(torch.equal(out.losses[k], want.losses[k]) for k in out.losses)
    for (n, p), q in zip(model.named_parameters(), old.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), n


@pytest.mark.parametrize("name,objective", [("e2e", "byol"), ("loco", "mocov3")])
def test_momentum_update_follows_the_cosine_schedule(name, objective):
    """After a step: ema <- m ema + (1 - m) online, m = 1 - (1 - base)(cos(pi k / K) + 1) / 2,
    for the backbone copy and every decoder copy (not the predictors); the copies are no
    optimizer parameters."""
    from loco.optim import build_optimizer

    model = make(name, objective)
    base = {"byol": 0.996, "mocov3": 0.99}[objective]
    names = dict(model.named_parameters())
    copies = {n: p for n, p in names.items() if n.startswith("momentum.")}
    assert copies and all(not p.requires_grad for p in copies.values())
    online = {n: names[n.removeprefix("momentum.")] for n in copies}
    assert all(not n.startswith("momentum.predictors") for n in copies)
    if name == "loco":
        assert {n.split(".")[2] for n in copies if n.startswith("momentum.heads.")} == {
            "0",
            "1",
            "2",
            "3",
        }
    optimized = {
        id(p)
        for group in build_optimizer(model, Config().optim, 1).param_groups
        for p in group["params"]
    }
    assert not optimized & {id(p) for p in copies.values()}
    with torch.no_grad():
        for p in names.values():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in copies.items()}
    m = model.update_momentum(3, 10)
    want_m = 1 - (1 - base) * (math.cos(math.pi * 3 / 10) + 1) / 2
    assert m == pytest.approx(want_m, rel=1e-12)
    for n, p in copies.items():
        assert torch.allclose(p, want_m * before[n] + (1 - want_m) * online[n], rtol=1e-12), n
