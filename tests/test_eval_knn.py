"""Weighted kNN against a brute-force numpy implementation written here from the definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loco.errors import LocoError
from loco.eval import knn as knn_mod
from loco.eval.knn import PROTOCOLS, FeatureBank, knn_evaluate

BACKENDS = ["faiss-cpu", "torch"]  # torch runs on the CPU here; same code path as on CUDA


def brute_force(train, train_labels, val, ks, T, C):
    """Top-5 predictions per k: cosine similarity in float64, neighbours ordered by
    (similarity desc, index asc), votes exp(sim / T), classes by (votes desc, index asc)."""
    t = train / np.linalg.norm(train, axis=1, keepdims=True)
    q = val / np.linalg.norm(val, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ t.astype(np.float64).T
    out = {}
    for k in ks:
        preds = []
        for row in sims:
            order = np.lexsort((np.arange(len(row)), -row))[:k]
            votes = np.zeros(C)
            for j in order:
                votes[train_labels[j]] += np.exp(row[j] / T)
            preds.append(np.argsort(-votes, kind="stable")[: min(5, C)])
        out[k] = np.array(preds)
    return out


def accuracies(preds, labels):
    return 100 * np.mean(preds[:, 0] == labels), 100 * np.mean((preds == labels[:, None]).any(1))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    C, D = 12, 16
    centers = rng.normal(size=(C, D))
    y_train = rng.integers(0, C, 300)
    y_val = rng.integers(0, C, 90)
    train = (centers[y_train] + 2.5 * rng.normal(size=(300, D))).astype(np.float32)
    val = (centers[y_val] + 2.5 * rng.normal(size=(90, D))).astype(np.float32)
    return train, y_train, val, y_val, C


@pytest.mark.parametrize("backend", BACKENDS)
def test_dino_protocol_matches_brute_force(data, backend, monkeypatch):
    train, y_train, val, y_val, C = data
    searches = []
    original = FeatureBank.search

    def spy(self, queries, k):
        searches.append(k)
        return original(self, queries, k)

    monkeypatch.setattr(FeatureBank, "search", spy)
    results, preds = knn_evaluate(
        train, y_train, val, y_val, "dino", backend=backend, return_predictions=True
    )
    assert searches == [200]  # every k from one top-200 search
    want = brute_force(train, y_train, val, PROTOCOLS["dino"].ks, 0.07, C)
    assert [r.k for r in results] == [10, 20, 100, 200]
    for r in results:
        np.testing.assert_array_equal(preds[r.k], want[r.k])
        top1, top5 = accuracies(want[r.k], y_val)
        assert r.top1 == pytest.approx(top1) and r.top5 == pytest.approx(top5)
        assert r.protocol == "knn-dino" and r.temperature == 0.07
        assert r.primary == (r.k == 20)
    assert 0 < results[1].top1 < results[1].top5 < 100  # top-5 is informative on this data


def test_instdisc_preset_and_chunked_memmap_bank(data, tmp_path):
    train, y_train, val, y_val, C = data
    np.save(tmp_path / "bank.npy", train.astype(np.float16))
    bank_mm = np.load(tmp_path / "bank.npy", mmap_mode="r")
    bank = FeatureBank(bank_mm, "faiss-cpu", chunk_size=64)  # added in 5 normalised chunks
    (r,), preds = knn_evaluate(
        bank_mm, y_train, val, y_val, "instdisc", bank=bank, query_chunk=32, return_predictions=True
    )
    want = brute_force(bank_mm.astype(np.float32), y_train, val, [200], 0.1, C)
    np.testing.assert_array_equal(preds[200], want[200])
    assert (r.protocol, r.k, r.temperature, r.primary) == ("knn-instdisc", 200, 0.1, True)


def test_custom_k_and_temperature_are_named(data):
    train, y_train, val, y_val, C = data
    results = knn_evaluate(train, y_train, val, y_val, "dino", ks=[5, 1], temperature=0.5)
    assert [r.k for r in results] == [1, 5]
    assert {r.protocol for r in results} == {"knn-dino-custom"}
    want = brute_force(train, y_train, val, [1, 5], 0.5, C)
    assert results[0].top1 == pytest.approx(accuracies(want[1], y_val)[0])
    subset = knn_evaluate(train, y_train, val, y_val, "dino", ks=[20, 10])
    assert [(r.protocol, r.k, r.primary) for r in subset] == [
        ("knn-dino", 10, False),
        ("knn-dino", 20, True),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_resolve_to_lower_class(backend):
    # query e0; two identical neighbours (labels 2 and 1) tie in similarity and in votes
    train = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [-1, 0, 0]], dtype=np.float32)
    labels = np.array([2, 1, 0, 3])
    val = np.array([[2, 0, 0]], dtype=np.float32)
    _, preds = knn_evaluate(
        train, labels, val, np.array([1]), ks=[2, 3], backend=backend, return_predictions=True
    )
    np.testing.assert_array_equal(preds[2][0], [1, 2, 0, 3])
    np.testing.assert_array_equal(preds[3][0], [1, 2, 0, 3])  # e1 (sim 0) adds class 0 third
    want = brute_force(train, labels, val, [2, 3], 0.07, 4)
    np.testing.assert_array_equal(preds[2], want[2])


def test_fewer_than_five_classes_top5_is_top_c():
    rng = np.random.default_rng(1)
    train, val = rng.normal(size=(40, 4)), rng.normal(size=(10, 4))
    labels, y = rng.integers(0, 3, 40), rng.integers(0, 3, 10)
    (r,) = knn_evaluate(train, labels, val, y, ks=[10], backend="faiss-cpu")
    assert r.top5 == 100.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_larger_than_bank_is_a_clear_error(data, backend):
    train, y_train, val, y_val, _ = data
    with pytest.raises(LocoError, match=r"k=200 exceeds the 50 training features"):
        knn_evaluate(train[:50], y_train[:50], val, y_val, "dino", backend=backend)
    with pytest.raises(LocoError, match="k must be >= 1"):
        knn_evaluate(train, y_train, val, y_val, ks=[0, 5], backend=backend)
    bank = FeatureBank(train[:50], backend)
    with pytest.raises(LocoError, match="k=51"):
        bank.search(val, 51)


def test_backend_resolution(monkeypatch):
    assert knn_mod.resolve_backend("faiss-cpu") == "faiss-cpu"
    if not torch.cuda.is_available():  # this machine, for real: faiss on the CPU
        assert knn_mod.resolve_backend("auto") == "faiss-cpu"
    # each branch of "auto"; the GPU's presence is faked (no GPU here), the choice is real
    for faiss_gpu, cuda, expected in [
        (True, True, "faiss-gpu"),
        (False, True, "torch"),
        (False, False, "faiss-cpu"),
    ]:
        monkeypatch.setattr(knn_mod, "_has_faiss_gpu", lambda v=faiss_gpu: v)
        monkeypatch.setattr(torch.cuda, "is_available", lambda v=cuda: v)
        assert knn_mod.resolve_backend("auto") == expected
    monkeypatch.setattr(knn_mod, "_has_faiss_gpu", lambda: False)
    with pytest.raises(LocoError, match="faiss-gpu needs faiss-gpu"):
        knn_mod.resolve_backend("faiss-gpu")
    with pytest.raises(LocoError, match="unknown"):
        knn_mod.resolve_backend("annoy")
