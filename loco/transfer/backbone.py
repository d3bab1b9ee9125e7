"""A loco backbone (any timm model) as a Detectron2 ``Backbone``, with FPN on top.

The timm model is built and split by :meth:`loco.weights.WeightsSource.build_backbone`
(the one builder of a checkpoint's network) with ``split="stages"``; each stage becomes
one output named after its stride (``res2`` at stride 4 ... ``res5`` at 32), so stock
FPN / RPN / ROI-head configs work unchanged. The weights are the ``backbone`` entry of a
loco checkpoint of any method (or a plain timm / torchvision state dict), read by
:func:`loco.weights.read_weights`.

Config keys (``add_loco_config``)::

    MODEL.LOCO.CHECKPOINT                   loco checkpoint; "" = random init (scratch)
    MODEL.LOCO.BACKBONE                     timm name when the checkpoint holds no config
    MODEL.LOCO.PREFIX                       backbone key prefix in a foreign checkpoint
                                            (None: found by its key names; --prefix)
    MODEL.LOCO.NORM                         FrozenBN | BN | SyncBN for the backbone's BatchNorm
    MODEL.LOCO.OUT_FEATURES                 ["res2", "res3", "res4", "res5"]
    MODEL.LOCO.PIXEL_STATS_FROM_CHECKPOINT  set PIXEL_MEAN/STD, INPUT.FORMAT=RGB from it
    DATASETS.LOCO_FILES                     [name, json, images] registered from files

``MODEL.BACKBONE.FREEZE_AT`` keeps Detectron2's meaning: 0 trains everything, 1 freezes
the stem, k >= 2 the stem and ``res2..res{k}``; 5 freezes the whole backbone (the paper's
readout setting). Frozen parts lose their gradients, their BatchNorm becomes frozen
(running statistics are never updated), and they stay in eval mode even while the
detector trains.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.utils import comm
from timm.layers import convert_sync_batchnorm, freeze_batch_norm_2d

from loco.config import Config, DataConfig, ModelConfig
from loco.errors import LocoError
from loco.models.backbone import StagedBackbone
from loco.weights import WeightsSource, read_weights

log = logging.getLogger(__name__)

NORMS = ("FrozenBN", "BN", "SyncBN")
PROBE_SIZE = 128  # input side the staged backbone is built for
# input sides at which each stage's stride is measured: multiples of 32 with different odd
# factors, so a resizing stage (e.g. 224 -> 36 px) cannot pass as a power of two at both
PROBE_SIZES = (128, 224)


def add_loco_config(cfg: CfgNode) -> CfgNode:
    """Add the ``MODEL.LOCO`` keys (idempotent) and return ``cfg``."""
    if "LOCO" in cfg.MODEL:
        return cfg
    cfg.MODEL.LOCO = CfgNode()
    cfg.MODEL.LOCO.CHECKPOINT = ""
    cfg.MODEL.LOCO.BACKBONE = "resnet50"
    cfg.MODEL.LOCO.PREFIX = None
    cfg.MODEL.LOCO.NORM = "FrozenBN"
    cfg.MODEL.LOCO.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.LOCO.PIXEL_STATS_FROM_CHECKPOINT = True
    # [name, json, image folder] of datasets registered from files, so that a saved
    # config.yaml registers them again
    cfg.DATASETS.LOCO_FILES = []
    return cfg


@dataclass
class LocoCheckpoint:
    """What a detector needs from a pretraining checkpoint."""

    model: ModelConfig
    pretrain_image_size: int
    mean: list[float]  # RGB, 0..1 scale
    std: list[float]
    method: str
    weights: WeightsSource  # timm weights (state None: random init), what builds them
    source: str


def read_loco_checkpoint(cfg: CfgNode) -> LocoCheckpoint:
    """The weights ``MODEL.LOCO`` names: a loco checkpoint (``backbone`` + ``config``), or a
    foreign one (its backbone under ``PREFIX``, the architecture ``BACKBONE``).

    ``CHECKPOINT=""`` gives a randomly initialised ``BACKBONE`` with ImageNet statistics.
    """
    path, prefix = cfg.MODEL.LOCO.CHECKPOINT, cfg.MODEL.LOCO.get("PREFIX")
    data = DataConfig()
    plain = ModelConfig(backbone=cfg.MODEL.LOCO.BACKBONE, small_image="false")
    if not path:
        scratch = read_weights(None, random_init=True)
        return LocoCheckpoint(
            plain, 224, data.mean, data.std, "random-init", scratch, "random init"
        )
    source = read_weights(path, prefix=prefix)
    cfg = source.config or Config(model=plain)  # plain state dict: MODEL.LOCO.BACKBONE
    return LocoCheckpoint(
        cfg.model,
        cfg.data.image_size,
        list(cfg.data.mean),
        list(cfg.data.std),
        source.method,
        source,
        path,
    )


def _is_small_image(model: ModelConfig, image_size: int) -> bool:
    value = str(model.small_image).lower()
    return image_size <= 64 if value == "auto" else value == "true"


def build_staged(source: LocoCheckpoint) -> StagedBackbone:
    """The checkpoint's timm model, split into its feature stages, weights loaded.

    A CIFAR-style stem (3x3 stride-1 conv, no max-pool) is run at stride 4 here (stride-2
    conv and a max-pool; both parameter-free changes), so ``res2..res5`` keep strides 4..32.
    """
    small = _is_small_image(source.model, source.pretrain_image_size)
    model_cfg = dataclasses.replace(
        source.model,
        small_image="true" if small else "false",
        split="stages",
        sync_bn=False,
        drop_path_rate=0.0,
    )
    staged = source.weights.build_backbone(model_cfg, PROBE_SIZE)
    if small:
        body = staged.body
        if not (isinstance(getattr(body, "conv1", None), nn.Conv2d) and hasattr(body, "maxpool")):
            raise LocoError(
                f"'{source.source}' was pretrained with a small-image stem on {model_cfg.backbone}, "
                "which cannot run at detection strides; pretrain with model.small_image=false"
            )
        body.conv1.stride = (2, 2)
        body.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        log.warning(
            "%s was pretrained with a small-image stem (%d px): running its conv1 at stride 2 "
            "with a max-pool so res2..res5 have strides 4..32",
            source.source,
            source.pretrain_image_size,
        )
    return staged


class LocoBackbone(Backbone):
    """A :class:`StagedBackbone`'s stages as Detectron2 features ``res2..res5``."""

    def __init__(
        self,
        staged: StagedBackbone,
        out_features: list[str] | tuple[str, ...] = ("res2", "res3", "res4", "res5"),
        freeze_at: int = 0,
        norm: str = "FrozenBN",
        device: str = "cpu",
    ) -> None:
        super().__init__()
        self.staged = staged
        strides, channels = self._probe(staged)
        self.stage_names = [f"res{int(math.log2(s))}" for s in strides]
        missing = [f for f in out_features if f not in self.stage_names]
        if missing:
            raise LocoError(
                f"MODEL.LOCO.OUT_FEATURES {list(missing)} not produced by {staged.name}; "
                f"it has {', '.join(self.stage_names)}"
            )
        self._out_features = list(out_features)
        self._out_feature_strides = {n: s for n, s in zip(self.stage_names, strides)}
        self._out_feature_channels = {n: c for n, c in zip(self.stage_names, channels)}
        self._last_stage = max(self.stage_names.index(f) for f in self._out_features)
        self._frozen: list[str] = []  # module paths in the timm model kept in eval mode
        self._set_norm(norm, device)
        self.freeze(freeze_at)

    @staticmethod
    def _probe(staged: StagedBackbone) -> tuple[list[int], list[int]]:
        """Each stage's (stride, channels), from its output size at :data:`PROBE_SIZES`.

        Detectron2's FPN adds each level to the 2x upsampled level above, so every stride
        must be an exact power of two, the same at every input size, increasing by stage.
        """
        ratios: list[list[float]] = []
        was_training = staged.training
        staged.eval()
        with torch.no_grad():
            for size in PROBE_SIZES:
                outs = staged(torch.zeros(1, 3, size, size))
                if any(o.dim() != 4 for o in outs):
                    staged.train(was_training)
                    raise LocoError(
                        f"{staged.name} produces tokens, not feature maps; Detectron2 transfer "
                        "needs a convolutional backbone (ResNet, ConvNeXt, RegNet, ...)"
                    )
                ratios.append([size / o.shape[-1] for o in outs])
        staged.train(was_training)
        strides = [round(r) for r in ratios[0]]
        exact = all(
            r == s
            for size, per_size in zip(PROBE_SIZES, ratios)
            for r, s in zip(per_size, strides)
            if size % s == 0  # a stride-64 stage is not exact at 224 px, and need not be
        )
        powers = all(s >= 2 and not s & (s - 1) for s in strides)
        if not (exact and powers and strides == sorted(set(strides))):
            shown = ", ".join(f"{r:.3g}" for r in ratios[-1])
            raise LocoError(
                f"{staged.name}: stage strides {shown} (input / feature-map side at "
                f"{PROBE_SIZES[-1]} px) are not increasing powers of two, which Detectron2's "
                "FPN needs, so this backbone cannot be used for transfer; pick a backbone with "
                "strided stages (ResNet, ConvNeXt, RegNet, ...)"
            )
        return strides, [o.shape[1] for o in outs]

    @property
    def body(self) -> nn.Module:
        """The timm model; its state dict is a loco checkpoint's ``backbone`` entry."""
        return self.staged.body

    def _set_norm(self, norm: str, device: str) -> None:
        if norm not in NORMS:
            raise LocoError(f"MODEL.LOCO.NORM={norm!r} is not one of {', '.join(NORMS)}")
        if norm == "FrozenBN":
            self.staged.body = freeze_batch_norm_2d(self.staged.body)
        elif norm == "SyncBN":
            if comm.get_world_size() > 1 and str(device).startswith("cuda"):
                self.staged.body = convert_sync_batchnorm(self.staged.body)
            else:
                log.warning(
                    "MODEL.LOCO.NORM=SyncBN needs several CUDA processes (world size %d, device "
                    "%s): the backbone keeps plain BatchNorm",
                    comm.get_world_size(),
                    device,
                )

    def freeze(self, freeze_at: int) -> LocoBackbone:
        """Freeze the stem (``freeze_at >= 1``) and the stages ``res2..res{freeze_at}``."""
        if not 0 <= freeze_at <= 5:
            raise LocoError(f"MODEL.BACKBONE.FREEZE_AT={freeze_at} must be in 0..5")
        body = self.staged.body
        frozen: set[str] = set()
        units: set[str] = set()
        for k, name in enumerate(self.stage_names):
            level = int(name[3:])
            for unit in self.staged.groups[k]:
                units.add(unit.path)
                if level <= freeze_at or (freeze_at >= 1 and not unit.is_block):
                    module = body.get_submodule(unit.path)
                    for p in module.parameters():
                        p.requires_grad_(False)
                    new = freeze_batch_norm_2d(module)
                    if new is not module:  # the unit is itself a BatchNorm (a stem part)
                        parent, _, attr = unit.path.rpartition(".")
                        setattr(body.get_submodule(parent) if parent else body, attr, new)
                    frozen.add(unit.path)
        self._frozen = self._eval_roots(body, frozen, units)
        self.train(self.training)
        return self

    @staticmethod
    def _eval_roots(body: nn.Module, frozen: set[str], units: set[str]) -> list[str]:
        """The fewest module paths covering the frozen units: a container whose children
        are all frozen (or never run: modules past the last stage) counts as frozen."""
        roots: list[str] = []

        def visit(module: nn.Module, path: str) -> bool:
            if path in frozen:
                return True
            children = list(module.named_children())
            if not children:
                return path not in units and not any(path.startswith(u + ".") for u in units)
            done = [visit(child, f"{path}.{name}" if path else name) for name, child in children]
            return all(done)

        def collect(module: nn.Module, path: str) -> None:
            if visit(module, path):
                roots.append(path)
                return
            for name, child in module.named_children():
                collect(child, f"{path}.{name}" if path else name)

        collect(body, "")
        return roots if frozen else []

    def train(self, mode: bool = True) -> LocoBackbone:
        super().train(mode)
        body = self.staged.body
        for path in self._frozen:
            (body.get_submodule(path) if path else body).eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outs = {}
        for k in range(self._last_stage + 1):
            x = self.staged.forward_module(k, x)
            if self.stage_names[k] in self._out_features:
                outs[self.stage_names[k]] = x
        return outs


def build_loco_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> LocoBackbone:
    """``MODEL.BACKBONE.NAME: build_loco_backbone``: the loco backbone alone."""
    if input_shape.channels != 3:
        raise LocoError(f"loco backbones take 3-channel images, not {input_shape.channels}")
    source = read_loco_checkpoint(cfg)
    log.info(
        "backbone: %s (%s) from %s, FREEZE_AT=%d, norm %s",
        source.model.backbone,
        source.method,
        source.source,
        cfg.MODEL.BACKBONE.FREEZE_AT,
        cfg.MODEL.LOCO.NORM,
    )
    return LocoBackbone(
        build_staged(source),
        cfg.MODEL.LOCO.OUT_FEATURES,
        cfg.MODEL.BACKBONE.FREEZE_AT,
        cfg.MODEL.LOCO.NORM,
        cfg.MODEL.DEVICE,
    )


def build_loco_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """``MODEL.BACKBONE.NAME: build_loco_fpn_backbone``: FPN over the loco backbone."""
    return FPN(
        bottom_up=build_loco_backbone(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


def register() -> None:
    """Add both builders to ``BACKBONE_REGISTRY`` unless already there (safe to repeat)."""
    for fn in (build_loco_backbone, build_loco_fpn_backbone):
        if fn.__name__ not in BACKBONE_REGISTRY:
            BACKBONE_REGISTRY.register(fn)


register()
