"""The profiler against hand-computed FLOPs and saved bytes, and ``loco bench`` end to end.

No timing assertions: wall-clock depends on the machine; FLOPs and bytes do not.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import torch.nn as nn
from conftest import TINY_CHANNELS
from torch.utils.checkpoint import checkpoint

from loco.bench import decoder_flops, estimate_max_batch, largest_batch
from loco.cli import main
from loco.config import Config
from loco.methods import build_method
from loco.methods.reference import naive_loco
from loco.models.backbone import build_backbone
from loco.plans import parse_recompute_plan
from loco.profiling import (
    LiveTensorTracker,
    SavedTensorTracker,
    count_flops,
    plan_recompute,
    state_bytes,
    track_step,
)

B, IN, OUT = 3, 5, 7
F32 = 4
TINY = {"channels": list(TINY_CHANNELS)}

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: faster on busy cores


def linear_relu() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, OUT), nn.ReLU())


# -- FLOPs -----------------------------------------------------------------------------------
def test_flops_of_linear_by_hand():
    model, x = linear_relu(), torch.randn(B, IN)
    mm = 2 * B * IN * OUT  # one (B x IN) @ (IN x OUT) product
    # forward + weight gradient (the input needs no gradient)
    assert count_flops(lambda: model(x).sum().backward()) == 2 * mm
    # + input gradient
    x.requires_grad_(True)
    assert count_flops(lambda: model(x).sum().backward()) == 3 * mm
    # LoCo's input-gradient pass alone (torch.autograd.grad on a leaf works under the counter)
    assert count_flops(lambda: torch.autograd.grad(model(x).sum(), x)) == 2 * mm


def test_decoder_flops_of_e2e_head_by_hand():
    cfg = tiny_config("e2e")
    method = build_method(build_backbone(cfg.model, 32), cfg)
    views = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    n, c, h, o = 4, method.backbone.channels[-1], cfg.decoder.hidden_dim, cfg.decoder.out_dim
    mlp = 2 * n * (c * h + h * o)  # forward of Linear(c,h) and Linear(h,o)
    similarity = 2 * n * n * o  # z @ z.T in NT-Xent
    # backward: input and weight gradients of both layers; both operands of z @ z.T
    assert decoder_flops(method, views) == 3 * mlp + 3 * similarity


# -- saved tensors ------------------------------------------------------------------------------
def exclude(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def test_saved_bytes_of_linear_relu_by_hand():
    model = linear_relu()
    x = torch.randn(B, IN)
    with SavedTensorTracker(exclude(model)) as saved:
        y = model(x)
        # Linear keeps x for its weight gradient (its weight is a parameter: not counted);
        # ReLU keeps its output for the mask.
        assert saved.live == F32 * B * (IN + OUT)
        y.sum().backward()
        assert saved.live == 0  # backward freed the graph
    assert saved.peak == F32 * B * (IN + OUT)


def test_parameters_are_not_activations_and_storages_count_once():
    model = linear_relu()
    x = torch.randn(B, IN, requires_grad=True)
    with SavedTensorTracker(exclude(model)) as saved:
        y = model(x)  # now Linear also keeps its weight (for the input gradient)
        assert saved.live == F32 * B * (IN + OUT)
        z = y * y  # saves y twice: one storage
        assert saved.live == F32 * B * (IN + OUT)
        inplace = nn.ReLU(inplace=True)(x * 2)  # the in-place result shares the product's storage
        assert saved.live == F32 * B * (IN + OUT + IN)
        del inplace
        assert saved.live == F32 * B * (IN + OUT)  # the graph went with its output
        z.sum().backward()
    assert saved.live == 0 and saved.peak == F32 * B * (2 * IN + OUT)


def test_retained_graph_stays_counted_until_dropped():
    model = linear_relu()
    x = torch.randn(B, IN)
    with SavedTensorTracker(exclude(model)) as saved:
        y = model(x)
        y.sum().backward(retain_graph=True)
        assert saved.live == F32 * B * (IN + OUT)
        del y
        assert saved.live == 0


def test_checkpointed_segment_counts_its_input_and_its_recomputation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, OUT), nn.ReLU(), nn.Linear(OUT, 4), nn.ReLU())
    x = torch.randn(B, IN, requires_grad=True)
    everything = F32 * B * (IN + OUT + 4)  # x, ReLU 1 output (= Linear 2 input), ReLU 2 output

    with SavedTensorTracker(exclude(model)) as plain:
        model(x).sum().backward()
    assert plain.peak == everything

    saved = SavedTensorTracker(exclude(model))
    with saved:
        y = checkpoint(
            model,
            x,
            use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), saved.recomputation()),
        )
        assert saved.live == F32 * B * IN  # only the segment's input is kept
        y.sum().backward()
    assert saved.peak == everything  # the recomputed activations were alive during backward
    assert saved.live == 0


def test_live_tensor_tracker():
    with LiveTensorTracker() as live:
        a = torch.ones(1000)
        b = a * 2
        del a
        c = b + 1
        b.add_(1)  # in place: no new storage
        v = c.view(10, 100)  # a view: no new storage
        assert live.live == 2 * 4000
    assert live.peak == 2 * 4000
    del b, c, v


def test_state_bytes():
    model = linear_relu()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(B, IN)).sum().backward()
    opt.step()
    n = F32 * (IN * OUT + OUT)
    assert state_bytes(model, opt) == {"params": n, "grads": n, "optimizer": n}


# -- methods -------------------------------------------------------------------------------------
def tiny_config(method: str, split: str = "stages") -> Config:
    cfg = Config()
    cfg.method.name = method
    cfg.model.backbone = "resnet18"
    cfg.model.kwargs = dict(TINY)
    cfg.model.split = split
    cfg.data.image_size = 32
    cfg.decoder.hidden_dim = 32
    cfg.decoder.out_dim = 16
    return cfg


def tiny(method: str, split: str = "stages"):
    cfg = tiny_config(method, split)
    torch.manual_seed(0)
    return build_method(build_backbone(cfg.model, 32), cfg)


@pytest.fixture(scope="module")
def views() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]


def test_local_methods_keep_less_than_e2e(views):
    e2e = track_step(tiny("e2e"), views)
    greedy = track_step(tiny("greedy"), views)
    loco = track_step(tiny("loco"), views)
    assert greedy.peak < loco.peak < e2e.peak
    # greedy keeps one module at a time, LoCo two: no other module's tensors at their peaks
    assert len([k for k, v in greedy.peak_by_owner.items() if k.startswith("S") and v]) == 1
    assert len([k for k, v in loco.peak_by_owner.items() if k.startswith("S") and v]) <= 2


def test_recomputation_lowers_the_peak_and_is_counted(views):
    plain = track_step(tiny("e2e"), views)
    method = tiny("e2e")
    method.backbone.recompute = [True] * method.backbone.num_modules
    recomputed = track_step(method, views)
    assert recomputed.peak < plain.peak
    # the recomputed segments were seen: all that the plain step saves is saved again
    assert recomputed.recomputed_total > 0
    assert recomputed.saved_total + recomputed.recomputed_total >= plain.saved_total


def test_naive_loco_costs_more_flops_than_forward_reuse(views):
    loco, naive = tiny("loco"), naive_loco(tiny("loco"))
    assert count_flops(lambda: naive.training_step(views)) > 1.3 * count_flops(
        lambda: loco.training_step(views)
    )


def test_auto_plan_meets_its_budget(views):
    e2e_peak = track_step(tiny("e2e"), views).peak
    method = tiny("loco")
    plan = plan_recompute(method, views, int(0.7 * e2e_peak))
    assert any(plan)
    assert track_step(method, views).peak <= 0.7 * e2e_peak


def test_parse_recompute_and_largest_batch():
    assert parse_recompute_plan("stage1", 3) == [True, False, False]
    assert parse_recompute_plan("S1=all;S3=2", 3) == [True, False, 2]
    assert largest_batch(lambda b: b <= 37, start=8) == 37
    assert largest_batch(lambda b: b <= 5, start=8) == 5
    assert largest_batch(lambda b: False, start=8) == 0


def test_bench_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--backbone",
            "resnet18",
            "--image-size",
            "32",
            "--batch",
            "2",
            "--methods",
            "greedy,loco,loco_naive",
            "--recompute",
            "none,auto=0.7",
            "--steps",
            "1",
            "--out",
            str(out),
            "model.kwargs={channels: [8, 16, 32, 64]}",
            "decoder.hidden_dim=32",
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    rows = {(r["method"], r["recompute"]): r for r in result["rows"]}
    assert set(rows) == {
        (m, r) for m in ("e2e", "greedy", "loco", "loco_naive") for r in ("none", "auto=0.7")
    }
    base = rows["e2e", "none"]
    assert base["ratios"]["flops"] == 1.0 and base["ratios"]["saved_peak"] == 1.0
    for (_, recompute), row in rows.items():
        assert row["flops"] > 0 and row["saved_peak"] > 0 and row["img_per_s"] > 0
        assert row["flops_decoder"] > 0 and row["params"] > 0 and row["grads"] > 0
        if recompute.startswith("auto"):
            assert row["ratios"]["saved_peak"] <= 0.7
    assert rows["loco_naive", "none"]["flops"] > rows["loco", "none"]["flops"]
    assert result["modules"][0]["profile"][0]["module"] == "S1"
    for m, c in zip(result["modules"][0]["profile"], [8, 16, 32, 64], strict=True):
        # decoder.conv_block is off: Linear(c, 32, no bias)-BN-ReLU-Linear(32, 128), 4 views
        assert m["decoder_block_params"] == 0
        assert m["decoder_params"] == c * 32 + 2 * 32 + 32 * 128 + 128
        assert m["decoder_flops_forward"] == 2 * 4 * (c * 32 + 32 * 128)
    table = out.with_suffix(".md").read_text()
    assert "| loco_naive |" in table and "FLOPs ×e2e" in table
    assert "wrote" in capsys.readouterr().out


def test_loco_recomputes_a_middle_segment_once(views):
    """A middle module is backpropagated twice; its recomputed segment runs forward once more,
    not once per pass (torch.utils.checkpoint would)."""
    plain, method = tiny("loco"), tiny("loco")
    method.backbone.recompute = [0, 1, 0, 0]
    extra = count_flops(lambda: method.training_step(views)) - count_flops(
        lambda: plain.training_step(views)
    )
    bb = method.backbone
    with torch.no_grad():
        x = bb.forward_module(0, torch.cat(views))
        segment = nn.Sequential(*[bb.unit_module(u) for u in bb.segments(1)[0]])
        once = count_flops(lambda: segment(x))
    assert extra == once > 0


@pytest.mark.parametrize("recompute", [False, True])
def test_compiled_units_train_like_eager_units(views, recompute):
    """``train.compile`` / ``bench --compile``: LoCo's retained two-pass graphs survive
    compilation (aot_eager: the autograd capture without a C++ toolchain), and the
    state_dict keys do not change, so checkpoints load into eager models."""
    eager, compiled = tiny("loco"), tiny("loco")
    keys = list(compiled.state_dict())
    compiled.backbone.compile_units(backend="aot_eager")
    assert list(compiled.state_dict()) == keys
    for m in (eager, compiled):
        m.backbone.recompute = [recompute] * m.backbone.num_modules
        m.train().training_step(views)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        assert a.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_estimate_max_batch_arithmetic():
    # 100 B per image on top of 50 B, 1000 B of weights: (10_000 - 1050) // 100
    per_image, batch = estimate_max_batch(10_000, 1000, (2, 250), (4, 450))
    assert per_image == 100 and batch == 89
    assert estimate_max_batch(10, 1000, (2, 250), (4, 450))[1] == 0  # weights alone too big


def test_step_memory_is_linear_in_the_batch_so_the_estimate_holds():
    """The max-batch estimate extrapolates from two batch sizes; check the line it draws
    against a third, measured batch."""
    g = torch.Generator().manual_seed(1)
    views = {b: [torch.randn(b, 3, 32, 32, generator=g) for _ in range(2)] for b in (2, 4, 8)}
    for name in ("e2e", "loco"):
        method = tiny(name)
        peaks = {}
        for b, v in views.items():
            with LiveTensorTracker() as live:
                track_step(method, v)
            peaks[b] = live.peak
        per_image, _ = estimate_max_batch(1 << 30, 0, (2, peaks[2]), (4, peaks[4]))
        predicted = peaks[4] + 4 * per_image
        assert per_image > 0
        assert abs(predicted - peaks[8]) <= 0.05 * peaks[8], (name, predicted, peaks[8])


def test_bench_rows_per_objective_against_e2e_simclr(tmp_path):
    """``--objectives``: every method with every objective, ratios to e2e with SimCLR; BYOL's
    momentum copy of the network shows in the parameter bytes and its forward in the FLOPs."""
    out = tmp_path / "bench.json"
    args = ["bench", "--backbone", "resnet18", "--image-size", "32", "--batch", "2"]
    args += ["--methods", "loco", "--objectives", "byol,vicreg", "--steps", "1"]
    args += ["--memory-budget", "0", "--out", str(out), "model.kwargs={channels: [8, 16, 32, 64]}"]
    assert main([*args, "decoder.hidden_dim=32"]) == 0
    result = json.loads(out.read_text())
    rows = {(r["method"], r["objective"]): r for r in result["rows"]}
    assert set(rows) == {
        ("e2e", "simclr"), ("e2e", "byol"), ("loco", "byol"), ("e2e", "vicreg"), ("loco", "vicreg")
    }  # fmt: skip
    assert result["baseline"]["objective"] == "simclr"
    assert rows["e2e", "simclr"]["ratios"]["flops"] == 1.0
    cfg = Config()
    cfg.model.kwargs = dict(TINY)
    backbone_bytes = 4 * sum(p.numel() for p in build_backbone(cfg.model, 32).parameters())
    simclr, byol = rows["e2e", "simclr"], rows["e2e", "byol"]
    assert byol["params"] - simclr["params"] > backbone_bytes  # momentum backbone (+ heads)
    assert byol["flops"] > simclr["flops"] and byol["ratios"]["flops"] > 1
    assert "| loco+byol |" in out.with_suffix(".md").read_text()
