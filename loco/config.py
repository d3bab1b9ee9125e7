"""Typed run configuration: dataclasses, YAML files, ``key=value`` overrides, validation.

A config file only needs the keys it changes; everything else takes the defaults below.
Unknown keys and wrong types are rejected with the nearest valid key suggested, because a
typo in a multi-day run's config should fail in the first second, not after the first epoch.
"""

from __future__ import annotations

import builtins
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loco.errors import LocoError
from loco.plans import parse_recompute_plan, parse_split


def opt(default: Any = dataclasses.MISSING, *, factory: Any = None, help: str = "") -> Any:
    """A config field with its one-line help (``loco config`` prints it)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    dataset: str = opt(
        "cifar10",
        help='"cifar10" | "clothing" (shipped, extracted from ../shared/data on first '
        'use) or "folder"',
    )
    root: str = opt(
        "",
        help="ImageFolder root holding <train_split>/<class>/* and <val_split>/<class>/*; "
        "empty means the shipped copy of `dataset`.",
    )
    train_split: str = opt("train", help="folder of the training images under the root")
    val_split: str = opt(
        "val",
        help="folder of the validation images under the root (evaluation, kNN monitor)",
    )
    labels: bool = opt(
        True,
        help="false: pretrain on images without classes, every image under "
        "<root>/<train_split> (or under <root> when that has no such folder), nested in "
        "any way; a folder with images directly in it is read this way too. The online "
        "probe and kNN monitor then turn off.",
    )
    list: str = opt(
        "",
        help="a text file of image paths to pretrain on (one per line; relative paths are "
        "relative to data.root, else to the file's folder): unlabelled, like "
        "data.labels=false",
    )
    image_size: int = opt(
        32,
        help="input side in pixels (random-resized crops for pretraining)",
    )
    crop_scale_min: float = opt(
        0.08, help="smallest crop area (fraction) of the random resized crop"
    )
    color_jitter_prob: float = opt(0.8, help="probability of SimCLR's colour jitter")
    color_jitter_strength: float = opt(
        1.0,
        help="colour jitter strength s (brightness/contrast/saturation 0.8 s, hue 0.2 s)",
    )
    grayscale_prob: float = opt(0.2, help="probability of converting a view to grayscale")
    blur_prob: float = opt(0.0, help="0.5 for 224 px ImageNet; off for 32 px")
    solarize_prob: float = opt(
        0.0,
        help="probability of solarization (BYOL's second view uses 0.2)",
    )
    per_class: int = opt(
        0,
        help="images per class taken from the training split (0 = all); class-balanced, seeded",
    )
    pipeline: str = opt(
        "pil",
        help='"pil" (CPU workers, torchvision.transforms.v2) or "tensor" (batched, on '
        "the GPU if any)",
    )
    num_workers: int = opt(2, help="DataLoader worker processes per rank")
    # (builtins.list: the field `list` above shadows the name inside this class)
    mean: builtins.list[float] = opt(
        factory=lambda: [0.485, 0.456, 0.406],
        help="per-channel mean for input normalisation (RGB)",
    )
    std: builtins.list[float] = opt(
        factory=lambda: [0.229, 0.224, 0.225],
        help="per-channel std for input normalisation (RGB)",
    )


@dataclass
class ModelConfig:
    backbone: str = opt("resnet18", help="any timm model name")
    small_image: str = opt(
        "auto",
        help='3x3 stride-1 stem, no max-pool (CIFAR SimCLR); "auto" = on when image_size <= 64',
    )
    split: Any = opt(
        "stages",
        help='"stages" (timm feature_info stages; ResNet: conv1+res2 | res3 | res4 | '
        'res5), "blocks" (one local module per residual/transformer block), N (N '
        "modules of about equal block count), a list of cut points (block indices where "
        'a new module starts), e.g. [2, 4, 6], or "balanced:K" / "balanced:K:flops" '
        "(K modules made as even as possible in saved-activation bytes / forward FLOPs, "
        "measured per block; the cuts are logged and kept in the checkpoint). Grammar: "
        "loco.plans.parse_split",
    )
    drop_path_rate: float = opt(0.0, help="stochastic depth rate passed to timm (0 = off)")
    sync_bn: bool = opt(
        False,
        help="SyncBatchNorm over all ranks for the backbone and decoders (CUDA only)",
    )
    kwargs: dict[str, Any] = opt(
        factory=dict,
        help="extra timm.create_model arguments, e.g. {channels: [32, 64, 128, 256]} for a "
        "half-width ResNet that trains on 2 CPU cores",
    )


@dataclass
class DecoderConfig:
    """The head on each local module (LoCo's decoder; SimCLR's projection head)."""

    conv_block: bool = opt(
        False,
        help="one residual conv block with stride-2 before pooling",
    )
    mlp_layers: int = opt(2, help="2 or 4 (paper's Table 4)")
    hidden_dim: int = opt(512, help="hidden width of the projection MLP")
    out_dim: int = opt(128, help="embedding size the contrastive loss sees")


@dataclass
class MethodConfig:
    """The pretraining method. ``name``, ``temperature`` and ``gather_negatives`` apply to
    every method; each other key belongs to the method that lists it in its ``options``
    (:mod:`loco.methods`), and validation rejects it, changed from its default, with any
    other method."""

    name: str = opt("loco", help="a registered method: `loco pretrain --help` lists them")
    objective: str = opt(
        "simclr",
        help="the self-supervised loss every local loss optimises: simclr | mocov3 | byol | "
        "barlow | vicreg (loco.objectives; options in the objective.<name> section)",
    )
    temperature: float = opt(0.2, help="simclr: NT-Xent temperature")
    gather_negatives: bool = opt(
        True,
        help="negatives (mocov3 keys, barlow/vicreg batch statistics) from all ranks",
    )
    # -- loco (and loco_naive) only
    first_stage_loss: bool = opt(
        True,
        help="loco: a loss on the first module too (false: as drawn in the paper's Figure 1)",
    )
    shared_update: str = opt(
        "both",
        help='"both": a shared stage is updated by its own loss and the loss above (the '
        'paper); "upper": by the loss above only (paper\'s Table 5 ablation)',
    )
    # -- infopro only: weights of reconstruction (lambda1) and contrastive (lambda2) loss,
    # interpolated linearly from the first to the last local module
    lambda1_first: float = opt(
        5.0, help="infopro: reconstruction weight at the first module (linear to the last)"
    )
    lambda1_last: float = opt(0.0, help="infopro: reconstruction weight at the last module")
    lambda2_first: float = opt(1.0, help="infopro: contrastive weight at the first module")
    lambda2_last: float = opt(1.0, help="infopro: contrastive weight at the last module")
    supervised: bool = opt(
        False, help="infopro with objective simclr: SupCon with labels instead of NT-Xent"
    )


# -- objectives (loco.objectives): one section per objective, read only by that objective.
# Defaults are each paper's recommended values (docs/methods.md, "Objectives").
@dataclass
class ByolConfig:
    """BYOL (Grill et al. 2020)."""

    base_momentum: float = opt(
        0.996,
        help="byol: target momentum at step 0, raised to 1 on a cosine over the run (paper: 0.996)",
    )


@dataclass
class MocoV3Config:
    """MoCo v3 (Chen, Xie, He 2021)."""

    temperature: float = opt(
        1.0, help="mocov3: InfoNCE temperature (paper's code: 1.0 for ResNets, 0.2 for ViTs)"
    )
    base_momentum: float = opt(
        0.99,
        help="mocov3: key encoder momentum at step 0, raised to 1 on a cosine (paper: 0.99)",
    )


@dataclass
class BarlowConfig:
    """Barlow Twins (Zbontar et al. 2021)."""

    lambd: float = opt(
        5e-3,
        help="barlow: weight of the off-diagonal (redundancy) term (paper: 5e-3 for an "
        "8192-d projector)",
    )
    scale_loss: float = opt(
        1.0,
        help="barlow: factor on the whole loss (the paper's code: 1/32 with LARS; loco's "
        "small configs keep 1)",
    )


@dataclass
class VicRegConfig:
    """VICReg (Bardes, Ponce, LeCun 2022)."""

    sim_coeff: float = opt(25.0, help="vicreg: invariance (MSE) weight lambda (paper: 25)")
    std_coeff: float = opt(25.0, help="vicreg: variance (hinge on the std) weight mu (paper: 25)")
    cov_coeff: float = opt(1.0, help="vicreg: covariance weight nu (paper: 1)")


@dataclass
class ObjectiveConfig:
    """Options of each objective (``method.objective``); a key changed from its default
    for another objective is rejected. simclr reads method.temperature (and
    method.supervised under infopro)."""

    byol: ByolConfig = opt(factory=ByolConfig, help="BYOL (Grill et al. 2020)")
    mocov3: MocoV3Config = opt(factory=MocoV3Config, help="MoCo v3 (Chen, Xie, He 2021)")
    barlow: BarlowConfig = opt(factory=BarlowConfig, help="Barlow Twins (Zbontar et al. 2021)")
    vicreg: VicRegConfig = opt(factory=VicRegConfig, help="VICReg (Bardes, Ponce, LeCun 2022)")


@dataclass
class OptimConfig:
    name: str = opt("lars", help="lars | sgd | adamw")
    batch_size: int = opt(256, help="per process")
    base_lr: float = opt(0.3, help="lr = base_lr * global_batch / 256")
    weight_decay: float = opt(1e-6, help="weight decay (not on biases and norm parameters)")
    momentum: float = opt(0.9, help="momentum of LARS / SGD (AdamW: beta1)")
    epochs: int = opt(100, help="passes over the training set")
    max_steps: int = opt(
        0,
        help="overrides epochs when > 0 (short runs, tests, benchmarks)",
    )
    warmup_epochs: float = opt(
        10.0,
        help="linear warm-up before the cosine decay (fractions allowed)",
    )
    min_lr_ratio: float = opt(0.0, help="final lr as a fraction of the peak lr")
    grad_clip: float = opt(0.0, help="clip the global gradient norm to this (0 = off)")


@dataclass
class TrainConfig:
    output_dir: str = opt(
        "runs/default",
        help="the run directory: config, metrics, checkpoints, results",
    )
    seed: int = opt(0, help="seed of weights, data order and augmentations")
    device: str = opt("auto", help="auto | cpu | cuda")
    precision: str = opt(
        "auto",
        help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32 | fp16 (autocast + gradient "
        "scaling, for GPUs without bf16 such as V100s; one scaler step covers all local "
        "losses of a step)",
    )
    channels_last: bool = opt(True, help="CUDA only")
    compile: bool = opt(False, help="torch.compile every unit of the backbone")
    deterministic: bool = opt(
        False,
        help="deterministic algorithms (slower; bitwise-reproducible runs)",
    )
    log_every: int = opt(10, help="steps between metrics lines")
    ckpt_every: int = opt(500, help="steps; a checkpoint is also written at each epoch end")
    keep_checkpoints: int = opt(
        2,
        help="step checkpoints kept in checkpoints/ (older ones deleted)",
    )
    resume: str = opt(
        "auto",
        help="auto | none | extend | weights:PATH | a checkpoint (loco/resume.py)",
    )
    progress: bool = opt(True, help="a progress bar on the console")
    recompute: str = opt(
        "none",
        help='activation recomputation: "none" | "stage1" | "all" | a plan such as '
        '"S1=3;S2=1" (module k recomputes its first n segments: stem or residual '
        "blocks); `loco bench --recompute auto=RATIO` finds the cheapest plan under a "
        "memory budget and prints it",
    )
    wandb: bool = opt(
        False,
        help="Weights & Biases: the scalars of metrics.jsonl; the W&B run id is kept in the "
        "run dir, so a requeued job continues the same W&B run (WANDB_MODE=offline "
        "works without network)",
    )
    wandb_project: str = opt("loco", help="W&B project")
    wandb_entity: str = opt("", help="W&B entity (team or user; empty = your default)")
    wandb_tags: builtins.list[str] = opt(factory=list, help="W&B tags")
    stage_parallel: int = opt(
        1,
        help="K stage groups x world/K data-parallel replicas: rank (stage k, replica r) holds "
        "local module k and its decoders (loco.parallel; greedy, loco, infopro)",
    )
    stage_schedule: str = opt(
        "sync",
        help="sync (equals the single-process step) | pipelined (batch t+1 enters module k-1 "
        "while module k works on batch t; loco/parallel/stage.py states the staleness)",
    )


@dataclass
class MonitorConfig:
    """Representation quality while pretraining runs."""

    online_linear: bool = opt(True, help="linear head on detached last-stage features")
    knn_every: int = opt(0, help="steps between kNN monitors (0 = off)")
    knn_train_per_class: int = opt(100, help="kNN monitor: training images per class")
    knn_val_per_class: int = opt(50, help="kNN monitor: validation images per class")
    knn_k: int = opt(20, help="kNN monitor: neighbours")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES: dict[str, tuple[str, ...]] = {
    "data.pipeline": ("pil", "tensor"),
    "model.small_image": ("auto", "true", "false"),
    "optim.name": ("lars", "sgd", "adamw"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
    "train.stage_schedule": ("sync", "pipelined"),
}


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; allow int->float and str->number."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise LocoError(f"{where}: expected a mapping such as {{key: value}}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value if value.startswith("[") else f"[{value}]")
        if not isinstance(value, list | tuple):
            raise LocoError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, item_tp, where) for v in value]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, where)
            except LocoError:
                continue
        raise LocoError(f"{where}: {value!r} does not match {tp}")
    if tp is type(None):  # the None of `int | None`: not a catch-all
        if value is None:
            return None
        raise LocoError(f"{where}: expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise LocoError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise LocoError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise LocoError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise LocoError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, bool):
            return str(value).lower()
        raise LocoError(f"{where}: expected a string, got {value!r}")
    return value


def _apply(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        where = f"{prefix}{key}"
        if key not in names:
            raise LocoError(f"unknown config key '{where}'{_suggest(key, names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise LocoError(
                    f"'{where}' is a section; give its keys, e.g. {where}.{names[0]}=..."
                )
            _apply(current, value, prefix=f"{where}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], f"config key '{where}'"))


def _parse_override(text: str) -> dict[str, Any]:
    if "=" not in text:
        raise LocoError(f"override '{text}' is not key=value (e.g. optim.batch_size=128)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    nested: dict[str, Any] = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file, following ``_base_: other.yaml`` (relative to the file)."""
    path = Path(path)
    if not path.is_file():
        raise LocoError(f"config file '{path}' not found; see configs/ for examples")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise LocoError(f"config file '{path}' is not valid YAML: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise LocoError(f"config file '{path}' must hold a mapping of sections")
    base = data.pop("_base_", None)
    if base:
        return _merge(read_yaml(path.parent / base), data)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides, then validated."""
    cfg = Config()
    if path:
        _apply(cfg, read_yaml(path))
    for text in overrides or []:
        _apply(cfg, _parse_override(text))
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    _apply(cfg, data)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    for dotted, options in CHOICES.items():
        section, key = dotted.split(".")
        value = str(getattr(getattr(cfg, section), key)).lower()
        if value not in options:
            raise LocoError(
                f"config key '{dotted}' = {value!r} is not one of {', '.join(options)}"
                f"{_suggest(value, list(options)) if difflib.get_close_matches(value, options, 1, 0.5) else ''}"
            )
    positive = {
        "data.image_size": cfg.data.image_size,
        "optim.batch_size": cfg.optim.batch_size,
        "decoder.out_dim": cfg.decoder.out_dim,
        "decoder.hidden_dim": cfg.decoder.hidden_dim,
        "method.temperature": cfg.method.temperature,
    }
    for key, value in positive.items():
        if value <= 0:
            raise LocoError(f"config key '{key}' must be > 0, got {value}")
    if cfg.decoder.mlp_layers not in (1, 2, 3, 4):
        raise LocoError(f"decoder.mlp_layers must be 1..4, got {cfg.decoder.mlp_layers}")
    if not 0 < cfg.data.crop_scale_min <= 1:
        raise LocoError(f"data.crop_scale_min must be in (0, 1], got {cfg.data.crop_scale_min}")
    for key in ("color_jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
        p = getattr(cfg.data, key)
        if not 0 <= p <= 1:
            raise LocoError(f"data.{key} is a probability in [0, 1], got {p}")
    if cfg.optim.epochs <= 0 and cfg.optim.max_steps <= 0:
        raise LocoError("set optim.epochs or optim.max_steps to a positive number")
    if cfg.data.dataset not in ("cifar10", "clothing", "folder"):
        raise LocoError(
            f"data.dataset '{cfg.data.dataset}' unknown; use cifar10, clothing, or folder with data.root=PATH"
        )
    if cfg.data.dataset == "folder" and not (cfg.data.root or cfg.data.list):
        raise LocoError(
            "data.dataset=folder needs data.root=PATH (an image folder) or data.list=FILE"
        )
    unlabelled = not cfg.data.labels or bool(cfg.data.list)
    if unlabelled and cfg.data.per_class:
        raise LocoError("data.per_class needs class labels; unset it for unlabelled data")
    if unlabelled and cfg.method.supervised:
        raise LocoError("method.supervised=true needs class labels; use data.labels=true")
    from loco.methods import check_method_config  # lazy: the registry imports torch

    check_method_config(cfg.method)
    from loco.objectives import check_objective_config

    check_objective_config(cfg)
    parse_split(cfg.model.split)  # syntax only: the block count is the backbone's
    try:  # the module count is the backbone's: build time checks the range
        parse_recompute_plan(cfg.train.recompute, None)
    except LocoError as exc:
        raise LocoError(f"train.recompute: {exc}") from None
    if cfg.train.stage_parallel < 1:
        raise LocoError(f"train.stage_parallel must be >= 1, got {cfg.train.stage_parallel}")
    if cfg.train.stage_parallel > 1 and cfg.method.name == "e2e":
        raise LocoError(
            "train.stage_parallel>1 needs a local method (greedy, loco, infopro); e2e backpropagates "
            "through every module and keeps plain data parallelism: set train.stage_parallel=1"
        )
    if len(cfg.data.mean) != 3 or len(cfg.data.std) != 3:
        raise LocoError("data.mean and data.std need three values (RGB)")


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
