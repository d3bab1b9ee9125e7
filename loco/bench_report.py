"""The markdown report of a ``loco bench`` result (the JSON that :mod:`loco.bench` measures):
one table of every row's figures and ratios to e2e, what was alive at each peak, and the
per-module profile. Kept apart from the measurement so either can change alone."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

MiB = 1 << 20


def command_line() -> str:
    """How this ``loco bench`` was invoked, for the JSON (as typed when run as ``loco``)."""
    if sys.argv[1:2] == ["bench"]:
        return "loco bench " + " ".join(sys.argv[2:])
    return " ".join(sys.argv)


def write_report(
    result: dict[str, Any], out: str | Path, render: Callable[[dict[str, Any]], str]
) -> None:
    """Every ``loco bench`` mode's tail: the JSON at ``out``, its markdown (``render``) next
    to it as .md, and the markdown on stdout."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    table = render(result)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {out} and {out.with_suffix('.md')}")


def markdown(result: dict[str, Any]) -> str:
    """The bench result as markdown (what ``loco bench`` prints and ``--out`` writes)."""
    rows = result["rows"]
    has_time = any(r["img_per_s"] for r in rows)
    has_compile = any(r["compiled_img_per_s"] for r in rows)
    has_cuda = any(r["cuda_peak"] for r in rows)
    has_est = any(r.get("est_max_batch") for r in rows)
    head = [
        "method",
        "split",
        "recompute",
        "GFLOPs",
        "FLOPs ×e2e",
        "backbone ×e2e",
        "decoder GFLOPs",
        "peak saved MiB",
        "saved ×e2e",
        "peak step MiB",
        "step ×e2e",
    ]
    if has_time:
        head += ["img/s", "img/s ×e2e", "img/CPU-s ×e2e"]
    if has_compile:
        head += ["compiled img/s"]
    if has_est:
        head += [f"max batch @{result.get('memory_budget_gib', 0):g} GiB (est.)", "×e2e"]
    if has_cuda:
        head += ["CUDA peak MiB", "CUDA ×e2e", "max batch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        q = r["ratios"]
        cells = [
            label(r),
            str(r["split"]),
            r["recompute"],
            f"{r['flops'] / 1e9:.2f}",
            f"{q['flops']:.2f}",
            f"{q['flops_backbone']:.2f}",
            f"{r['flops_decoder'] / 1e9:.3f}",
            f"{r['saved_peak'] / MiB:.0f}",
            f"{q['saved_peak']:.2f}",
            f"{r['live_peak'] / MiB:.0f}",
            f"{q['live_peak']:.2f}",
        ]
        if has_time:
            cells += [
                f"{r['img_per_s']:.2f}" if r["img_per_s"] else "-",
                f"{q.get('img_per_s', 0):.2f}",
                f"{q.get('img_per_cpu_s', 0):.2f}",
            ]
        if has_compile:
            cells += [f"{r['compiled_img_per_s']:.2f}" if r["compiled_img_per_s"] else "-"]
        if has_est:
            cells += [str(r.get("est_max_batch") or "-"), f"{q.get('est_max_batch', 0):.2f}"]
        if has_cuda:
            cells += [
                f"{(r['cuda_peak'] or 0) / MiB:.0f}",
                f"{q.get('cuda_peak', 0):.2f}",
                str(r["cuda_max_batch"] or "-"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    out = [
        "\n".join(lines),
        "",
        "What was alive at each method's peak (saved for backward, MiB, by the module that"
        ' saved it; "other": outside any module):',
        "",
    ]
    for r in rows:
        owners = sorted(r["saved_peak_by_owner"].items(), key=_owner_order)
        parts = ", ".join(f"{k} {v / MiB:.0f}" for k, v in owners if v >= MiB / 2) or "-"
        out.append(f"- {label(r)} / {r['split']} / {r['recompute']}: {parts}")
    out += [
        "",
        "Per module (forward FLOPs; bytes its forward saves for backward; its decoder's"
        " parameters, of which the conv block's, and forward FLOPs):",
        "",
    ]
    for prof in result["modules"]:
        out.append(f"split {prof['split']}, recompute {prof['recompute']}:")
        out.append("")
        out.append(
            "| module | span | GFLOPs fwd | saved MiB | recomputed segments "
            "| decoder M params (block) | decoder GFLOPs fwd |"
        )
        out.append("|---|---|---|---|---|---|---|")
        for m in prof["profile"]:
            out.append(
                f"| {m['module']} | {m['span']} | {m['flops_forward'] / 1e9:.2f} | {m['saved_bytes'] / MiB:.1f} "
                f"| {m['recomputed_segments']}/{m['segments']} "
                f"| {m['decoder_params'] / 1e6:.2f} ({m['decoder_block_params'] / 1e6:.2f}) "
                f"| {m['decoder_flops_forward'] / 1e9:.2f} |"
            )
        out.append("")
    return "\n".join(out)


def label(row: dict[str, Any]) -> str:
    """The row's method, with its objective unless SimCLR (e.g. ``loco+byol``)."""
    objective = row.get("objective", "simclr")
    return row["method"] if objective == "simclr" else f"{row['method']}+{objective}"


def _owner_order(item: tuple[str, int]) -> tuple[int, int, str]:
    name = item[0]
    return (0, int(name[1:]), name) if name[1:].isdigit() else (1, 0, name)
