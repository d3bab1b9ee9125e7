"""Run every CUDA path of loco once and say PASS / FAIL / SKIP for each (tools/gpu_check.sh).

The CUDA code (bf16 autocast, channels_last, the nvJPEG tensor pipeline, the CUDA memory
bench, SyncBN) cannot run on the CPU-only CI; this script is what runs it whenever a GPU
machine is lent. Sized for one H200 in under 5 minutes, each check once. Without CUDA every
check is SKIP and the exit status is 0; with a FAIL it is 1. A JSON summary is printed last
and written to ``--out``.

    PYTHONPATH=. python tools/gpu_check.py --out gpu_check.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
BENCH_TIMEOUT_S = 170


class Skip(Exception):
    """The check cannot run here (no CUDA, no faiss, one GPU, no shared data)."""


def cuda() -> torch.device:
    if not torch.cuda.is_available():
        raise Skip("no CUDA device")
    return torch.device("cuda")


def small_cfg(method: str, backbone: str = "resnet18", conv_block: bool = True):
    from loco.config import Config

    cfg = Config()
    cfg.model.backbone = backbone
    cfg.data.image_size = 32
    cfg.method.name = method
    cfg.method.gather_negatives = False
    cfg.decoder.conv_block = conv_block and method != "e2e"
    cfg.decoder.hidden_dim = 256
    return cfg


def build(cfg, device: torch.device, channels_last: bool = False):
    from loco.methods import build_method
    from loco.models.backbone import build_backbone

    torch.manual_seed(0)
    method = build_method(build_backbone(cfg.model, cfg.data.image_size), cfg).to(device)
    if channels_last:
        method = method.to(memory_format=torch.channels_last)
    return method.train()


def views(batch: int, size: int, device: torch.device, channels_last: bool = False):
    g = torch.Generator().manual_seed(1)
    out = [torch.randn(batch, 3, size, size, generator=g).to(device) for _ in range(2)]
    return [v.contiguous(memory_format=torch.channels_last) for v in out] if channels_last else out


def grads(method: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float() for n, p in method.named_parameters() if p.grad is not None}


# -- the checks --------------------------------------------------------------------------------
def bf16_step(name: str) -> Callable[[], str]:
    def check() -> str:
        device = cuda()
        method = build(small_cfg(name), device, channels_last=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = method.training_step(views(32, 32, device, channels_last=True))
        bad = [
            k for k, v in out.losses.items() if not torch.isfinite(v) or v.dtype != torch.float32
        ]
        assert not bad, f"losses not finite fp32: {bad}"
        g = grads(method)
        missing = [n for n, _ in method.backbone.named_parameters() if f"backbone.{n}" not in g]
        assert not missing, f"backbone parameters without gradient: {missing[:3]}"
        nonfinite = [n for n, t in g.items() if not torch.isfinite(t).all()]
        assert not nonfinite, f"non-finite gradients: {nonfinite[:3]}"
        losses = ", ".join(f"{k}={v.item():.3f}" for k, v in out.losses.items())
        return f"{losses}; {len(g)} gradients finite"

    return check


def fp32_logits() -> str:
    """Under CUDA bf16 autocast, NT-Xent and SupCon equal their fp32 values (item 2)."""
    from loco.losses import nt_xent, supcon

    device = cuda()
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(256, 128, generator=g).to(device)
    labels = torch.randint(0, 10, (128,), generator=g).to(device)
    worst = []
    for fn in (lambda z: nt_xent(z, 0.1, gather=False), lambda z: supcon(z, labels, 0.1, False)):
        results = []
        for enabled in (False, True):
            z = z0.clone().requires_grad_(True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled):
                loss = fn(z)
            loss.backward()
            results.append((loss.detach(), z.grad))
        (l32, g32), (l16, g16) = results
        dl, dg = (l16 - l32).abs().item(), (g16 - g32).abs().max().item()
        assert dl <= 1e-5 and dg <= 1e-5, f"loss differs by {dl:.2e}, gradient by {dg:.2e}"
        worst.append(max(dl, dg))
    return f"NT-Xent and SupCon under bf16 autocast = fp32 (max diff {max(worst):.1e})"


def channels_last() -> str:
    """ResNet-50 LoCo step, bf16: channels_last gives the step of the default layout."""
    device = cuda()
    cfg = small_cfg("loco", backbone="resnet50")
    cfg.data.image_size = 224
    cfg.model.small_image = "false"
    results = []
    for cl in (False, True):
        method = build(cfg, device, channels_last=cl)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = method.training_step(views(8, 224, device, channels_last=cl))
        if cl:
            w = method.backbone.body.conv1.weight
            assert w.is_contiguous(memory_format=torch.channels_last), "weights not channels_last"
        results.append((out.losses, grads(method)))
    (l0, g0), (l1, g1) = results
    for k in l0:
        assert abs(l0[k].item() - l1[k].item()) <= 2e-2 * abs(l0[k].item()), f"{k}: {l0[k]} {l1[k]}"
    cos = min(
        torch.nn.functional.cosine_similarity(g0[n].flatten(), g1[n].flatten(), dim=0).item()
        for n in g0
        if g0[n].abs().sum() > 0
    )
    assert cos > 0.97, f"gradient cosine {cos:.3f}"
    return f"losses within 2% of the default layout, min gradient cosine {cos:.3f}"


def tensor_pipeline() -> str:
    """nvJPEG decode + batched augmentation on the GPU vs the PIL path: the statistics agree."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from loco.config import DataConfig
    from loco.data import gpu_augment as G
    from loco.data.augment import SimCLRParams, SimCLRTransform
    from loco.data.folder import load_rgb
    from loco.data.shipped import find_shared_data
    from loco.errors import LocoError

    device = cuda()
    try:
        tar = find_shared_data() / "clothing" / "clothing-small.tar"
    except LocoError as exc:
        raise Skip(f"no shared data: {exc}") from None
    if not tar.exists():
        raise Skip(f"{tar} is absent")
    import io
    import tarfile

    blobs: list[bytes] = []
    with tarfile.open(tar) as archive:
        for member in archive:
            if member.name.endswith(".jpg") and "/val/" in member.name:
                blobs.append(archive.extractfile(member).read())  # type: ignore[union-attr]
                if len(blobs) == 256:
                    break
    data = DataConfig(image_size=64, blur_prob=0.5, solarize_prob=0.2)
    encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    ours = torch.cat(G.BatchedSimCLR(SimCLRParams.from_config(data))(images, range(len(images))))
    assert ours.device.type == device.type, "views not on the GPU"
    transform = SimCLRTransform(data)
    torch.manual_seed(0)
    pil = torch.stack([transform.view(load_rgb(io.BytesIO(b))) for b in blobs for _ in range(2)])  # type: ignore[arg-type]
    ours = ours.cpu()
    diffs = []
    for stat in (lambda t: t.mean(dim=(0, 2, 3)), lambda t: t.std(dim=(0, 2, 3))):
        d = (stat(ours) - stat(pil)).abs().max().item()
        assert d <= 0.08, f"channel statistics differ by {d:.3f}"
        diffs.append(d)
    return f"{len(blobs)} photos x 2 views: channel mean/std within {max(diffs):.3f} of PIL"


def max_batch(out_dir: Path) -> Callable[[], str]:
    def check() -> str:
        cuda()
        out = out_dir / "gpu_check_bench.json"
        cmd = [
            sys.executable,
            "-c",
            "import sys; from loco.cli import main; sys.exit(main(sys.argv[1:]))",
            "bench",
            "--backbone",
            "resnet50",
            "--image-size",
            "224",
            "--batch",
            "8",
            "--methods",
            "e2e,greedy,loco",
            "--steps",
            "0",
            "--memory-budget",
            "0",
            "--device",
            "cuda",
            "--max-batch",
            "--out",
            str(out),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"loco bench --max-batch ran past {BENCH_TIMEOUT_S} s") from None
        assert proc.returncode == 0, proc.stderr.strip().splitlines()[-1:]
        rows = json.loads(out.read_text())["rows"]
        parts = []
        for r in rows:
            assert r["cuda_peak"] and r["cuda_max_batch"], f"{r['method']}: no CUDA figures"
            parts.append(
                f"{r['method']} peak {r['cuda_peak'] / 2**20:.0f} MiB @8, max batch {r['cuda_max_batch']}"
            )
        return "; ".join(parts)

    return check


def syncbn_decoders() -> str:
    """1-process NCCL group: every BatchNorm of the method (decoders too) is SyncBatchNorm on
    CUDA, and its step equals the plain-BN step (one process: the same statistics)."""
    from loco.models.sync_bn import sync_batchnorm

    device = cuda()
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl", init_method=f"file://{tmp}/init", rank=0, world_size=1)
        try:
            plain = build(small_cfg("greedy"), device)
            synced = sync_batchnorm(copy.deepcopy(plain), device)
            norms = [m for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            unsynced = [type(m).__name__ for m in norms if "Sync" not in type(m).__name__]
            assert not unsynced, f"not converted: {unsynced[:3]}"
            in_heads = sum(isinstance(m, nn.SyncBatchNorm) for m in synced.heads.modules())
            x = views(16, 32, device)
            lp, ls = plain.training_step(x).losses, synced.training_step(x).losses
            gp, gs = grads(plain), grads(synced)
            dl = max(abs(lp[k].item() - ls[k].item()) for k in lp)
            dg = max((gp[n] - gs[n]).abs().max().item() for n in gp)
            assert dl <= 1e-5 and dg <= 1e-4, f"loss differs by {dl:.1e}, gradients by {dg:.1e}"
        finally:
            dist.destroy_process_group()
    return f"{len(norms)} BatchNorms synced ({in_heads} in decoders); step = plain BN step"


def faiss_gpu() -> str:
    cuda()
    try:
        import faiss
    except ImportError:
        raise Skip("faiss is not installed") from None
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        raise Skip("faiss has no GPU support here")
    import numpy as np

    x = np.random.default_rng(0).standard_normal((2000, 64)).astype("float32")
    cpu = faiss.IndexFlatIP(64)
    cpu.add(x)
    gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu)
    _, i_cpu = cpu.search(x[:100], 5)
    _, i_gpu = gpu.search(x[:100], 5)
    assert (i_cpu == i_gpu).mean() > 0.99
    return "GPU flat index search = CPU search"


def _nccl_worker(rank: int, init: str) -> None:
    dist.init_process_group("nccl", init_method=init, rank=rank, world_size=2)
    torch.cuda.set_device(rank)
    t = torch.full((4,), float(rank + 1), device="cuda")
    dist.all_reduce(t)
    assert torch.allclose(t.cpu(), torch.full((4,), 3.0))
    dist.destroy_process_group()


def nccl_2gpu() -> str:
    cuda()
    if torch.cuda.device_count() < 2:
        raise Skip(f"{torch.cuda.device_count()} GPU(s); needs 2")
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_nccl_worker, args=(f"file://{tmp}/init",), nprocs=2, join=True)
    return "all_reduce over 2 GPUs"


# -- driver ------------------------------------------------------------------------------------
def checks(out_dir: Path) -> list[tuple[str, Callable[[], str]]]:
    try:
        from loco.methods import METHODS

        names = sorted(METHODS)
    except ImportError:  # reported by each check's own import
        names = ["e2e", "greedy", "infopro", "loco"]
    return [
        *((f"bf16_step[{name}]", bf16_step(name)) for name in names),
        ("fp32_logits", fp32_logits),
        ("channels_last", channels_last),
        ("tensor_pipeline", tensor_pipeline),
        ("max_batch", max_batch(out_dir)),
        ("syncbn_decoders", syncbn_decoders),
        ("faiss_gpu", faiss_gpu),
        ("nccl_2gpu", nccl_2gpu),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check.json", help="JSON summary")
    parser.add_argument("--only", default="", help="comma list of check names (default: all)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    only = {c.strip() for c in args.only.split(",") if c.strip()}
    results: list[dict[str, Any]] = []
    for name, check in checks(out.parent):
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            status, detail = "PASS", check()
        except Skip as exc:
            status, detail = "SKIP", str(exc)
        except Exception as exc:  # a failed check must not stop the others
            status, detail = "FAIL", f"{type(exc).__name__}: {exc}".splitlines()[0]
            traceback.print_exc(file=sys.stderr)
        seconds = time.perf_counter() - t0
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(f"{status:4s} {name}: {detail} ({seconds:.1f} s)", flush=True)
        results.append({"check": name, "status": status, "detail": detail, "seconds": seconds})
    summary = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "passed": all(r["status"] != "FAIL" for r in results),
        "counts": {s: sum(r["status"] == s for r in results) for s in ("PASS", "FAIL", "SKIP")},
        "checks": results,
    }
    text = json.dumps(summary, indent=2)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, out)
    print(text)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
