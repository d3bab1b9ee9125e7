"""The small-scale measurements of docs/results.md, one resumable command per section.

The code is the ``loco.compare`` package (sections, plan, runner, collect, the reports with
their prose templates, the page); ``python tools/compare.py --help`` shows the usage.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loco.compare.plan import jobs, parse_args, pretrain_config, run_dir  # noqa: E402
from loco.compare.runner import main  # noqa: E402
from loco.compare.sections import SECTIONS, VARIANTS  # noqa: E402

__all__ = ["SECTIONS", "VARIANTS", "jobs", "main", "parse_args", "pretrain_config", "run_dir"]

if __name__ == "__main__":
    raise SystemExit(main())
