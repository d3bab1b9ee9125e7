"""The grammars of ``model.split`` and ``train.recompute``, apart from any model code.

Config validation checks both at load time (so ``loco submit`` never queues a job whose
split or recomputation plan cannot parse); the backbone and ``loco bench`` read them in the
same words. This module imports neither torch nor timm: it sits below config and models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from loco.errors import LocoError

SPLIT_HELP = (
    "use 'stages', 'blocks', a number of modules N, a list of block indices such as [2, 4, 6], "
    "'balanced:K' (K modules even in saved-activation bytes) or 'balanced:K:flops' (even in FLOPs)"
)


@dataclass(frozen=True)
class SplitSpec:
    """A parsed ``model.split``. ``count`` is N or K; ``cuts`` the block indices of a list."""

    kind: Literal["stages", "blocks", "count", "cuts", "balanced"]
    count: int = 0
    cuts: tuple[int, ...] = ()
    metric: Literal["saved", "flops"] = "saved"


def parse_split(value: object) -> SplitSpec:
    """``stages`` | ``blocks`` | N | [cuts] | ``balanced:K`` | ``balanced:K:flops``.

    Only the syntax is checked here; whether N or the cuts fit a backbone's block count is
    known once the backbone is built."""
    if isinstance(value, bool):
        raise LocoError(f"model.split={value!r} not understood; {SPLIT_HELP}")
    if isinstance(value, int):
        if value < 1:
            raise LocoError(f"model.split={value} local modules: give N >= 1; {SPLIT_HELP}")
        return SplitSpec("count", count=value)
    if isinstance(value, Sequence) and not isinstance(value, str):
        try:
            if any(isinstance(c, bool | float) for c in value):
                raise ValueError
            cuts = [int(c) for c in value]
        except (TypeError, ValueError):
            raise LocoError(
                f"model.split cut points must be integers, got {list(value)}; {SPLIT_HELP}"
            ) from None
        if cuts != sorted(set(cuts)) or any(c < 1 for c in cuts):
            raise LocoError(
                f"model.split cut points {cuts} are invalid: give increasing block indices >= 1 "
                "(a module starts at each cut)"
            )
        return SplitSpec("cuts", cuts=tuple(cuts))
    text = str(value).strip().lower()
    if text in ("stages", "blocks"):
        return SplitSpec(text)  # type: ignore[arg-type]
    if text.isdigit():
        return parse_split(int(text))
    parts = text.split(":")
    if parts[0] == "balanced" and len(parts) in (2, 3):
        metric = parts[2] if len(parts) == 3 else "saved"
        if parts[1].isdigit() and int(parts[1]) >= 1 and metric in ("saved", "flops"):
            return SplitSpec("balanced", count=int(parts[1]), metric=metric)  # type: ignore[arg-type]
        raise LocoError(
            f"model.split={value!r} not understood: 'balanced:K' needs K >= 1 and an optional "
            "':flops' (even in forward FLOPs) or ':saved' (even in saved activations, the default)"
        )
    raise LocoError(f"model.split={value!r} not understood; {SPLIT_HELP}")


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
