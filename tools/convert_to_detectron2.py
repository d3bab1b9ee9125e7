#!/usr/bin/env python
"""Convert a loco ResNet checkpoint into a Detectron2 ``.pkl`` for the stock R-50 configs.

    python tools/convert_to_detectron2.py RUN/checkpoint.pt loco_r50.pkl [--format RGB|BGR]

Every backbone weight is renamed (timm -> Detectron2 ResNet names, see
``loco/transfer/convert.py``) or the conversion fails; nothing is left over. The output is
``{"model": {name: numpy array}, "__author__": "loco", "matching_heuristics": True}``,
which ``DetectionCheckpointer`` loads from ``MODEL.WEIGHTS``. The config lines the weights
need (``STRIDE_IN_1X1: False``, depth, input format and statistics) are printed; with
``--format BGR`` conv1's input channels are reversed so a BGR pipeline sees the same
network. Needs no Detectron2.

What converts: timm ResNet-50/101/152 at any width that doubles per stage, ResNet-18/34 at
full width (stock Detectron2 builds R18/R34 only with ``RES2_OUT_CHANNELS: 64``). Anything
else stops with one line pointing to the registered loco backbone (``loco transfer train
--checkpoint CKPT``), which runs any timm CNN without conversion.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loco.errors import LocoError  # noqa: E402
from loco.transfer.convert import convert_checkpoint, settings_yaml, write_pkl  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="loco checkpoint (or a timm ResNet state dict)")
    parser.add_argument("output", help="Detectron2 weights to write (.pkl)")
    parser.add_argument(
        "--format",
        choices=("RGB", "BGR"),
        default="RGB",
        help="INPUT.FORMAT of the Detectron2 config that will load it (default RGB)",
    )
    args = parser.parse_args(argv)
    if not args.output.endswith(".pkl"):
        print(
            "error: the output must end in .pkl (Detectron2 reads other suffixes as torch files)",
            file=sys.stderr,
        )
        return 2
    try:
        payload, settings = convert_checkpoint(args.checkpoint, args.format)
    except LocoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = write_pkl(payload, args.output)
    print(
        f"{out}: {len(payload['model'])} tensors (ResNet-{settings['MODEL.RESNETS']['DEPTH']}); "
        f"set MODEL.WEIGHTS to it and use:\n{settings_yaml(settings)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
