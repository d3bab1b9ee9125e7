"""What a resumed run may change, and the three ways to go on from a checkpoint.

``train.resume`` chooses:

- ``auto`` (default) / a checkpoint path: continue the run exactly (weights, optimizer,
  schedule, data position, RNG). Every key that changes what is trained must be unchanged,
  and so must the world size (it sets the data position and the lr scaling); otherwise the
  run stops with one line listing each differing key, e.g. ``optim.epochs: 100 -> 800``.
- ``extend``: continue the run with a longer horizon; only ``optim.epochs`` /
  ``optim.max_steps`` may differ. Optimizer state, data position and RNG are restored; the
  cosine schedule is rebuilt for the new horizon and evaluated at the current step (so the lr
  jumps up to where a schedule planned for the new length would be; the steps already done
  followed the old curve, which is not the same as a run planned for the new length).
- ``weights:PATH``: a new run (its own ``train.output_dir``, without checkpoints) that starts
  from the weights of checkpoint PATH with a fresh optimizer and schedule at step 0; any
  schedule key may differ, the model must fit the weights.

Keys in :data:`FREE` may always change (where the run is, how fast it runs, what is logged).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loco.config import Config, config_from_dict
from loco.errors import LocoError
from loco.rundir import RunDir

FREE = (
    "data.root",
    "data.num_workers",
    "train.output_dir",
    "train.resume",
    "train.device",
    "train.precision",
    "train.channels_last",
    "train.compile",
    "train.deterministic",
    "train.log_every",
    "train.ckpt_every",
    "train.keep_checkpoints",
    "train.progress",
    "train.recompute",
    "train.stage_parallel",  # same math with the same replicas (world size): loco.parallel
    "train.stage_schedule",  # a checkpoint is drained: a consistent state for either
    "monitor.",
)
HORIZON = ("optim.epochs", "optim.max_steps")
WEIGHTS = "weights:"


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and prefix == "":
            out.update(_flat(v, f"{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differences(
    old: dict[str, Any], new: Config, old_world: int | None, new_world: int | None
) -> dict[str, tuple[Any, Any]]:
    """``{key: (old, new)}`` for every key that matters on resume (see module docstring)."""
    a = _flat(config_from_dict(old).to_dict())
    b = _flat(new.to_dict())
    diff = {
        k: (a.get(k), b[k])
        for k in b
        if a.get(k) != b[k]
        and not any(k == f or (f.endswith(".") and k.startswith(f)) for f in FREE)
    }
    if old_world is not None and new_world is not None and old_world != new_world:
        diff["world size"] = (old_world, new_world)
    return diff


def describe(diff: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in diff.items())


def check(path: Any, state: dict[str, Any], cfg: Config, world_size: int | None, mode: str) -> None:
    """Raise a one-line LocoError if ``state`` (loaded from ``path``) cannot be continued under
    ``cfg`` with ``mode`` ("exact" for auto/path, or "extend")."""
    from loco.weights import saved_config

    old_world = state.get("meta", {}).get("world_size")
    old = saved_config(state.get("config", {}), path).to_dict()
    diff = differences(old, cfg, old_world, world_size)
    if not diff:
        return
    horizon_only = set(diff) <= set(HORIZON)
    if mode == "extend" and horizon_only:
        return
    if mode == "extend":
        raise LocoError(
            f"train.resume=extend only changes optim.epochs / optim.max_steps, but checkpoint "
            f"{path} also differs in {describe({k: v for k, v in diff.items() if k not in HORIZON})}; "
            f"undo those or start a new run with train.resume={WEIGHTS}{path}"
        )
    extend = " or, to train longer, train.resume=extend;" if horizon_only else ""
    raise LocoError(
        f"cannot resume {path}: the config differs in {describe(diff)}; drop those changes to "
        f"continue it exactly;{extend} or start a new schedule from its weights with a new "
        f"train.output_dir and train.resume={WEIGHTS}{path}"
    )


def weights_source(cfg: Config) -> Path | None:
    """The checkpoint of ``train.resume=weights:PATH`` (None for other modes), after checking
    that it exists and that the run dir is a new one."""
    if not cfg.train.resume.startswith(WEIGHTS):
        return None
    path = Path(cfg.train.resume[len(WEIGHTS) :])
    if not path.is_file():
        raise LocoError(f"train.resume={cfg.train.resume}: {path} is not a checkpoint file")
    if RunDir(cfg.train.output_dir).checkpoint.is_file():
        raise LocoError(
            f"train.resume={cfg.train.resume} starts a new run, but {cfg.train.output_dir} "
            "already holds one; use a new train.output_dir (or train.resume=auto to go on)"
        )
    return path
