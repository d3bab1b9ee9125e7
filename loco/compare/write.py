"""After every job: ``<out>/summary.json``, the section's plot and its block of
docs/results.md, from what exists on disk."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loco.compare import report, report_objectives, report_stage
from loco.compare.collect import collect
from loco.compare.page import write_section
from loco.compare.sections import Section

Summary = dict[str, Any]
# section -> (plot, block)
RENDERERS: dict[str, tuple[Callable[[Summary, Path], Any], Callable[[Summary, Section], str]]] = {
    "methods": (report.plot, report.render),
    "presnet": (report.plot, report.render),
    "stage_parallel": (report_stage.plot, report_stage.render),
    "objectives": (report_objectives.plot, report_objectives.render),
}


def write_outputs(args: argparse.Namespace, all_jobs: list[tuple[str, str, int | None]]) -> Summary:
    summary = collect(args, all_jobs)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, args.out / "summary.json")
    args.docs.mkdir(parents=True, exist_ok=True)
    section = args.section
    draw, block = RENDERERS[section.name]
    draw(summary, args.docs / section.plot)
    write_section(args.docs / "results.md", section.name, block(summary, section))
    return summary
