"""The small-scale comparison of docs/results.md: every method x seed, resumable.

The code is the ``loco.compare`` package (plan, runner, collect, report with its prose in
``loco/compare/report.md``); ``python tools/compare.py --help`` shows the usage.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loco.compare.plan import VARIANTS, parse_args, pretrain_config  # noqa: E402
from loco.compare.runner import main  # noqa: E402

__all__ = ["VARIANTS", "main", "parse_args", "pretrain_config"]

if __name__ == "__main__":
    raise SystemExit(main())
