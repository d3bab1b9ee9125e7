"""Weighted k-nearest-neighbour classification on frozen features.

Protocol (Wu et al. 2018, InstDisc; as used by DINO, Caron et al. 2021): features are
L2-normalised; each query's k most cosine-similar training features vote for their
labels with weight ``exp(sim / T)``; the classes with the largest summed weights are the
top-1 / top-5 predictions. Two named protocols:

* ``dino``: T = 0.07, k in {10, 20, 100, 200} (20 is the headline number);
* ``instdisc``: T = 0.1, k = 200 (InstDisc, and lightly's kNN benchmark).

All k come from one top-k search with the largest k. Ties are resolved deterministically:
the returned neighbours are ordered by (similarity descending, training index), and among
classes with equal votes the lower class index ranks first.

Search backends: a faiss GPU index when faiss-gpu sees a GPU, else an exact chunked
``torch`` matmul + top-k on CUDA when there is one, else faiss ``IndexFlatIP`` on the CPU.
The training bank is read in chunks (a memmap is never copied whole), normalised, and
added to the index; queries are searched in chunks. An ImageNet bank (1.28M x 2048) costs
its float32 copy inside the index once (10.5 GB) and nothing else.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from loco.errors import LocoError

log = logging.getLogger("loco.eval.knn")
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # one INFO line per CPU variant tried

BACKENDS = ("auto", "faiss-cpu", "faiss-gpu", "torch")


@dataclass(frozen=True)
class KNNProtocol:
    name: str  # as results name it
    ks: tuple[int, ...]
    temperature: float
    primary_k: int  # the k a paper reports
    reference: str


PROTOCOLS: dict[str, KNNProtocol] = {
    "dino": KNNProtocol(
        "knn-dino", (10, 20, 100, 200), 0.07, 20, "Caron et al. 2021 (DINO), weighted kNN"
    ),
    "instdisc": KNNProtocol(
        "knn-instdisc", (200,), 0.1, 200, "Wu et al. 2018 (InstDisc); lightly's kNN"
    ),
}


def get_protocol(
    name: str | KNNProtocol, ks: Sequence[int] | None = None, temperature: float | None = None
) -> KNNProtocol:
    """A named protocol, optionally restricted to some of its k; other k or T make it
    ``<name>-custom``."""
    if isinstance(name, KNNProtocol):
        proto = name
    else:
        if name not in PROTOCOLS:
            raise LocoError(f"kNN protocol '{name}' unknown; use one of {', '.join(PROTOCOLS)}")
        proto = PROTOCOLS[name]
    if ks is None and temperature is None:
        return proto
    ks = tuple(sorted(set(int(k) for k in ks))) if ks else proto.ks
    temperature = proto.temperature if temperature is None else float(temperature)
    primary = proto.primary_k if proto.primary_k in ks else ks[0]
    same = set(ks) <= set(proto.ks) and temperature == proto.temperature  # a subset of its k
    name = proto.name if same else f"{proto.name}-custom"
    return KNNProtocol(name, ks, temperature, primary, proto.reference)


@dataclass(frozen=True)
class KNNResult:
    protocol: str
    k: int
    temperature: float
    top1: float  # percent
    top5: float
    primary: bool


def _has_faiss_gpu() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise LocoError(f"kNN backend '{backend}' unknown; use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if _has_faiss_gpu():
            return "faiss-gpu"
        return "torch" if torch.cuda.is_available() else "faiss-cpu"
    if backend == "faiss-gpu" and not _has_faiss_gpu():
        raise LocoError(
            "kNN backend faiss-gpu needs faiss-gpu and a visible GPU; use --backend auto"
        )
    return backend


def _normalized(x: np.ndarray | torch.Tensor) -> np.ndarray:
    x = np.array(x.cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float32, copy=True)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


class FeatureBank:
    """L2-normalised training features in a search index, built chunk by chunk.

    ``features`` may be a memmap [N, D] of any float dtype; ``search`` returns the top-k
    cosine similarities and indices, ordered by (similarity desc, index asc).
    """

    def __init__(
        self,
        features: np.ndarray,
        backend: str = "auto",
        chunk_size: int = 65536,
        device: str | torch.device | None = None,
    ) -> None:
        if features.ndim != 2 or len(features) == 0:
            raise LocoError(
                f"kNN needs a non-empty [N, D] training bank, got shape {tuple(features.shape)}"
            )
        self.backend = resolve_backend(backend)
        self.n, self.dim = int(features.shape[0]), int(features.shape[1])
        chunks = range(0, self.n, chunk_size)
        if self.backend == "torch":
            self.device = (
                torch.device(device)
                if device
                else torch.device("cuda" if torch.cuda.is_available() else "cpu")
            )
            dtype = torch.float32
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                if self.n * self.dim * 4 > 0.6 * free:
                    log.warning(
                        "kNN bank %dx%d does not fit in float32 on the GPU; using float16",
                        self.n,
                        self.dim,
                    )
                    dtype = torch.float16
            self.bank = torch.empty(self.n, self.dim, dtype=dtype, device=self.device)
            for a in chunks:
                self.bank[a : a + chunk_size] = torch.from_numpy(
                    _normalized(features[a : a + chunk_size])
                ).to(self.device)
            return
        import faiss

        if self.backend == "faiss-gpu":
            self._res = faiss.StandardGpuResources()
            self.index = faiss.GpuIndexFlatIP(self._res, self.dim)
        else:
            self.index = faiss.IndexFlatIP(self.dim)
        for a in chunks:
            self.index.add(_normalized(features[a : a + chunk_size]))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (similarities [Q, k] float32, indices [Q, k] int64) of L2-normalised queries."""
        if not 1 <= k <= self.n:
            raise LocoError(
                f"k={k} but the training bank holds {self.n} features; use k <= {self.n}"
            )
        if self.backend == "faiss-gpu" and k > 2048:
            raise LocoError(f"faiss-gpu searches at most k=2048, got {k}; use --backend torch")
        q = _normalized(queries)
        if q.shape[1] != self.dim:
            raise LocoError(
                f"query features have {q.shape[1]} dims, the training bank {self.dim}; same stage?"
            )
        if self.backend == "torch":
            sims, idx = self._torch_search(q, k)
        else:
            sims, idx = self.index.search(q, k)
        order = np.lexsort((idx, -sims), axis=-1)  # deterministic order among equal similarities
        return np.take_along_axis(sims, order, 1), np.take_along_axis(idx, order, 1).astype(
            np.int64
        )

    def _torch_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        # similarity blocks of at most ~256M entries (1 GiB in float32)
        step = max(1, min(len(q), (1 << 28) // self.n))
        sims, idx = [], []
        for a in range(0, len(q), step):
            qa = torch.from_numpy(q[a : a + step]).to(self.device, self.bank.dtype)
            s, i = (qa @ self.bank.T).float().topk(k, dim=1)
            sims.append(s.cpu().numpy())
            idx.append(i.cpu().numpy())
        return np.concatenate(sims), np.concatenate(idx)


def weighted_votes(
    sims: np.ndarray,
    neighbour_labels: np.ndarray,
    ks: Sequence[int],
    temperature: float,
    num_classes: int,
) -> dict[int, np.ndarray]:
    """Top-5 (or top-C) predicted classes [Q, min(5, C)] for each k, from one sorted top-k list.

    Each neighbour adds ``exp(sim / T)`` to its class; votes accumulate from the smallest
    k to the largest, so every k costs only its extra neighbours.
    """
    w = torch.from_numpy(np.exp(sims.astype(np.float64) / temperature))
    lab = torch.from_numpy(neighbour_labels.astype(np.int64))
    scores = torch.zeros(len(sims), num_classes, dtype=torch.float64)
    out, prev = {}, 0
    for k in sorted(ks):
        scores.scatter_add_(1, lab[:, prev:k], w[:, prev:k])
        prev = k
        order = torch.sort(
            scores, dim=1, descending=True, stable=True
        ).indices  # ties: lower class first
        out[k] = order[:, : min(5, num_classes)].numpy()
    return out


def knn_evaluate(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    protocol: str | KNNProtocol = "dino",
    *,
    ks: Sequence[int] | None = None,
    temperature: float | None = None,
    num_classes: int | None = None,
    backend: str = "auto",
    device: str | torch.device | None = None,
    chunk_size: int = 65536,
    query_chunk: int = 4096,
    bank: FeatureBank | None = None,
    progress: bool = False,
    return_predictions: bool = False,
) -> list[KNNResult] | tuple[list[KNNResult], dict[int, np.ndarray]]:
    """Weighted kNN top-1/top-5 (percent) for each k of ``protocol`` (all k in one search).

    ``bank`` reuses an index built from ``train_features`` (several protocols, one build).
    With ``return_predictions`` also returns each k's top-5 predictions [Q, min(5, C)].
    """
    proto = get_protocol(protocol, ks, temperature)
    train_labels = np.asarray(train_labels, dtype=np.int64)
    val_labels = np.asarray(val_labels, dtype=np.int64)
    n = len(train_labels)
    if len(train_features) != n or len(val_features) != len(val_labels):
        raise LocoError("kNN: features and labels differ in length")
    if min(proto.ks) < 1:
        raise LocoError(f"kNN k must be >= 1, got {list(proto.ks)}")
    if max(proto.ks) > n:
        raise LocoError(
            f"kNN k={max(proto.ks)} exceeds the {n} training features; use smaller --k "
            "or more training images (--train-per-class)"
        )
    if len(val_labels) == 0:
        raise LocoError("kNN: no validation features")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    bank = bank or FeatureBank(train_features, backend, chunk_size, device)
    kmax = max(proto.ks)
    correct1 = dict.fromkeys(proto.ks, 0)
    correct5 = dict.fromkeys(proto.ks, 0)
    preds: dict[int, list[np.ndarray]] = {k: [] for k in proto.ks}
    chunks = range(0, len(val_labels), query_chunk)
    for a in tqdm(
        chunks, desc=f"{proto.name} ({bank.backend})", disable=not progress, file=sys.stderr
    ):
        sims, idx = bank.search(val_features[a : a + query_chunk], kmax)
        votes = weighted_votes(sims, train_labels[idx], proto.ks, proto.temperature, num_classes)
        y = val_labels[a : a + query_chunk, None]
        for k, top in votes.items():
            correct1[k] += int((top[:, 0:1] == y).sum())
            correct5[k] += int((top == y).any(axis=1).sum())
            if return_predictions:
                preds[k].append(top)
    total = len(val_labels)
    results = [
        KNNResult(
            proto.name,
            k,
            proto.temperature,
            100.0 * correct1[k] / total,
            100.0 * correct5[k] / total,
            k == proto.primary_k,
        )
        for k in proto.ks
    ]
    if return_predictions:
        return results, {k: np.concatenate(v) for k, v in preds.items()}
    return results
