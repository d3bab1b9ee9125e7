#!/usr/bin/env python
"""``loco bench`` as a script, for those who prefer one:

    python tools/bench.py --backbone resnet50 --image-size 224 --batch 8 \
        --methods e2e,greedy,loco,loco_naive,infopro --recompute none,stage1 --out bench.json

Same arguments as ``loco bench --help``; see docs/bench.md for what is measured.
"""

from __future__ import annotations

import sys

from loco.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
