"""Recomputation plans: which leading segments of each local module keep only their input.

The grammar lives here, apart from the backbone (and timm), so that config validation
checks ``train.recompute`` in the same words the backbone and ``loco bench`` read it.
"""

from __future__ import annotations

from collections.abc import Sequence

from loco.errors import LocoError


def parse_recompute_plan(text: str, n_modules: int | None) -> list[bool | int]:
    """``none`` | ``stage1`` | ``all`` | ``S1=all;S2=1`` -> :attr:`StagedBackbone.recompute`.

    ``Sk=n`` recomputes the first n segments (the stem, or one residual block each) of
    module k; memory goes where the early, high-resolution activations are. With
    ``n_modules=None`` only the syntax is checked (and the plan returned is empty)."""
    text = text.strip()
    n = n_modules if n_modules is not None else 0
    if text == "none":
        return [False] * n
    if text == "stage1":
        return [k == 0 for k in range(n)]
    if text == "all":
        return [True] * n
    plan: dict[int, bool | int] = {}
    for part in text.split(";"):
        try:
            name, value = part.split("=")
            k = int(name.strip().lstrip("Ss")) - 1
            if k < 0 or (n_modules is not None and k >= n_modules):
                raise IndexError
            count = True if value.strip() == "all" else int(value)
            if count is not True and count < 0:
                raise ValueError
            plan[k] = count
        except (ValueError, IndexError):
            modules = f"modules S1..S{n_modules}" if n_modules else "modules S1, S2, ..."
            raise LocoError(
                f"recompute plan '{text}' not understood; use none, stage1, all, or e.g. "
                f"'S1=all;S2=1' ({modules}, n = number of leading segments)"
            ) from None
    return [plan.get(k, False) for k in range(n)]


def format_recompute_plan(plan: Sequence[bool | int]) -> str:
    parts = [f"S{k + 1}={'all' if r is True else int(r)}" for k, r in enumerate(plan) if r]
    return ";".join(parts) or "none"
