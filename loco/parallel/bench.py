"""``loco bench --stage-parallel K``: measure stage parallelism on synthetic inputs and check
the schedule model against the measurement, in one run.

Rows, each in images per second of the same model, method and batch:
  * one process, ``--threads`` threads (1): ``training_step`` + optimizer (sequential);
  * one process, K x ``--threads`` threads: the same (what the extra cores give without stages);
  * K ranks (gloo), ``--threads`` each, schedule ``sync`` and ``pipelined``.
The per-stage phases (forward, decoder+loss, feedback pass, weight pass) are timed in the
one-process run with the engine's own building blocks; with the activation bytes and the
measured point-to-point bandwidth they give the model's prediction for each schedule, printed
next to the measurement. ``--flops-model`` adds the FLOP-based prediction (GPU-like cost
model) for another backbone, e.g. ResNet-50 ``stages`` on 4 devices.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loco.bench_report import command_line, write_report
from loco.config import Config, load_config
from loco.errors import LocoError
from loco.methods import build_method
from loco.models.backbone import build_backbone
from loco.optim import build_optimizer, build_scheduler
from loco.parallel.layout import check_request, make_groups
from loco.parallel.schedule import (
    StageCost,
    flop_costs,
    memory,
    module_and_head_flops,
    predict,
    stage_bytes,
)
from loco.parallel.stage import StageEngine
from loco.profiling import SavedTensorTracker


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("stage parallelism (loco.parallel)")
    group.add_argument(
        "--stage-parallel",
        type=int,
        default=0,
        metavar="K",
        help="measure K stage ranks (gloo, --threads each) against one process, with the "
        "schedule model's predictions (the split must give K modules)",
    )
    group.add_argument(
        "--flops-model",
        action="append",
        default=[],
        metavar="BACKBONE:SIZE:SPLIT",
        help="also predict speed-up and per-device memory from FLOPs (GPU-like cost model) "
        "for another model, e.g. resnet50:224:stages, resnet50:224:balanced:4:flops or "
        "presnet50:224:stages (repeatable); with --steps 0 only these (no timing)",
    )


def _setup(cfg: Config, seed: int, batch: int):
    torch.manual_seed(seed)
    method = build_method(build_backbone(cfg.model, cfg.data.image_size), cfg)
    opt = build_optimizer(method, cfg.optim, 1)
    sched = build_scheduler(opt, cfg.optim, 10_000, 1_000)
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 3, cfg.data.image_size, cfg.data.image_size)
    views = [torch.randn(shape, generator=g) for _ in range(2)]
    return method, opt, sched, views


def time_sequential(cfg: Config, seed: int, batch: int, steps: int, threads: int) -> float:
    """Seconds per step of today's single-process step."""
    torch.set_num_threads(threads)
    method, opt, sched, views = _setup(cfg, seed, batch)
    method.train()
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        method.training_step(views)
        sched.step_update(i)
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def time_phases(cfg: Config, seed: int, batch: int, steps: int) -> list[StageCost]:
    """Median seconds of each stage's phases, run in the engine's order in one process."""
    torch.set_num_threads(1)
    method, opt, _, views = _setup(cfg, seed, batch)
    method.train()
    K = method.backbone.num_modules
    feedback = method.name == "loco"
    samples: list[list[list[float]]] = [[[], [], [], []] for _ in range(K)]
    outs, saved = [0] * K, [0] * K
    for _ in range(steps + 1):
        opt.zero_grad(set_to_none=True)
        x = torch.cat(views)
        graphs = []
        for k in range(K):
            x_in = x.detach().requires_grad_(feedback and k > 0)
            t0 = time.perf_counter()
            with SavedTensorTracker() as tracker:
                graph = method.backbone.forward_graph(
                    k, x_in, 2 if feedback and 0 < k < K - 1 else 1
                )
            t1 = time.perf_counter()
            _, own = method.local_loss(k, graph.output)
            t2 = time.perf_counter()
            if feedback and k == K - 1:
                graph.backward(own, input_grad=True)
            elif feedback and k > 0:
                graph.input_grad(own)
            t3 = time.perf_counter()
            graphs.append((graph, own))
            outs[k] = graph.output.numel() * graph.output.element_size()
            saved[k] = tracker.peak
            x = graph.output
            samples[k][0].append(t1 - t0)
            samples[k][1].append(t2 - t1)
            samples[k][2].append(t3 - t2)
        for k in range(K):  # weight passes (loco: with the feedback, zeros suffice to time)
            graph, own = graphs[k]
            t0 = time.perf_counter()
            if not (feedback and k == K - 1):
                graph.backward(own)
            samples[k][3].append(time.perf_counter() - t0)
        opt.step()
    costs = []
    for k in range(K):
        f, h, xg, w = (statistics.median(s[1:]) for s in samples[k])
        if feedback and k == K - 1:  # the top's one pass: X and W together
            xg, w = 0.0, xg
        params = sum(p.numel() * p.element_size() for p in method.module_params(k))
        costs.append(StageCost(f, h, xg, w, outs[k], saved[k], params))
    return costs


def _rank_worker(rank, world, cfg, seed, batch, steps, schedules, init, out) -> None:
    torch.set_num_threads(int(os.environ.get("LOCO_BENCH_THREADS", "1")))
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    layout = check_request(world, world, cfg.method.name, world)
    groups = make_groups(layout, rank)
    method, opt, sched, views = _setup(cfg, seed, batch)
    method.train()
    result: dict[str, Any] = {}
    # point-to-point bandwidth with the activation's size: rank 0 -> 1 and back
    n = max(
        1,
        int(method.backbone.channels[0])
        * batch
        * 2
        * (cfg.data.image_size // max(method.backbone.reductions[0], 1)) ** 2,
    )
    buf = torch.zeros(n)
    if rank < 2:
        dist.barrier(groups.replica)
        t0 = time.perf_counter()
        for _ in range(5):
            if rank == 0:
                dist.send(buf, 1, group=groups.p2p)
                dist.recv(buf, 1, group=groups.p2p)
            else:
                dist.recv(buf, 0, group=groups.p2p)
                dist.send(buf, 0, group=groups.p2p)
        result["bandwidth"] = 10 * buf.numel() * 4 / (time.perf_counter() - t0)
    else:
        dist.barrier(groups.replica)
    flag = torch.zeros(1)
    for schedule in schedules:
        engine = StageEngine(method, opt, sched, layout, rank, groups, schedule)
        for _ in range(2):  # warm-up
            engine.feed(views, None)
        engine.drain()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.feed(views, None)
            dist.all_reduce(flag)  # the trainer's per-step stop agreement
        engine.drain()
        dist.barrier()
        result[schedule] = (time.perf_counter() - t0) / steps
    out[rank] = result
    dist.destroy_process_group()


def time_ranks(cfg: Config, seed: int, batch: int, steps: int, K: int, threads: int) -> dict:
    os.environ["LOCO_BENCH_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        out = manager.dict()
        args = (K, cfg, seed, batch, steps, ["sync", "pipelined"], f"{tmp}/init", out)
        mp.spawn(_rank_worker, args=args, nprocs=K, join=True)
        res = dict(out)
    return {
        "sync_s": max(r["sync"] for r in res.values()),
        "pipelined_s": max(r["pipelined"] for r in res.values()),
        "bandwidth": res[0]["bandwidth"],
    }


def _opt_slots(cfg: Config) -> int:
    """Optimizer tensors per parameter: AdamW keeps two moments, SGD and LARS one momentum."""
    return 2 if "adam" in cfg.optim.name else 1


def flops_prediction(spec: str, cfg: Config, images: int) -> list[dict]:
    """Predicted speed-up of greedy and loco, both schedules, from FLOPs (``spec``:
    BACKBONE:SIZE:SPLIT, the split as ``model.split`` takes it), and per-device memory at
    ``images`` x 2 views per replica, fp32."""
    try:
        backbone, size, split = spec.split(":", 2)
        size_i = int(size)
    except ValueError:
        raise LocoError(
            f"--flops-model {spec!r}: use BACKBONE:SIZE:SPLIT, e.g. resnet50:224:stages or "
            "resnet50:224:balanced:4:flops"
        ) from None
    model_cfg = Config()
    model_cfg.model.backbone = backbone
    model_cfg.model.split = int(split) if split.isdigit() else split
    if split.startswith("["):
        import yaml

        model_cfg.model.split = yaml.safe_load(split)
    model_cfg.data.image_size = size_i
    model_cfg.decoder = cfg.decoder
    model_cfg.optim = cfg.optim
    input_bytes = 2 * images * 3 * size_i * size_i * 4
    rows = []
    for name in ("greedy", "loco"):
        model_cfg.method.name = name
        torch.manual_seed(0)
        method = build_method(build_backbone(model_cfg.model, size_i), model_cfg)
        mods, heads = module_and_head_flops(method, size_i)
        costs = flop_costs([float(m) for m in mods], [float(h) for h in heads], name == "loco")
        for c, b in zip(costs, stage_bytes(method, size_i, images), strict=True):
            c.saved_bytes, c.head_saved_bytes = b["saved_bytes"], b["head_saved_bytes"]
            c.out_bytes, c.param_bytes = b["out_bytes"], b["param_bytes"]
        total = sum(mods) + sum(heads)
        shares = [round(100 * (m + h) / total, 1) for m, h in zip(mods, heads, strict=True)]
        for schedule in ("sync", "pipelined"):
            p = predict(costs, name == "loco", schedule)
            rows.append(
                {
                    "backbone": backbone,
                    "image_size": size_i,
                    "split": split,
                    "cuts": method.backbone.cuts,
                    "devices": len(costs),
                    "method": name,
                    "schedule": schedule,
                    "flop_shares_pct": shares,
                    "predicted_speedup": round(p["speedup"], 2),
                    "bottleneck_stage": p["bottleneck_stage"],
                    "images_per_replica": images,
                    "memory": memory(
                        costs, name == "loco", schedule, _opt_slots(model_cfg), input_bytes
                    ),
                }
            )
    return rows


def run(args: argparse.Namespace) -> int:
    K = args.stage_parallel
    cfg = load_config(args.config, args.overrides)
    if args.backbone:
        cfg.model.backbone = args.backbone
    if args.image_size:
        cfg.data.image_size = args.image_size
    if args.split:
        from loco.bench import _splits

        cfg.model.split = _splits(args.split)[0]
    threads = args.threads or 1
    steps = max(args.steps, 3)
    names = [m for m in args.methods.split(",") if m in ("greedy", "loco", "infopro")]
    if not names:
        raise LocoError("--stage-parallel needs --methods with greedy, loco or infopro")
    if args.steps == 0:  # the FLOPs model only: nothing timed
        if not args.flops_model:
            raise LocoError("--stage-parallel with --steps 0 times nothing: add --flops-model")
        names = []
    rows = []
    for name in names:
        cfg.method.name = name
        n_modules = build_backbone(cfg.model, cfg.data.image_size).num_modules
        check_request(K, K, name, n_modules)
        seq1 = time_sequential(cfg, args.seed, args.batch, steps, threads)
        seqK = time_sequential(cfg, args.seed, args.batch, steps, threads * K)
        costs = time_phases(cfg, args.seed, args.batch, steps)
        ranks = time_ranks(cfg, args.seed, args.batch, steps, K, threads)
        feedback = name == "loco"
        img = 2 * args.batch  # images per step (two views of --batch)
        row: dict[str, Any] = {
            "method": name,
            "sequential_1proc_img_s": img / seq1,
            f"sequential_1proc_{threads * K}threads_img_s": img / seqK,
            "bandwidth_MBps": ranks["bandwidth"] / 1e6,
            "phases": [c.__dict__ for c in costs],
        }
        for schedule in ("sync", "pipelined"):
            measured = seq1 / ranks[f"{schedule}_s"]
            pred = predict(costs, feedback, schedule, ranks["bandwidth"])
            # the model's sequential time is the phases' sum: predict relative to it
            row[schedule] = {
                "img_s": img / ranks[f"{schedule}_s"],
                "speedup_vs_1thread": round(measured, 3),
                "speedup_vs_Kthreads": round(seqK / ranks[f"{schedule}_s"], 3),
                "predicted_speedup": round(pred["speedup"], 3),
                "predicted_vs_measured": round(pred["speedup"] / measured - 1, 3),
                "memory": memory(
                    costs,
                    feedback,
                    schedule,
                    _opt_slots(cfg),
                    2 * args.batch * 3 * cfg.data.image_size**2 * 4,
                ),
            }
        rows.append(row)
    result = {
        "command": command_line(),
        "backbone": cfg.model.backbone,
        "image_size": cfg.data.image_size,
        "split": cfg.model.split,
        "batch": args.batch,
        "stages": K,
        "threads_per_rank": threads,
        "load": os.getloadavg(),
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "rows": rows,
        "flops_model": [
            row for spec in args.flops_model for row in flops_prediction(spec, cfg, args.batch)
        ],
    }
    write_report(result, args.out, markdown)
    return 0


def markdown(result: dict) -> str:
    lines = _measured_markdown(result) if result["rows"] else []
    if result["flops_model"]:
        lines += [
            "",
            "FLOPs model (GPU-like cost model: time = FLOPs, backward = 2 x forward; "
            "communication free):",
            "",
            "| backbone | split (cuts) | devices | FLOP shares % | method | schedule | "
            "predicted speed-up |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in result["flops_model"]:
            lines.append(
                f"| {r['backbone']} @ {r['image_size']} | {r['split']} {r['cuts']} | "
                f"{r['devices']} | {'/'.join(str(s) for s in r['flop_shares_pct'])} | "
                f"{r['method']} | {r['schedule']} | {r['predicted_speedup']:.2f}x |"
            )
        lines += [
            "",
            "Per-device memory, MiB, fp32, {} images x 2 views per replica: weights + grads + "
            "optimizer state | saved activations (batches kept) | queued input images:".format(
                result["flops_model"][0]["images_per_replica"]
            ),
            "",
        ]
        for r in result["flops_model"]:
            cells = "; ".join(_memory_cell(m) for m in r["memory"])
            lines.append(f"* {r['backbone']} {r['split']}, {r['method']} {r['schedule']}: {cells}")
    return "\n".join(lines).strip("\n")


def _memory_cell(m: dict) -> str:
    cell = (
        f"S{m['stage']} {m['weights_bytes'] / 2**20:.0f} | "
        f"{m['activation_bytes'] / 2**20:.0f} ({m['batches_kept']})"
    )
    if m.get("queued_batches"):
        cell += f" | {m['queued_bytes'] / 2**20:.0f} ({m['queued_batches']})"
    return cell


def _measured_markdown(result: dict) -> list[str]:
    t = result["threads_per_rank"]
    K = result["stages"]
    lines = [
        f"{result['backbone']} @ {result['image_size']} px, split {result['split']}, batch "
        f"{result['batch']} x 2 views; {K} ranks x {t} thread vs one process; load "
        f"{' '.join(f'{x:.1f}' for x in result['load'])}",
        "",
        f"| method | 1 proc x {t} thr img/s | 1 proc x {t * K} thr | sync img/s (x vs {t} thr, vs {t * K} thr, model) "
        f"| pipelined img/s (x vs {t} thr, vs {t * K} thr, model) |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        cells = [
            r["method"],
            f"{r['sequential_1proc_img_s']:.1f}",
            f"{r[f'sequential_1proc_{t * K}threads_img_s']:.1f}",
        ]
        for s in ("sync", "pipelined"):
            x = r[s]
            cells.append(
                f"{x['img_s']:.1f} ({x['speedup_vs_1thread']:.2f}x, {x['speedup_vs_Kthreads']:.2f}x, "
                f"model {x['predicted_speedup']:.2f}x, {100 * x['predicted_vs_measured']:+.0f}%)"
            )
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per-device memory (model: weights + grads + optimizer state, saved activations):",
        "",
    ]
    for r in result["rows"]:
        for s in ("sync", "pipelined"):
            cells = "; ".join(_memory_cell(m) for m in r[s]["memory"])
            lines.append(f"* {r['method']} {s}: {cells}")
    return lines
