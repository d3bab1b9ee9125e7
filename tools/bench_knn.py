"""Queries per second of the kNN evaluation backends, as JSON.

    python tools/bench_knn.py                          # 100k x 512 bank, 10k queries
    python tools/bench_knn.py --imagenet --out knn.json  # 1.28M x 2048 bank, 50k queries

The bank is a float16 memmap on disk (as the feature cache writes it), so the numbers
include reading it in chunks. Backends: faiss-cpu always; the torch matmul path and
faiss-gpu when a GPU (and faiss-gpu) is there; ``--backends`` picks others (``torch``
runs on the CPU without CUDA). For each: index build seconds, search-only and full
evaluation (search + weighted votes for the DINO k) queries per second.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from loco.eval.knn import FeatureBank, _has_faiss_gpu, knn_evaluate


def make_bank(
    path: Path, n: int, dim: int, classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Clustered random features (so kNN accuracy is meaningful), written in chunks."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)).astype(np.float32)
    labels = rng.integers(0, classes, n)
    bank = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    for a in range(0, n, 65536):
        y = labels[a : a + 65536]
        noise = rng.standard_normal((len(y), dim), dtype=np.float32) * 3
        bank[a : a + 65536] = centers[y] + noise
    bank.flush()
    return np.load(path, mmap_mode="r"), labels, centers


def bench(backend: str, bank, labels, queries, qlabels, k: int, classes: int) -> dict:
    t0 = time.perf_counter()
    index = FeatureBank(bank, backend)
    sync(backend)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    for a in range(0, len(queries), 4096):
        index.search(queries[a : a + 4096], k)
    sync(backend)
    search = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = knn_evaluate(bank, labels, queries, qlabels, "dino", num_classes=classes, bank=index)
    full = time.perf_counter() - t0
    return {
        "backend": backend,
        "device": str(index.device) if backend == "torch" else backend.split("-")[1],
        "build_s": round(build, 3),
        "search_s": round(search, 3),
        "search_queries_per_s": round(len(queries) / search, 1),
        "eval_s": round(full, 3),
        "eval_queries_per_s": round(len(queries) / full, 1),
        "top1_k20": round(next(r.top1 for r in results if r.k == 20), 2),
    }


def sync(backend: str) -> None:
    if backend != "faiss-cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--n-query", type=int, default=10_000)
    p.add_argument("--k", type=int, default=200, help="neighbours searched (the largest DINO k)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--imagenet", action="store_true", help="1,281,167 x 2048 bank, 50,000 queries")
    p.add_argument(
        "--backends", help="comma-separated: faiss-cpu, torch, faiss-gpu (default: all available)"
    )
    p.add_argument("--threads", type=int, help="CPU threads for faiss and torch")
    p.add_argument("--tmp", help="folder for the bank memmap (default: a temp dir)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    if args.imagenet:
        args.n_train, args.dim, args.n_query = 1_281_167, 2048, 50_000
    if args.threads:
        import faiss

        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    if args.backends:
        backends = args.backends.split(",")
    else:
        backends = ["faiss-cpu"]
        if torch.cuda.is_available():
            backends.append("torch")
        if _has_faiss_gpu():
            backends.append("faiss-gpu")
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        path = Path(tmp) / "bank.npy"
        bank, labels, centers = make_bank(path, args.n_train, args.dim, args.classes, 0)
        rng = np.random.default_rng(1)
        qlabels = rng.integers(0, args.classes, args.n_query)
        noise = rng.standard_normal((args.n_query, args.dim), dtype=np.float32)
        queries = centers[qlabels] + 3 * noise
        runs = [bench(b, bank, labels, queries, qlabels, args.k, args.classes) for b in backends]
    report = {
        "n_train": args.n_train,
        "dim": args.dim,
        "n_query": args.n_query,
        "k": args.k,
        "host": platform.node(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "results": runs,
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
