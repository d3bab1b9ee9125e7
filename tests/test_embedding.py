"""`loco report --embedding`: a 2-D picture of a run's val features, one point per image."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_overrides

from loco.cli import main
from loco.config import load_config
from loco.eval.embedding import project_2d
from loco.train import pretrain


@pytest.fixture(scope="module")
def tiny_run(tiny_folder_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("embed") / "run"
    cfg = load_config(None, tiny_overrides(tiny_folder_root, out, "optim.max_steps=1"))
    return pretrain(cfg)


def test_embedding_png_holds_one_point_per_val_image(tiny_run, tiny_folder_root, capsys):
    n_val = sum(1 for _ in (tiny_folder_root / "val").rglob("*.jpg"))
    assert main(["report", "--embedding", str(tiny_run), "--per-class", "2"]) == 0
    png = tiny_run / "embedding_tsne.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"({n_val} points in 1 panels)" in capsys.readouterr().out


def test_embedding_of_every_stage(tiny_run, tiny_folder_root, tmp_path):
    from loco.eval.embedding import embedding_report

    n_val = sum(1 for _ in (tiny_folder_root / "val").rglob("*.jpg"))
    path, drawn = embedding_report([tiny_run], tmp_path / "e.png", stage="all", per_class=2)
    assert path.is_file()
    assert sorted(drawn) == [f"run (loco) S{s}" for s in (1, 2, 3, 4)]
    assert set(drawn.values()) == {n_val}


@pytest.mark.parametrize("projection", ["tsne", "umap"])
def test_projection_keeps_clusters_apart(projection):
    """Two well separated clusters stay separated in 2-D (an independent check that the
    projection ran on the features, not on noise)."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 16)) * 0.05 + np.eye(16)[0]
    b = rng.normal(size=(20, 16)) * 0.05 + np.eye(16)[1]
    xy = project_2d(np.concatenate([a, b]), projection)
    assert xy.shape == (40, 2)
    ca, cb = xy[:20].mean(0), xy[20:].mean(0)
    spread = max(
        np.linalg.norm(xy[:20] - ca, axis=1).max(), np.linalg.norm(xy[20:] - cb, axis=1).max()
    )
    assert np.linalg.norm(ca - cb) > spread
