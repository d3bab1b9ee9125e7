"""2-D pictures of a representation: t-SNE (scikit-learn) or UMAP (umap-learn) of the cached
val features, one panel per run or per stage, coloured by class.

This is the LoCo paper's appendix figure (t-SNE of SimCLR / GIM / LoCo features): a way to
see whether a local method's classes separate as e2e's do, which a top-1 number hides.
Features come from the same cache as ``loco eval`` (computed once, reused).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loco.errors import LocoError

log = logging.getLogger(__name__)

PROJECTIONS = ("tsne", "umap")


@dataclass
class Panel:
    title: str
    xy: np.ndarray  # [N, 2]
    labels: np.ndarray  # [N] class indices
    classes: list[str]


def project_2d(features: np.ndarray, projection: str = "tsne", seed: int = 0) -> np.ndarray:
    """[N, C] -> [N, 2]. Features are L2-normalised first (kNN's cosine geometry)."""
    if projection not in PROJECTIONS:
        raise LocoError(f"--projection {projection!r} unknown; use {' or '.join(PROJECTIONS)}")
    x = np.asarray(features, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if len(x) < 5:
        raise LocoError(f"an embedding plot needs at least 5 images, got {len(x)}")
    if projection == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError:
            raise LocoError("t-SNE needs scikit-learn: pip install 'loco[embedding]'") from None
        perplexity = float(min(30.0, (len(x) - 1) / 3))
        return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    try:
        import umap
    except ImportError:
        raise LocoError("UMAP needs umap-learn: pip install 'loco[embedding]'") from None
    neighbours = min(15, len(x) - 1)
    reducer = umap.UMAP(n_components=2, n_neighbors=neighbours, random_state=seed, n_jobs=1)
    return reducer.fit_transform(x)


def plot_panels(panels: Sequence[Panel], path: str | Path, projection: str) -> dict[str, int]:
    """One scatter per panel; returns the number of points drawn in each (read back from the
    figure's axes, so a caller can check that every image made it into the picture)."""
    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 4.2 * nrows), squeeze=False)
    cmap = plt.get_cmap("tab10" if max(len(p.classes) for p in panels) <= 10 else "tab20")
    drawn: dict[str, int] = {}
    for ax, panel in zip(axes.flat, panels):
        for c, name in enumerate(panel.classes):
            mask = panel.labels == c
            if mask.any():
                ax.scatter(*panel.xy[mask].T, s=4, color=cmap(c % cmap.N), label=name)
        drawn[panel.title] = sum(len(col.get_offsets()) for col in ax.collections)
        ax.set_title(panel.title)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    if len(names) <= 20:
        fig.legend(handles, names, loc="lower center", ncol=min(10, len(names)), markerscale=3)
    fig.suptitle(f"{projection} of val features, coloured by class")
    fig.tight_layout(rect=(0, 0.06 if len(names) <= 20 else 0, 1, 0.96))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def embedding_report(
    runs: Sequence[str | Path],
    out: str | Path | None = None,
    *,
    stage: str = "last",
    projection: str = "tsne",
    per_class: int = 100,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Path, dict[str, int]]:
    """Draw the val features of each run's ``RUN/checkpoint.pt`` (one panel per run), or of
    every stage of one run (``stage="all"``). Returns the PNG path and points per panel."""
    from loco.eval.features import extract_features
    from loco.eval.network import load_backbone
    from loco.rundir import RunDir

    if stage == "all" and len(runs) > 1:
        raise LocoError("--stage all draws one run's stages; give one run, or a stage number")
    panels: list[Panel] = []
    for run in runs:
        checkpoint = RunDir(run).checkpoint if Path(run).is_dir() else Path(run)
        if not checkpoint.is_file():
            raise LocoError(f"no checkpoint at '{checkpoint}'; give a run directory")
        cfg, backbone, source = load_backbone(checkpoint)
        k = backbone.num_modules
        stages = list(range(1, k + 1)) if stage == "all" else [k if stage == "last" else int(stage)]
        if not all(1 <= s <= k for s in stages):
            raise LocoError(f"--stage {stage} outside 1..{k} for '{run}'")
        sets = extract_features(
            cfg,
            backbone,
            "val",
            stages,
            RunDir.from_checkpoint(checkpoint).root / "features",
            weights_id=source.cache_id,
            per_class=per_class,
            seed=seed,
            progress=progress,
        )
        for s, fs in sets.items():
            log.info("%s S%d: %s of %d images", Path(run).name, s, projection, len(fs))
            title = f"{Path(run).resolve().name} ({source.method}) S{s}"
            xy = project_2d(fs.features, projection, seed)
            panels.append(Panel(title, xy, np.asarray(fs.labels), list(fs.classes)))
    if out is None:
        first = Path(runs[0]) if Path(runs[0]).is_dir() else Path(runs[0]).parent
        out = first / f"embedding_{projection}.png"
    return Path(out), plot_panels(panels, out, projection)
