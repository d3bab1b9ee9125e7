"""``loco bench``: FLOPs, activation memory and throughput of each method (and objective),
as ratios to e2e (with SimCLR).

Every figure is measured in this process on the same backbone, batch and image size, and
reported next to its ratio to e2e (no recomputation), so the ratios hold on any machine:

* FLOPs of one training step (forward + backward + recomputation), split into backbone and
  decoders (the decoders' forward + backward, counted on their own);
* peak activation memory: the most bytes of tensors saved for backward alive at once
  (:class:`loco.profiling.SavedTensorTracker`), and what was alive at that moment, by module;
* peak step memory: every tensor the step allocates (:class:`loco.profiling.LiveTensorTracker`);
* parameter, gradient and optimizer-state bytes;
* wall-clock images/s (CPU, or CUDA with bf16 and channels_last, where
  ``torch.cuda.max_memory_allocated`` and the largest batch that fits are added).

    loco bench --backbone resnet50 --image-size 224 --batch 8 \\
        --methods e2e,greedy,loco,loco_naive,infopro --split stages --recompute none,stage1 \\
        --out bench.json
    loco bench -c configs/small/loco.yaml --methods e2e,greedy,loco \\
        --objectives simclr,byol,vicreg --out bench_objectives.json

With several ``--objectives`` every method is measured with each; the baseline stays e2e
with SimCLR. An objective's predictor and momentum target count as decoder FLOPs (what
the loss adds to the backbone), its momentum copies as parameter bytes, and the timed
step includes the momentum update.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import yaml

from loco.bench_report import command_line, write_report
from loco.bench_report import markdown as bench_markdown
from loco.config import Config, load_config
from loco.errors import LocoError
from loco.methods import METHODS, Method, build_method
from loco.methods.base import options_for
from loco.models.backbone import build_backbone
from loco.objectives import OBJECTIVES, for_objective
from loco.optim import build_optimizer
from loco.plans import format_recompute_plan, parse_recompute_plan
from loco.profiling import (
    LiveTensorTracker,
    SavedTensorTracker,
    count_flops,
    plan_recompute,
    state_bytes,
    track_step,
)

log = logging.getLogger("loco.bench")

RECOMPUTE_MODES = ("none", "stage1", "all")
MiB = 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", help="YAML config whose model/decoder/method sections are used"
    )
    parser.add_argument(
        "--backbone", help="any timm model with feature_info (default: the config's, else resnet50)"
    )
    parser.add_argument(
        "--image-size", type=int, help="default: the config's data.image_size, else 224"
    )
    parser.add_argument(
        "--batch", type=int, default=8, help="images per step (each gives two views)"
    )
    parser.add_argument(
        "--methods",
        default="e2e,greedy,loco,loco_naive,infopro",
        help=f"comma list of {', '.join(sorted(METHODS))}; e2e is always measured (the baseline)",
    )
    parser.add_argument(
        "--objectives",
        help=f"comma list of {', '.join(sorted(OBJECTIVES))} (default: the config's "
        "method.objective); each method is measured with each, ratios to e2e with simclr",
    )
    parser.add_argument(
        "--split",
        action="append",
        default=None,
        help="stages | blocks | N | [cut, points] | balanced:K | balanced:K:flops; comma list "
        "or repeated (default: the config's model.split, else stages)",
    )
    parser.add_argument(
        "--recompute",
        default="none",
        help="comma list of: none | stage1 | all | auto=RATIO (recompute until the peak saved bytes "
        "are RATIO x e2e's) | a plan such as 'S1=all;S2=1' (module k recomputes its first n segments)",
    )
    parser.add_argument(
        "--plan-batch", type=int, default=2, help="batch used to plan auto recomputation"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=2,
        help="timed steps per row (after one warm-up); 0 = no timing",
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--compile", action="store_true", help="also time with torch.compile per block"
    )
    parser.add_argument(
        "--max-batch", action="store_true", help="CUDA: binary-search the largest batch that fits"
    )
    parser.add_argument(
        "--memory-budget",
        type=float,
        default=80.0,
        help="GiB for the device-independent max-batch estimate (default 80: an H100; 0 = off)."
        " Measures the step's tensors at the batch and at half of it; bytes per image = the "
        "difference, fixed bytes = weights, optimizer state and what does not grow with batch",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default="bench.json", help="JSON results; a .md table is written next to it"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. decoder.mlp_layers=4 method.first_stage_loss=false",
    )
    from loco.parallel import bench as stage_bench

    stage_bench.add_arguments(parser)


# -- what one row measures ----------------------------------------------------------------
@dataclass
class Row:
    method: str
    split: Any
    recompute: str  # as asked (e.g. "auto=0.45")
    plan: str = "none"  # what ran: StagedBackbone.recompute as "S1=all;S2=1"
    modules: int = 0
    flops: int = 0
    flops_decoder: int = 0
    saved_peak: int = 0
    saved_peak_by_owner: dict[str, int] = field(default_factory=dict)
    saved_total: int = 0
    live_peak: int = 0
    params: int = 0
    grads: int = 0
    optimizer: int = 0
    step_s: float | None = None
    cpu_s: float | None = None  # process CPU seconds per step (all threads): robust to other load
    img_per_s: float | None = None
    compiled_img_per_s: float | None = None
    cuda_peak: int | None = None
    cuda_max_batch: int | None = None
    bytes_per_image: float | None = None  # all tensors of a step, per image (two views)
    est_max_batch: int | None = None  # fp32, from --memory-budget and the two batch sizes
    objective: str = "simclr"
    ratios: dict[str, float] = field(default_factory=dict)

    @property
    def flops_backbone(self) -> int:
        return self.flops - self.flops_decoder

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items()}
        d["flops_backbone"] = self.flops_backbone
        return d


def build(
    cfg: Config, method_name: str, recompute: str, seed: int, objective: str | None = None
) -> Method:
    """The method (``loco_naive``: the reference LoCo) on a fresh backbone, in train mode;
    with ``objective``, that objective (its options kept, the others' at their defaults)."""
    if objective is not None:
        cfg.method, cfg.objective = for_objective(cfg, objective)
    cfg.method = options_for(cfg.method, method_name)
    torch.manual_seed(seed)
    backbone = build_backbone(cfg.model, cfg.data.image_size)
    backbone.recompute = parse_recompute_plan(recompute, backbone.num_modules)
    return build_method(backbone, cfg).train()


def inner(method: Method) -> Method:
    """The method that owns the heads (the reference wraps the method it mirrors)."""
    return getattr(method, "method", method)


def decoder_flops(method: Method, views: list[torch.Tensor]) -> int:
    """FLOPs of every local loss's decoder, forward + backward (into its input), on its own."""
    owner = inner(method)
    x = torch.cat(views)
    if hasattr(owner, "_images"):
        owner._images = x
    with torch.no_grad():
        outs = owner.backbone(x)
    keys = sorted(
        {int(k) for child in owner.children() if isinstance(child, nn.ModuleDict) for k in child}
    )
    total = 0
    for k in keys:
        h = outs[k].detach().requires_grad_(True)
        first = owner.target_modules(k)[0]  # a momentum target's input
        x_k = x if first == 0 else outs[first - 1]
        total += count_flops(lambda k=k, h=h, x_k=x_k: owner.head_loss(k, h, x_k).backward())
    if hasattr(owner, "_images"):
        owner._images = None
    owner.zero_grad(set_to_none=True)
    return total


def measure_row(
    cfg: Config,
    name: str,
    recompute: str,
    plan: str,
    views: list[torch.Tensor],
    args: argparse.Namespace,
    objective: str | None = None,
) -> Row:
    method = build(cfg, name, plan, args.seed, objective)
    bb = method.backbone
    row = Row(
        name,
        cfg.model.split,
        recompute,
        format_recompute_plan(bb.recompute),
        modules=bb.num_modules,
        objective=cfg.method.objective,
    )

    def step() -> None:
        method.zero_grad(set_to_none=True)
        method.training_step(views)

    row.flops = count_flops(step)
    row.flops_decoder = decoder_flops(method, views)

    with LiveTensorTracker() as live:
        saved = track_step(method, views)
    row.saved_peak, row.saved_peak_by_owner = saved.peak, saved.peak_by_owner
    row.saved_total, row.live_peak = saved.saved_total, live.peak

    optimizer = build_optimizer(method, cfg.optim, 1)
    optimizer.step()
    row.params, row.grads, row.optimizer = state_bytes(method, optimizer).values()
    batch = views[0].shape[0]
    if args.memory_budget > 0 and batch >= 2:
        with LiveTensorTracker() as half:
            track_step(method, [v[: batch // 2] for v in views])
        row.bytes_per_image, row.est_max_batch = estimate_max_batch(
            int(args.memory_budget * 2**30),
            row.params + row.optimizer,
            (batch // 2, half.peak),
            (batch, row.live_peak),
        )
    if args.steps > 0:
        row.step_s, row.cpu_s = time_steps(method, optimizer, views, args.steps)
        row.img_per_s = views[0].shape[0] / row.step_s
        if args.compile:
            compiled = build(cfg, name, plan, args.seed, objective)
            compiled.backbone.compile_units()
            opt = build_optimizer(compiled, cfg.optim, 1)
            row.compiled_img_per_s = (
                views[0].shape[0] / time_steps(compiled, opt, views, args.steps)[0]
            )
    return row


def estimate_max_batch(
    budget: int, state: int, small: tuple[int, int], large: tuple[int, int]
) -> tuple[float, int]:
    """(bytes per image, largest batch under ``budget``) from a step's peak bytes of all
    tensors at two batch sizes, ``(batch, peak)``: the peak grows linearly with the batch
    (activations) on top of a constant (gradient buffers, head temporaries), and weights
    plus optimizer state (``state``) sit there throughout. fp32; bf16 roughly halves the
    activations, so treat it as the conservative figure."""
    (b1, p1), (b2, p2) = small, large
    per_image = (p2 - p1) / (b2 - b1)
    if per_image <= 0:
        return 0.0, 0
    fixed = state + max(p2 - per_image * b2, 0)
    return per_image, max(int((budget - fixed) // per_image), 0)


def time_steps(
    method: Method, optimizer: torch.optim.Optimizer, views: list[torch.Tensor], steps: int
) -> tuple[float, float]:
    """Median wall-clock and process-CPU seconds of one training iteration (zero_grad,
    step, optimizer step), after one warm-up iteration."""
    wall, cpu = [], []
    device = views[0].device
    for i in range(steps + 1):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device):
            method.training_step(views)
        optimizer.step()
        method.update_momentum(i, steps + 1)  # objectives with a momentum target
        _sync(device)
        if i > 0:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    return (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )


# -- CUDA ------------------------------------------------------------------------------------
def cuda_measure(cfg: Config, row: Row, args: argparse.Namespace, device: torch.device) -> None:
    """Peak allocated bytes of one bf16 channels_last step, and optionally the largest batch."""
    method = (
        build(cfg, row.method, row.plan, args.seed, row.objective)
        .to(device)
        .to(memory_format=torch.channels_last)
    )
    optimizer = build_optimizer(method, cfg.optim, 1)

    def views_of(batch: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(args.seed)
        shape = (batch, 3, cfg.data.image_size, cfg.data.image_size)
        return [
            torch.randn(shape, generator=g).to(device).contiguous(memory_format=torch.channels_last)
            for _ in range(2)
        ]

    def peak(batch: int) -> int:
        """Bytes allocated at the step's peak beyond what was there before (weights, inputs)."""
        optimizer.zero_grad(set_to_none=True)
        views = views_of(batch)
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with _autocast(device):
            method.training_step(views)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base

    row.cuda_peak = peak(args.batch)
    if args.steps > 0:
        views = views_of(args.batch)
        row.step_s, row.cpu_s = time_steps(method, optimizer, views, args.steps)
        row.img_per_s = args.batch / row.step_s
    if args.max_batch:
        row.cuda_max_batch = largest_batch(lambda b: _fits(peak, b), start=args.batch)


def _fits(peak: Callable[[int], int], batch: int) -> bool:
    try:
        peak(batch)
        return True
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return False


def largest_batch(fits: Callable[[int], bool], start: int = 8, limit: int = 1 << 16) -> int:
    """Largest b with fits(b), by doubling from ``start`` and then bisecting (0 if none)."""
    lo, hi = 0, start
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    if lo == 0:  # even `start` does not fit: bisect below it
        hi = start
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# -- per-module profile ---------------------------------------------------------------------
def module_profile(
    cfg: Config, recompute: str, views: list[torch.Tensor], seed: int
) -> list[dict[str, Any]]:
    """Per local module: forward FLOPs, and bytes saved for backward by its forward alone
    (with the row's recomputation, i.e. what it keeps while waiting for its backward)."""
    method = build(cfg, "greedy", recompute, seed)
    bb = method.backbone
    exclude = [*method.parameters(), *method.buffers()]
    x, rows = torch.cat(views), []
    for k in range(bb.num_modules):
        x_in = x.detach().requires_grad_(k > 0)
        flops = count_flops(lambda k=k, x_in=x_in: bb.forward_module(k, x_in))
        with SavedTensorTracker(exclude) as saved:
            h = bb.forward_module(k, x_in)
            resident = saved.live
        del h
        rows.append(
            {
                "module": f"S{k + 1}",
                "span": f"{bb.groups[k][0].path} .. {bb.groups[k][-1].path}",
                "segments": len(bb.segments(k)),
                "recomputed_segments": bb.recomputed_segments(k),
                "flops_forward": flops,
                "saved_bytes": resident,
            }
        )
        with torch.no_grad():
            x = bb.forward_module(k, x)
        head = method.heads[str(k)]  # greedy: module k's decoder, as in every method
        rows[-1]["decoder_params"] = sum(p.numel() for p in head.parameters())
        rows[-1]["decoder_block_params"] = sum(p.numel() for p in head.block.parameters())
        rows[-1]["decoder_flops_forward"] = count_flops(lambda head=head, x=x: head(x))
    return rows


# -- report ----------------------------------------------------------------------------------
def add_ratios(rows: list[Row], base: Row) -> None:
    for row in rows:
        r = {
            "flops": row.flops / base.flops,
            "flops_backbone": row.flops_backbone / base.flops_backbone,
            "saved_peak": row.saved_peak / base.saved_peak,
            "live_peak": row.live_peak / base.live_peak,
        }
        if row.img_per_s and base.img_per_s:
            r["img_per_s"] = row.img_per_s / base.img_per_s
        if row.cpu_s and base.cpu_s:  # throughput per CPU-second: less sensitive to other load
            r["img_per_cpu_s"] = base.cpu_s / row.cpu_s
        if row.compiled_img_per_s and base.compiled_img_per_s:
            r["compiled_img_per_s"] = row.compiled_img_per_s / base.compiled_img_per_s
        if row.cuda_peak and base.cuda_peak:
            r["cuda_peak"] = row.cuda_peak / base.cuda_peak
        if row.est_max_batch and base.est_max_batch:
            r["est_max_batch"] = row.est_max_batch / base.est_max_batch
        row.ratios = r


# -- entry point -----------------------------------------------------------------------------
def _splits(values: list[str] | None) -> list[Any]:
    out: list[Any] = []
    for value in values or ["stages"]:
        if value.strip().startswith("["):
            out.append(yaml.safe_load(value))
            continue
        for token in value.split(","):
            token = token.strip()
            out.append(int(token) if token.isdigit() else token)
    return out


def auto_plan(
    cfg: Config,
    name: str,
    ratio: float,
    views: list[torch.Tensor],
    seed: int,
    cache: dict[str, int],
) -> str:
    """The recomputation that brings ``name``'s peak saved bytes to ``ratio`` x e2e's."""
    if "e2e" not in cache:
        cache["e2e"] = track_step(build(cfg, "e2e", "none", seed), views).peak
    method = build(cfg, name, "none", seed)
    plan = format_recompute_plan(plan_recompute(method, views, int(ratio * cache["e2e"])))
    log.info("auto=%s for %s: recompute %s", ratio, name, plan)
    return plan


def _auto_ratio(spec: str) -> float | None:
    if not spec.startswith("auto"):
        return None
    try:
        return float(spec.split("=", 1)[1]) if "=" in spec else 0.45
    except ValueError:
        raise LocoError(
            f"--recompute '{spec}': use auto=RATIO, e.g. auto=0.45 (of e2e's peak)"
        ) from None


def run(args: argparse.Namespace) -> int:
    if getattr(args, "stage_parallel", 0):
        from loco.parallel import bench as stage_bench

        return stage_bench.run(args)
    cfg = load_config(args.config, args.overrides)
    cfg.model.backbone = args.backbone or (cfg.model.backbone if args.config else "resnet50")
    cfg.data.image_size = args.image_size or (cfg.data.image_size if args.config else 224)
    cfg.optim.batch_size = args.batch
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise LocoError(
            f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(sorted(METHODS))}"
        )
    names = ["e2e"] + [m for m in names if m != "e2e"]
    objectives = [o.strip() for o in (args.objectives or cfg.method.objective).split(",")]
    objectives = [o for o in objectives if o]
    wrong = [o for o in objectives if o not in OBJECTIVES]
    if wrong:
        raise LocoError(
            f"unknown objective(s) {', '.join(wrong)}; choose from {', '.join(sorted(OBJECTIVES))}"
        )
    for objective in objectives:  # e.g. an EMA objective with stage parallelism
        for_objective(cfg, objective)
    specs = [r.strip() for r in args.recompute.split(",") if r.strip()]
    if args.device == "cuda" and not torch.cuda.is_available():
        raise LocoError("--device cuda but no CUDA device is visible")
    device = torch.device(
        "cuda"
        if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        else "cpu"
    )

    g = torch.Generator().manual_seed(args.seed)
    shape = (args.batch, 3, cfg.data.image_size, cfg.data.image_size)
    views = [torch.randn(shape, generator=g) for _ in range(2)]
    plan_views = [v[: args.plan_batch] for v in views]  # saved bytes scale with the batch
    cpu_args = argparse.Namespace(
        **{**vars(args), "steps": args.steps if device.type == "cpu" else 0}
    )
    rows: list[Row] = []
    profiles: dict[tuple[str, str], dict[str, Any]] = {}
    splits = _splits(args.split) if args.split or not args.config else [cfg.model.split]
    jobs = [
        (split, spec, name, objective)
        for split in splits
        for spec in specs
        for objective in objectives
        for name in names
    ]
    if (splits[0], "none", "e2e", "simclr") not in jobs:  # the baseline of every ratio
        jobs.insert(0, (splits[0], "none", "e2e", "simclr"))
    caches: dict[str, dict[str, int]] = {}
    for split, spec, name, objective in jobs:
        cfg.model.split = split
        cache = caches.setdefault(str(split), {})
        ratio = _auto_ratio(spec)
        plan = spec if ratio is None else auto_plan(cfg, name, ratio, plan_views, args.seed, cache)
        log.info("bench %s %s split=%s recompute=%s (%s)", name, objective, split, spec, plan)
        t0 = time.perf_counter()
        row = measure_row(cfg, name, spec, plan, views, cpu_args, objective)
        if device.type == "cuda":
            cuda_measure(cfg, row, args, device)
            torch.cuda.empty_cache()
        rows.append(row)
        log.info(
            "  %.1f GFLOPs, peak saved %.0f MiB, %.1f s",
            row.flops / 1e9,
            row.saved_peak / MiB,
            time.perf_counter() - t0,
        )
        key = (str(split), row.plan)
        if key not in profiles:
            profiles[key] = {
                "split": split,
                "recompute": row.plan,
                "profile": module_profile(cfg, row.plan, views, args.seed),
            }
    baseline = [
        r for r in rows if r.method == "e2e" and r.plan == "none" and r.objective == "simclr"
    ]
    base = baseline[0] if baseline else rows[0]
    add_ratios(rows, base)
    result = {
        "command": command_line(),
        "backbone": cfg.model.backbone,
        "image_size": cfg.data.image_size,
        "batch": args.batch,
        "memory_budget_gib": args.memory_budget,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "baseline": {
            "method": base.method,
            "objective": base.objective,
            "split": base.split,
            "recompute": base.plan,
        },
        "config": {
            "decoder": cfg.to_dict()["decoder"],
            "method": cfg.to_dict()["method"],
            "objective": cfg.to_dict()["objective"],
        },
        "rows": [r.as_dict() for r in rows],
        "modules": list(profiles.values()),
    }
    write_report(result, args.out, bench_markdown)
    return 0
