"""The report: ``docs/results.md`` from the summary (prose in ``report.md``, a template),
the findings with their noise verdicts, and the top-1 plot."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from string import Template
from typing import Any

from loco.compare.plan import (
    BENCH_S_GUESS,
    COST_PRIOR,
    EVAL_S_GUESS,
    FLOOR,
    IDLE_E2E_RANGE,
    IDLE_E2E_S_PER_STEP,
    REFERENCE,
)
from loco.compare.sections import SECTIONS, Section

TEMPLATE = Path(__file__).with_name("report.md")  # the page's prose, with $fields


# -- report ---------------------------------------------------------------------------------
def _cell(v: dict[str, Any] | None) -> str:
    if not v or v.get("mean") is None:
        return "-"
    return f"{v['mean']:.1f} ± {v['std']:.1f}" if v.get("std") is not None else f"{v['mean']:.1f}"


def _s4(
    summary: dict[str, Any], name: str, readout: str = "knn"
) -> tuple[float | None, float | None, int]:
    stages = summary["methods"].get(name, {}).get(readout, {})
    if not stages:
        return None, None, 0
    top = stages[max(stages, key=int)]
    return top["mean"], top["std"], top["n"]


def compare_sentence(summary: dict[str, Any], a: str, b: str, readout: str = "knn") -> str | None:
    ma, sa, na = _s4(summary, a, readout)
    mb, sb, nb = _s4(summary, b, readout)
    if ma is None or mb is None:
        return None
    diff = ma - mb
    p = summary["protocol"]
    n_val = p["eval_val_per_class"] * 10
    sampling = 100 * math.sqrt(max(mb, 1) / 100 * (1 - mb / 100) / max(n_val, 1))
    spread = math.sqrt((sa or 0) ** 2 + (sb or 0) ** 2)
    noise = max(spread, sampling)
    verdict = "within the noise" if abs(diff) <= 2 * noise else ("above" if diff > 0 else "below")
    seeds = f"{min(na, nb)} seed(s)"
    return (
        f"`{a}` {ma:.1f} vs `{b}` {mb:.1f}: {diff:+.1f} points ({verdict}; seed spread "
        f"{spread:.1f}, val sampling error ~{sampling:.1f}, {seeds})"
    )


def findings(summary: dict[str, Any]) -> list[str]:
    pairs = [
        (REFERENCE, "e2e", "the independent SimCLR against loco's e2e (is e2e correct?)"),
        ("e2e_deep", "e2e", "the deeper decoder on e2e (the reviewer's point)"),
        ("greedy", "e2e", "greedy against e2e"),
        ("greedy", "e2e_deep", "greedy against e2e with the same decoder"),
        ("loco", "e2e_deep", "LoCo against e2e with the same decoder (the fair comparison)"),
        ("loco", "e2e", "LoCo against e2e with SimCLR's head (the paper's main-table comparison)"),
        ("loco", "greedy", "LoCo against greedy (what the overlap buys)"),
        ("loco_no_s1", "loco", "dropping the S1 loss"),
        ("infopro", "greedy", "InfoPro against greedy (what reconstruction buys)"),
    ]
    out = []
    for a, b, what in pairs:
        for readout, label in (("knn", "kNN"), ("linear", "linear")):
            s = compare_sentence(summary, a, b, readout)
            if s:
                out.append(f"- {what}, last stage {label}: {s}.")
    floor, _, _ = _s4(summary, FLOOR)
    if floor is not None:
        below = [
            n
            for n in summary["methods"]
            if n != FLOOR and (_s4(summary, n)[0] or 1e9) <= floor + 1.0
        ]
        if below:
            out.append(
                f"- at or within 1 point of the random-init floor ({floor:.1f}) at the last stage (kNN): "
                + ", ".join(f"`{n}`" for n in below)
                + "."
            )
    ref = summary["methods"].get(REFERENCE, {})
    if "own_knn_top1" in ref:
        m, _, _ = _s4(summary, REFERENCE)
        out.append(
            f"- the independent SimCLR's own kNN code gives {ref['own_knn_top1']['mean']:.1f} on its last "
            f"stage, loco's evaluation {m:.1f} (different eval images of the same sizes; a cross-check "
            "of the kNN evaluation itself)."
        )
    return out


def _measured_budget(summary: dict[str, Any]) -> str | None:
    """The table's cost from its own runs (fastest seed of each job), once every job has one."""
    p, methods = summary["protocol"], summary["methods"]
    trained = [n for n in methods if n != FLOOR]
    if not trained or any("train_s" not in methods[n] for n in trained):
        return None
    if any("eval_s" not in m for m in methods.values()):
        return None
    seeds = len(p["seeds"])
    train_min = sum(methods[n]["train_s"]["min"] for n in trained) / 60
    eval_min = sum(m["eval_s"]["min"] for m in methods.values()) / 60
    bench_min = len(summary["bench"]) * BENCH_S_GUESS / 60
    slow = sum(
        max(r["train_s"] for r in methods[n]["seeds"].values() if r.get("train_s")) for n in trained
    )
    total = seeds * (train_min + eval_min) + bench_min
    return (
        f"Measured in these runs: one seed of every pretraining takes {train_min:.1f} min and its "
        f"{len(methods)} evaluations {eval_min:.1f} min (the fastest seed of each job, i.e. the one "
        f"least slowed by other load; {summary['environment']['threads']} threads), so the whole table "
        f"({seeds} seeds, plus ~{bench_min:.0f} min of benchmarks) takes about {total:.0f} min on 2 "
        f"idle cores. The slowest seeds' pretraining took {slow / 60:.1f} min ({slow / 60 / train_min:.1f}x): "
        "seed 0 ran while other jobs shared the machine (load 6-10); on a shared machine run it "
        "with `OMP_NUM_THREADS=1`, as OpenMP's "
        "threads otherwise wait for their descheduled siblings. `--plan` prints the estimate before "
        "running, from the timings of whatever has run."
    )


def budget_text(summary: dict[str, Any]) -> str:
    """How the default budget was sized, and what this protocol should cost on 2 idle cores."""
    p, names = summary["protocol"], list(summary["methods"])
    trained = [n for n in names if n != FLOOR]
    units = sum(COST_PRIOR.get(n, 1.0) * p["steps"][n] for n in trained) * len(p["seeds"])
    fixed = (len(names) * len(p["seeds"]) * EVAL_S_GUESS + len(trained) * BENCH_S_GUESS / 2) / 60
    lo, mid, hi = (
        units * r / 60 + fixed for r in (IDLE_E2E_RANGE[0], IDLE_E2E_S_PER_STEP, IDLE_E2E_RANGE[1])
    )
    measured = _measured_budget(summary)
    if measured:
        return measured
    return (
        "Sized on the 2-core CPU machine while four other engineers shared it (load average 6-10 on 2 "
        "cores). 3 training steps of `e2e` at batch 128 (two views, quarter-width ResNet-18, 32 px) took "
        "5.7 s wall each with torch's 2 threads but only 2.3 s wall (1.55 s CPU) with 1 thread: on a "
        "loaded machine each OpenMP thread waits for its descheduled sibling, so the 2-thread wall time "
        "says more about the load than about the work. In single-thread CPU time the other methods cost "
        "1.05x (`e2e_deep`), 1.2x (`greedy`), 1.15x (`loco`, `loco_no_s1`) and 2.5x (`infopro`) of e2e. "
        "On 2 idle cores one e2e step should take about 0.9-1.0 s (1.55 s of work over 2 cores at "
        "~85 % parallel efficiency); dividing the loaded 2-thread wall time by the nominal ~3x load "
        "gives a pessimistic 1.9 s. "
        f"This protocol is {units:.0f} e2e-step equivalents of pretraining plus "
        f"{len(names) * len(p['seeds'])} evaluations (~{EVAL_S_GUESS:.0f} s each: 7,000 images through "
        f"the network and 400 linear-probe steps) and the benchmark (~{fixed:.0f} min together): "
        f"about {mid:.0f} min on an idle 2-core machine ({lo:.0f} min at 0.9 s per e2e step, "
        f"{hi:.0f} min at the pessimistic 1.9 s). On a shared machine run it with `OMP_NUM_THREADS=1`. "
        "The cost table above records what the runs actually took; `--plan` prints the estimate "
        "before running."
    )


def status_text(summary: dict[str, Any], command: str) -> str:
    st = summary["status"]
    if not any(m.get("knn") for m in summary["methods"].values()):
        return (
            "> **NOT YET RUN.** This section is the template `tools/compare.py` fills in. No number below\n"
            "> is a measurement; the commands are the ones that will produce them. Run\n"
            f"> `{command}` and it overwrites this section.\n\n"
        )
    if not st["complete"]:
        return (
            f"> **PARTIAL**: {st['jobs_done']} of {st['jobs']} jobs done ({st['time']}). Re-run the same\n"
            "> command to finish; missing cells are `-`.\n\n"
        )
    return f"Complete: {st['jobs']} jobs, {st['time']}.\n\n"


def top1_tables(summary: dict[str, Any], n_stages: int, heading: str = "###") -> list[str]:
    """kNN and linear top-1 per stage, one row per method (mean ± std over seeds)."""
    found = [int(s) for m in summary["methods"].values() for s in m.get("knn", {})]
    n = max([n_stages, *found])
    tables = []
    for readout, title in (
        ("knn", "kNN top-1 (%), k=20, T=0.07"),
        ("linear", "Linear probe top-1 (%), cached features"),
    ):
        tables += [
            f"{heading} {title}",
            "",
            "| method | " + " | ".join(f"S{s}" for s in range(1, n + 1)) + " | seeds |",
            "|---|" + "---:|" * n + "---:|",
        ]
        for name, m in summary["methods"].items():
            cells = [_cell(m.get(readout, {}).get(str(s))) for s in range(1, n + 1)]
            tables.append(f"| `{name}` | " + " | ".join(cells) + f" | {m.get('n', 0)} |")
        tables.append("")
    return tables


def render(summary: dict[str, Any], section: Section = SECTIONS["methods"]) -> str:
    """A section's block of ``docs/results.md``: its template filled with the summary."""
    p, env = summary["protocol"], summary["environment"]
    methods, bench = summary["methods"], summary["bench"]
    has_results = any(m.get("knn") for m in methods.values())
    steps = sorted(set(p["steps"].values()))
    status = status_text(summary, section.command)
    order = list(methods)
    tables = top1_tables(summary, section.stages)
    e2e_step = methods.get("e2e", {}).get("s_per_step", {}).get("min")
    cost_rows = []
    for n in order:
        if n == FLOOR:
            continue
        b, m = bench.get(n), methods[n]
        r = (b or {}).get("ratios", {})
        cells = [
            f"{b['flops'] / 1e9:.2f}" if b else "-",
            f"{r['flops']:.2f}" if "flops" in r else "-",
            f"{b['saved_peak'] / 2**20:.1f}" if b else "-",
            f"{r['saved_peak']:.2f}" if "saved_peak" in r else "-",
            f"{r['step_s']:.2f}" if "step_s" in r else "-",
            f"{r['cpu_s']:.2f}" if "cpu_s" in r else "-",
            f"{m['train_s']['min'] / 60:.1f}" if "train_s" in m else "-",
            f"{m['s_per_step']['min']:.2f}" if "s_per_step" in m else "-",
            f"{m['s_per_step']['min'] / e2e_step:.2f}" if "s_per_step" in m and e2e_step else "-",
        ]
        cost_rows.append(f"| `{n}` | " + " | ".join(cells) + " |")
    found = (findings(summary) if has_results else []) or [
        "(filled in from the measurements when the script has run)"
    ]
    rows = []
    for n in order:
        rows += [f"# {n}", *methods[n]["commands"][str(p["seeds"][0])]]
    n_images = p["per_class"] * 10
    fields = {
        "status": status,
        "command": summary["command"],
        "out": summary.get("out", "runs/compare"),
        "git": env["git"],
        "torch": env["torch"],
        "threads": env["threads"],
        "cpus": env["cpus"],
        "image_size": p["image_size"],
        "per_class": p["per_class"],
        "n_images": n_images,
        "n_images_comma": f"{n_images:,}",
        "backbone": p["backbone"],
        "model_kwargs": json.dumps(p["model_kwargs"]),
        "optimizer": p["optimizer"].upper(),
        "base_lr": p["base_lr"],
        "weight_decay": p["weight_decay"],
        "warmup_epochs": p["warmup_epochs"],
        "batch": p["batch"],
        "steps": "/".join(str(s) for s in steps),
        "temperature": p["temperature"],
        "seeds": ", ".join(str(s) for s in p["seeds"]),
        "eval_train_per_class": p["eval_train_per_class"],
        "eval_val_per_class": p["eval_val_per_class"],
        "eval_train_comma": f"{p['eval_train_per_class'] * 10:,}",
        "linear_epochs": p["linear_epochs"],
        "eval_batch": p["eval_batch"],
        "overrides": f"Overrides on every config: `{' '.join(p['overrides'])}`.\n\n"
        if p["overrides"]
        else "",
        "top1_tables": "\n".join(tables) + "\n",
        "plot": f"![top-1 per stage]({section.plot})\n\n" if has_results else "",
        "bench_batch": p["bench_batch"],
        "load": ", ".join(f"{x:.1f}" for x in env["load_avg"]) if env["load_avg"] else "n/a",
        "cost_rows": "\n".join(cost_rows),
        "findings": "\n".join(found),
        "epochs": f"{(steps[0] * p['batch']) / max(n_images, 1):.1f}",
        "row_commands": "\n".join(rows),
        "budget": budget_text(summary),
        "measured_budget": _measured_budget(summary)
        or "Measured once every job has run; until then `--plan` prints an estimate from the "
        "timings of whatever has run.",
    }
    template = TEMPLATE.with_name(section.template)
    return Template(template.read_text()).substitute(fields)


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write (110 dpi, parent folders made) and close a report figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(summary: dict[str, Any], path: Path) -> Path | None:
    methods = {n: m for n, m in summary["methods"].items() if m.get("knn")}
    if not methods:
        return None
    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = plt.get_cmap("tab10")
    for ax, (readout, title) in zip(
        axes, (("knn", "kNN (k=20, T=0.07)"), ("linear", "linear probe (cached)"))
    ):
        for i, (n, m) in enumerate(methods.items()):
            stages = sorted(m.get(readout, {}), key=int)
            if not stages:
                continue
            ys = [m[readout][s]["mean"] for s in stages]
            es = [m[readout][s]["std"] or 0 for s in stages]
            style = (
                {"linestyle": "--", "color": "gray"} if n == FLOOR else {"color": colors(i % 10)}
            )
            if n == REFERENCE:
                style["linestyle"] = ":"
            shift = (i - (len(methods) - 1) / 2) * 0.03  # keep error bars apart
            ax.errorbar(
                [int(s) + shift for s in stages],
                ys,
                yerr=es,
                marker="o",
                capsize=3,
                label=n,
                **style,
            )
        ax.set_title(title)
        n = max([4, *(int(s) for m in methods.values() for s in m.get(readout, {}))])
        ax.set_xticks(range(1, n + 1), [f"S{s}" for s in range(1, n + 1)])
        ax.set_xlabel("stage")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (%)")
    axes[1].legend(fontsize=8, loc="best")
    p = summary["protocol"]
    fig.suptitle(
        f"CIFAR-10 32 px, {p['backbone']} quarter width, {'/'.join(map(str, sorted(set(p['steps'].values()))))} "
        f"steps x batch {p['batch']}; mean ± std over seeds {','.join(map(str, p['seeds']))}",
        fontsize=10,
    )
    return save_figure(fig, path)
