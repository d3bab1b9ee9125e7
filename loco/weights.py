"""Weights from a source: the one reader of pretrained weights for eval, transfer and export.

A source is one of

* a **loco checkpoint** of any method (its ``backbone`` entry, its saved ``config`` and
  ``meta``: architecture, method, step), or with ``ema`` its momentum backbone
  (``backbone_ema``, kept by objectives with a momentum target: BYOL, MoCo v3);
* a **foreign checkpoint**: a plain timm / torchvision state dict, or another toolkit's
  checkpoint (MoCo v2/v3, DINO, solo-learn, lightly), as ``.pth``/``.pt`` or
  ``.safetensors``; the architecture comes from the caller (``--backbone NAME``);
* a seeded **random initialisation** of an architecture: the floor every method must beat.

Foreign layouts are recognised by their key names, not by a list of toolkits: the nested
dicts are flattened to dotted keys, and a key's *root* is its leading wrapper tokens
(``state_dict``, ``model``, ``module``, ``teacher``, ``student``) followed by backbone
tokens (``backbone``, ``encoder``, ``encoder_q``, ``base_encoder``, ``body``). The
weights under the one root that ends in a backbone token are the backbone (a DINO
checkpoint has two, the teacher's is taken, as DINO evaluates it); everything else
(MoCo's momentum encoder and queue, projectors, predictors, prototypes, DINO heads) is
dropped and listed in one log line. ``prefix`` picks a root by hand when the rule cannot.
Which tensors the architecture then lacks is an error naming the first few
(:func:`loco.checkpoint.load_backbone_weights`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from loco import checkpoint as ckpt
from loco.config import Config, ModelConfig, config_from_dict
from loco.errors import LocoError

if TYPE_CHECKING:
    from loco.models.backbone import StagedBackbone

log = logging.getLogger("loco.weights")

WRAPPERS = ("state_dict", "model", "module", "teacher", "student")
BACKBONES = ("backbone", "encoder", "encoder_q", "base_encoder", "body")
PREFERRED_ROOTS = ("teacher.",)  # DINO: the teacher is the network DINO evaluates
RANDOM_INIT = "random-init"


@dataclass
class WeightsSource:
    """Backbone weights and what results and caches call them."""

    state: dict[str, torch.Tensor] | None  # timm-model keys; None = random initialisation
    config: Config | None  # the loco config saved with the weights; None for foreign ones
    method: str  # pretraining method, "random-init", or a label (the file's stem)
    weights_id: str  # results' "checkpoint": the file's hash, or "random-init-seed<n>"
    path: str | None = None  # the file the weights (or the architecture) came from
    step: int | None = None  # pretraining step of a loco checkpoint
    seed: int = 0  # random initialisation seed
    split_cuts: list[int] | None = None  # a balanced:K run's cuts (its meta.split_cuts)

    @property
    def random_init(self) -> bool:
        return self.state is None

    @property
    def backbone(self) -> str | None:
        """timm model name when the source says it (loco checkpoints)."""
        return self.config.model.backbone if self.config else None

    @property
    def kwargs(self) -> dict[str, Any]:
        """Extra ``timm.create_model`` arguments the source was trained with."""
        return dict(self.config.model.kwargs) if self.config else {}

    @property
    def cache_id(self) -> str | None:
        """The weights' name in a feature cache key: the file hash; None for a random
        initialisation, whose cache key hashes the built weights instead (they depend on
        the timm version, not only on the seed)."""
        return None if self.random_init else self.weights_id

    def build_backbone(self, model: ModelConfig, image_size: int) -> StagedBackbone:
        """``model``'s staged backbone with these weights loaded: the one builder of the
        network a checkpoint trained. A ``balanced:K`` split the checkpoint was trained with
        is cut where its ``meta.split_cuts`` say, not measured again (a measurement can come
        out otherwise with another torch or image size, and then the per-stage results would
        be of other modules than the ones trained); another split is resolved as usual."""
        from loco.models.backbone import build_backbone

        trained = self.config is not None and model.split == self.config.model.split
        backbone = build_backbone(model, image_size, cuts=self.split_cuts if trained else None)
        load_into(backbone.body, self)
        return backbone

    def model_config(self, fallback: ModelConfig | None) -> ModelConfig:
        """The saved architecture, else ``fallback`` (the caller's ``--backbone``)."""
        if self.config is not None:
            return self.config.model
        if fallback is None:
            raise LocoError(
                f"'{self.path}' is a plain state dict without a loco config; pass --backbone NAME "
                "(the timm model it was trained as, e.g. resnet50) and the image size, e.g. "
                "data.image_size=224"
            )
        return fallback


def read_weights(
    path: str | Path | None,
    *,
    random_init: bool = False,
    seed: int = 0,
    method: str | None = None,
    prefix: str | None = None,
    ema: bool = False,
) -> WeightsSource:
    """The weights of ``path`` (see the module docstring), or a random initialisation.

    With ``random_init`` the file (if any) only supplies the architecture. ``method``
    labels the weights in results (default: the checkpoint's method, or the file's stem).
    ``prefix`` chooses the backbone's root in a foreign checkpoint, e.g. ``student.``.
    ``ema``: a loco checkpoint's momentum (EMA) backbone instead of the online one; its
    results and feature caches are named apart (``<method>-ema``, ``<hash>-ema``).
    """
    if path is None:
        if not random_init:
            raise LocoError("nothing to evaluate: pass --checkpoint PATH or --random-init")
        return WeightsSource(None, None, RANDOM_INIT, f"random-init-seed{seed}", seed=seed)
    obj = _load_file(Path(path))
    config, step, cuts = None, None, None
    saved = obj.get("config")
    if isinstance(saved, dict) and isinstance(obj.get("backbone"), dict):  # a loco checkpoint
        config = saved_config(saved, path)
        meta = obj.get("meta") or {}
        label = str(meta.get("method") or config.method.name)
        if config.method.objective != "simclr":  # routing+objective, e.g. loco+byol
            label = f"{label}+{config.method.objective}"
        method = method or (f"{label}-ema" if ema else label)
        step = int(obj["step"]) if isinstance(obj.get("step"), int) else None
        cuts = [int(c) for c in meta["split_cuts"]] if meta.get("split_cuts") else None
        key = "backbone_ema" if ema else "backbone"
        if not isinstance(obj.get(key), dict):
            raise LocoError(
                f"'{path}' holds no momentum (EMA) weights: its objective "
                f"({config.method.objective}) keeps none; use the online weights (drop --ema)"
            )
        state = {k: v for k, v in obj[key].items() if isinstance(v, torch.Tensor)}
    elif ema:
        raise LocoError(f"--ema needs a loco checkpoint; '{path}' is not one")
    else:
        method = method or Path(path).stem
        state = backbone_state(obj, prefix, str(path))
    if random_init:
        return WeightsSource(
            None,
            config,
            RANDOM_INIT,
            f"random-init-seed{seed}",
            str(path),
            seed=seed,
            split_cuts=cuts,  # the floor is split as the trained network is
        )
    weights_id = ckpt.file_hash(path) + ("-ema" if ema else "")
    return WeightsSource(state, config, method, weights_id, str(path), step, seed, split_cuts=cuts)


def saved_config(saved: dict[str, Any], path: str | Path) -> Config:
    """The config a loco checkpoint was saved with, as this loco reads it: kwargs timm ignored
    (refused since) dropped with a warning (:func:`loco.models.backbone.drop_ignored_kwargs`);
    a config it cannot read is one line naming the checkpoint."""
    from loco.models.backbone import drop_ignored_kwargs

    try:
        config = config_from_dict(saved)
    except LocoError as exc:
        raise LocoError(
            f"checkpoint '{path}' holds a config this loco cannot read: {exc}"
        ) from None
    config.model = drop_ignored_kwargs(config.model, str(path))
    return config


def _load_file(path: Path) -> dict[str, Any]:
    if path.suffix != ".safetensors":
        return ckpt.load(path)
    if not path.is_file():
        raise LocoError(f"weights file '{path}' not found")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError) as exc:
        raise LocoError(f"cannot read safetensors file '{path}': {exc}") from None


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in nested dicts under its dotted key (optimizer states etc. included;
    they are dropped later as non-backbone roots)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
        elif isinstance(v, Mapping) and all(isinstance(x, str) for x in v):
            out.update(_flatten(v, f"{prefix}{k}."))
    return out


def _root(key: str) -> tuple[str, bool]:
    """(the key's root, whether the root ends in a backbone token)."""
    tokens = key.split(".")
    i = 0
    while i < len(tokens) - 1 and tokens[i] in WRAPPERS:
        i += 1
    j = i
    while j < len(tokens) - 1 and tokens[j] in BACKBONES:
        j += 1
    return "".join(t + "." for t in tokens[:j]), j > i


def backbone_state(
    obj: Mapping[str, Any], prefix: str | None = None, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """The backbone's tensors of a foreign checkpoint, with timm-model key names."""
    flat = _flatten(obj)
    if not flat:
        raise LocoError(f"'{source}' holds no tensors")
    roots: Counter[str] = Counter()
    marked: set[str] = set()
    for key in flat:
        root, is_backbone = _root(key)
        roots[root] += 1
        if is_backbone:
            marked.add(root)
    if prefix is not None:
        chosen = prefix if not prefix or prefix.endswith(".") else prefix + "."
        if not any(k.startswith(chosen) for k in flat):
            raise LocoError(
                f"--prefix '{prefix}' matches no key of '{source}'; its roots are "
                + ", ".join(f"'{r}' ({n} tensors)" for r, n in roots.most_common(6))
            )
    elif len(marked) == 1:
        chosen = next(iter(marked))
    elif marked:
        preferred = [r for r in marked if r.startswith(PREFERRED_ROOTS)]
        if len(preferred) != 1:
            raise LocoError(
                f"'{source}' holds several backbones ({', '.join(sorted(marked))}); "
                "choose one with --prefix, e.g. --prefix " + sorted(marked)[0]
            )
        chosen = preferred[0]
    else:  # a plain state dict, perhaps wrapped: its largest root
        chosen = roots.most_common(1)[0][0]
    state = {k[len(chosen) :]: v for k, v in flat.items() if k.startswith(chosen)}
    dropped = Counter(_group(k) for k in flat if not k.startswith(chosen))
    if dropped:
        log.info(
            "weights: backbone = '%s*' of %s (%d tensors); dropped %d others: %s",
            chosen,
            source,
            len(state),
            sum(dropped.values()),
            ", ".join(f"{g} ({n})" for g, n in dropped.most_common()),
        )
    return state


def _group(key: str) -> str:
    """A dropped key's group for the log line: a backbone root whole, else its root and
    the next token (``module.encoder_k.*``, ``module.queue``)."""
    root, is_backbone = _root(key)
    rest = key[len(root) :].split(".")
    if is_backbone:
        return root + "*"
    return root + (rest[0] + ".*" if len(rest) > 1 else rest[0])


def load_into(body: nn.Module, source: WeightsSource) -> None:
    """Load ``source``'s weights into the timm model ``body`` (random init: nothing)."""
    if source.state is not None:
        ckpt.load_backbone_weights(body, source.state, source.path or source.weights_id)
