"""The objectives section: routing {e2e, greedy, loco} x objective {simclr, byol, vicreg}.
Readout per stage, the e2e-minus-local gap per objective with its noise (does locality hurt
more or less with another objective?), every routing x objective pair at seed 0, the collapse
check per run, and a grouped-bar plot."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from loco.compare.plan import FLOOR
from loco.compare.report import _cell, _s4, save_figure, status_text, top1_tables
from loco.compare.sections import ALL_OBJECTIVES, ALL_ROUTINGS, OBJECTIVES, ROUTINGS, Section

# collapse floor: mean per-dimension std of the L2-normalised last-stage features, x sqrt(dim)
# (1 = spread like a uniform distribution on the sphere; a collapsed encoder gives ~0)
SPREAD_FLOOR = 0.05
# ... and a run's last-stage kNN must beat the random-init floor of its seed by this many points
FLOOR_MARGIN = 1.0


def gap(summary: dict[str, Any], a: str, b: str, readout: str) -> tuple[float, float] | None:
    """Last-stage top-1 of a minus b, and its noise: the larger of the seeds' spread and the
    binomial sampling error of the val accuracy (as the methods section's verdicts)."""
    ma, sa, _ = _s4(summary, a, readout)
    mb, sb, _ = _s4(summary, b, readout)
    if ma is None or mb is None:
        return None
    n_val = summary["protocol"]["eval_val_per_class"] * 10
    sampling = 100 * math.sqrt(max(mb, 1) / 100 * (1 - mb / 100) / max(n_val, 1))
    return ma - mb, max(math.hypot(sa or 0, sb or 0), sampling)


def _verdict(diff: float, noise: float) -> str:
    return "within the noise" if abs(diff) <= 2 * noise else ("larger" if diff > 0 else "smaller")


def gap_rows(summary: dict[str, Any]) -> list[str]:
    rows = []
    for readout, label in (("knn", "kNN"), ("linear", "linear")):
        for local in ("loco", "greedy"):
            base = gap(summary, "e2e_simclr", f"{local}_simclr", readout)
            for obj in OBJECTIVES:
                g = gap(summary, f"e2e_{obj}", f"{local}_{obj}", readout)
                if g is None:
                    continue
                change = "-"
                if base is not None and obj != "simclr":
                    d, n = g[0] - base[0], math.hypot(g[1], base[1])
                    change = f"{d:+.1f} ± {n:.1f} ({_verdict(d, n)})"
                rows.append(
                    f"| {label} | e2e − {local} | {obj} | {g[0]:+.1f} ± {g[1]:.1f} | {change} |"
                )
    return rows


def grid(summary: dict[str, Any], readout: str) -> list[str]:
    methods = summary["methods"]
    out = [
        "| objective | " + " | ".join(f"`{r}`" for r in ROUTINGS) + " |",
        "|---|" + "---:|" * len(ROUTINGS),
    ]
    for obj in OBJECTIVES:
        cells = []
        for r in ROUTINGS:
            stages = methods.get(f"{r}_{obj}", {}).get(readout, {})
            cells.append(_cell(stages[max(stages, key=int)]) if stages else "-")
        out.append(f"| {obj} | " + " | ".join(cells) + " |")
    return out


def floor_knn(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The random-init floor's kNN per seed and stage."""
    seeds = summary["methods"].get(FLOOR, {}).get("seeds", {})
    return {seed: rec.get("knn", {}) for seed, rec in seeds.items()}


def collapse_check(
    rec: dict[str, Any], floor: dict[str, float]
) -> tuple[str | None, float | None, bool]:
    """The two collapse tests of one run (one seed): its last stage, its kNN there minus the
    same seed's floor (None without either), and whether its feature spread clears the floor."""
    knn = rec.get("knn", {})
    last = max(knn, key=int) if knn else None
    margin = knn[last] - floor[last] if last is not None and last in floor else None
    return last, margin, rec["feature_spread"]["mean"] >= SPREAD_FLOOR


def pair_grid(summary: dict[str, Any]) -> list[str]:
    """Every routing x objective at seed 0: last-stage kNN and feature spread, or why not."""
    floor = floor_knn(summary).get("0", {})
    out = [
        "| routing | " + " | ".join(f"`{o}`" for o in ALL_OBJECTIVES) + " |",
        "|---|" + "---|" * len(ALL_OBJECTIVES),
    ]
    for r in ALL_ROUTINGS:
        cells = []
        for o in ALL_OBJECTIVES:
            rec = summary["methods"].get(f"{r}_{o}", {}).get("seeds", {}).get("0", {})
            if (r, o) == ("infopro", "simclr"):
                cells.append("the methods section's `infopro` row")
            elif not rec.get("knn") or not rec.get("feature_spread"):
                cells.append("-")
            else:
                last, margin, spread_ok = collapse_check(rec, floor)
                ok = spread_ok and (margin is None or margin > FLOOR_MARGIN)
                above = f", floor {margin:+.1f}" if margin is not None else ""
                cells.append(
                    f"{rec['knn'][last]:.1f} ({rec['feature_spread']['mean']:.2f}{above}) "
                    f"{'ok' if ok else '**NO**'}"
                )
        out.append(f"| `{r}` | " + " | ".join(cells) + " |")
    return out


def collapse_rows(summary: dict[str, Any]) -> list[str]:
    floors = floor_knn(summary)
    rows = []
    for name, m in summary["methods"].items():
        for seed, rec in m.get("seeds", {}).items():
            spread = rec.get("feature_spread")
            if not spread:
                continue
            last, margin, spread_ok = collapse_check(rec, floors.get(seed, {}))
            beats = (
                "-"
                if name == FLOOR or margin is None
                else ("yes" if margin > FLOOR_MARGIN else "NO")
            )
            logged = ", ".join(f"{k} {v:.3g}" for k, v in rec.get("logged_std", {}).items()) or "-"
            top1 = f"{rec['knn'][last]:.1f}" if last else "-"
            ok = name == FLOOR or spread_ok
            rows.append(
                f"| `{name}` | {seed} | {spread['mean']:.3f} | {100 * spread['dead']:.0f} % | "
                f"{logged} | {top1} | {beats} | "
                f"{'-' if name == FLOOR else ('ok' if ok else 'COLLAPSED')} |"
            )
    return rows


def render(summary: dict[str, Any], section: Section) -> str:
    p, env, methods = summary["protocol"], summary["environment"], summary["methods"]
    has = any(m.get("knn") for m in methods.values())
    shared = sorted({m["runs"] for n, m in methods.items() if n.endswith("_simclr") or n == FLOOR})
    rows = []
    for name in methods:
        rows += [f"# {name}", *methods[name]["commands"][str(p["seeds"][0])]]
    gaps = gap_rows(summary)
    collapse = collapse_rows(summary)
    lines = [
        f"## {section.title}",
        "",
        status_text(summary, section.command)
        + f"Generated by `{summary['command']}` (git {env['git']}, torch {env['torch']}, "
        f"{env['cpus']} CPUs).",
        "",
        "The routing (which loss may reach which module: `e2e`, `greedy`, `loco`) and the "
        "objective (what each loss is: SimCLR's NT-Xent, BYOL's predictor + momentum target, "
        "VICReg's variance/invariance/covariance terms) are independent choices. The question: "
        "**does the gap between e2e and local routing change with the objective?** Local "
        "learning papers after LoCo suggest objectives that need no large batch of negatives "
        "might suffer less from locality.",
        "",
        "Each run is `configs/small/<routing>.yaml` + `method.objective=<objective>`: the methods "
        f"section's protocol (batch {p['batch']}, "
        f"{'/'.join(str(s) for s in sorted(set(p['steps'].values())))} steps, seeds "
        f"{', '.join(map(str, p['seeds']))}, kNN k=20 and the cached linear probe on "
        f"{p['eval_train_per_class']} / {p['eval_val_per_class']} images per class), each "
        "objective with its own recommended options. The SimCLR rows and the random-init floor "
        f"are the methods section's runs, reused (same protocol, pinned in "
        f"{', '.join(f'`{s}`' for s in shared) or 'runs/compare'}/protocol.json).",
        "",
        f"![last-stage top-1 per objective and routing]({section.plot})" if has else "",
        "",
        "### Last-stage top-1 (%), kNN",
        "",
        *grid(summary, "knn"),
        "",
        "### Last-stage top-1 (%), linear probe",
        "",
        *grid(summary, "linear"),
        "",
        "### The gap between e2e and local routing, per objective",
        "",
        "Last-stage top-1 of e2e minus the local routing's, ± its noise (the larger of the seeds' "
        "spread and the val sampling error); the last column: how much the gap changes against "
        "SimCLR's, ± both noises combined, and whether that change exceeds twice its noise.",
        "",
        "| readout | gap | objective | gap (points) | change vs simclr |",
        "|---|---|---|---:|---|",
        *(gaps or ["| - | - | - | - | - |"]),
        "",
        "### Every routing x objective pair (seed 0)",
        "",
        "The grid above crosses three objectives with three routings at two seeds; every other "
        "pair (MoCo v3 and Barlow Twins under each routing, InfoPro with each objective: its "
        "reconstruction term kept, its contrastive term replaced) trains once, seed 0, under "
        "the same protocol, as the collapse check of every pair. Cell: last-stage kNN top-1 "
        "(feature spread, kNN minus the seed-0 random-init floor) and the verdict (`ok`: "
        f"spread >= {SPREAD_FLOOR} and more than 1 point above the floor).",
        "",
        *pair_grid(summary),
        "",
        *top1_tables(summary, section.stages),
        "### Collapse check",
        "",
        "A falling loss proves little for BYOL and VICReg, which can collapse to a constant. Per "
        "run: the spread of the last stage's pooled val features (per-dimension std after L2 "
        "normalisation, x sqrt(dim), averaged over dimensions: about 1 for features spread "
        f"evenly on the sphere, 0 for a constant; **floor {SPREAD_FLOOR}**), the share of "
        "dimensions below 0.01 of that scale, any per-dimension std the trainer logged, and "
        "whether the last-stage kNN beats the random-init floor of the same seed by more than "
        "1 point.",
        "",
        "| run | seed | feature spread | dead dims | logged std | kNN last stage | beats floor | verdict |",
        "|---|---:|---:|---:|---|---:|---|---|",
        *(collapse or ["| - | - | - | - | - | - | - | - |"]),
        "",
        "### Reproduce",
        "",
        "```bash",
        summary["command"],
        "```",
        "",
        f"Runs land in `{summary['out']}/<routing>_<objective>/seed<N>/` (SimCLR rows: the "
        "methods section's folders). Each row by hand (seed 0):",
        "",
        "```bash",
        *rows,
        "```",
        "",
    ]
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> Path | None:
    methods = summary["methods"]
    if not any(m.get("knn") for n, m in methods.items() if n != FLOOR):
        return None
    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    width = 0.8 / len(ROUTINGS)
    for ax, (readout, title) in zip(
        axes, (("knn", "kNN, last stage"), ("linear", "linear probe, last stage"))
    ):
        for i, r in enumerate(ROUTINGS):
            xs, ys, es = [], [], []
            for j, obj in enumerate(OBJECTIVES):
                m, sd, _ = _s4(summary, f"{r}_{obj}", readout)
                if m is not None:
                    xs.append(j + (i - (len(ROUTINGS) - 1) / 2) * width)
                    ys.append(m)
                    es.append(sd or 0)
            ax.bar(xs, ys, width, yerr=es, capsize=3, label=r)
        floor, _, _ = _s4(summary, FLOOR, readout)
        if floor is not None:
            ax.axhline(floor, color="gray", linestyle="--", label="random init")
        ax.set_xticks(range(len(OBJECTIVES)), OBJECTIVES)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("top-1 (%), mean ± std over seeds")
    axes[1].legend(fontsize=8)
    return save_figure(fig, path)
