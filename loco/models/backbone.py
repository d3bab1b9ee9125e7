"""A timm backbone cut into K local modules.

The timm model itself owns every parameter, so the backbone's state dict is exactly
timm's (minus the classifier) and a pretrained loco backbone loads into
``timm.create_model(name, num_classes=0)`` unchanged. The local modules are views over
it: each is an ordered list of *units* (a stem, a residual block, a transformer block)
addressed by their path in the timm model. Stage boundaries come from timm's
``feature_info``, never from per-architecture lists.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import timm
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from loco.config import ModelConfig
from loco.errors import LocoError
from loco.models.balance import MEASURE_BATCH, balanced_cuts, measure_blocks
from loco.plans import parse_split

log = logging.getLogger("loco.models")

VIT_EMBED = "<embed>"  # pseudo-unit: patch embedding + position embedding of a ViT


@dataclass(frozen=True)
class Unit:
    path: str  # module path in the timm model (or VIT_EMBED)
    stage: int  # index of the timm feature stage it belongs to
    is_block: bool = True  # False for stem parts, which join the first block
    trailing: bool = (
        False  # after the last feature stage (a ViT's final norm): joins the last block
    )


class _ViTEmbed(nn.Module):
    """Runs a timm ViT's token embedding; holds no parameters of its own."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_vit", model)  # not registered: the body owns it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self._vit
        x = vit.patch_embed(x)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        return vit.norm_pre(x)


def _run_sequence(mods: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for mod in mods:
        x = mod(x)
    return x


def _is_small_image(cfg: ModelConfig, image_size: int) -> bool:
    value = str(cfg.small_image).lower()
    return image_size <= 64 if value == "auto" else value == "true"


def _make_small_image(model: nn.Module, name: str) -> bool:
    """CIFAR stem: 3x3 stride-1 conv, no max-pool. Returns False if the model has no such stem."""
    conv = getattr(model, "conv1", None)
    if isinstance(conv, nn.Conv2d) and hasattr(model, "maxpool"):
        model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
        return True
    stem = getattr(model, "stem", None)  # ConvNeXt-style patchify stem
    if isinstance(stem, nn.Sequential) and isinstance(stem[0], nn.Conv2d):
        c = stem[0]
        stem[0] = nn.Conv2d(c.in_channels, c.out_channels, 3, 1, 1, bias=c.bias is not None)
        return True
    return False


def _flatten(module: nn.Module, path: str) -> list[str]:
    """Block-level paths inside a timm stage, where the stage is a plain sequence of blocks."""
    if isinstance(module, nn.Sequential) and len(module) > 0:
        return [f"{path}.{name}" for name, _ in module.named_children()]
    blocks = getattr(module, "blocks", None)
    if isinstance(blocks, nn.Sequential) and isinstance(
        getattr(module, "downsample", None), nn.Module
    ):
        if type(module).forward.__qualname__.startswith(("ConvNeXtStage",)):
            return [f"{path}.downsample"] + [
                f"{path}.blocks.{n}" for n, _ in blocks.named_children()
            ]
    return [path]


def _walk_units(model: nn.Module) -> list[Unit]:
    """Execution-ordered units of a timm model up to its last feature stage."""
    info = model.feature_info
    names = [f["module"] for f in info]
    reductions = [f["reduction"] for f in info]
    # stage boundaries: feature points past the stem (reduction >= 4); ViT-like models with
    # many equal-stride blocks are grouped into 4 stages.
    bounds = [n for n, r in zip(names, reductions) if r >= 4] or names[-1:]
    if len(bounds) > 5 and len(set(reductions)) == 1:
        step = len(bounds) / 4
        bounds = [bounds[round(step * (i + 1)) - 1] for i in range(4)]
    last = names[-1]

    paths: list[str] = []

    def visit(mod: nn.Module, prefix: str) -> bool:  # returns True once `last` is reached
        for child_name, child in mod.named_children():
            path = f"{prefix}{child_name}"
            if any(n.startswith(path + ".") for n in names):
                if visit(child, path + "."):
                    return True
                continue
            if path in names:
                paths.extend(_flatten(child, path))
            else:
                paths.append(path)
            if path == last:
                return True
        return False

    if hasattr(model, "_pos_embed"):  # ViT: replace the embedding modules by one pseudo-unit
        paths.append(VIT_EMBED)
        visit(model.blocks, "blocks.")
    else:
        visit(model, "")

    units, stage = [], 0
    for path in paths:
        owner = (
            path if path in bounds else next((b for b in bounds if path.startswith(b + ".")), None)
        )
        units.append(Unit(path, stage, is_block=owner is not None))
        is_last_of_bound = owner is not None and (
            path == owner
            or not any(p.startswith(owner + ".") for p in paths[paths.index(path) + 1 :])
        )
        if is_last_of_bound and stage < len(bounds) - 1:
            stage += 1
    return units


def resolve_split(
    units: list[Unit], split: object, costs: Sequence[float] | None = None
) -> list[list[Unit]]:
    """Group units into local modules per ``model.split`` (grammar: :func:`loco.plans.parse_split`).

    A block is a unit after the stem; the stem joins the first block. ``balanced:K`` needs
    ``costs``, one per block (:func:`loco.models.balance.measure_blocks`)."""
    spec = parse_split(split)
    n_stages = max(u.stage for u in units) + 1
    first_block = next(i for i, u in enumerate(units) if u.is_block)
    n_blocks = len(units) - first_block
    if spec.kind == "stages":
        groups = [[u for u in units if u.stage == s] for s in range(n_stages)]
        return [g for g in groups if g]
    if spec.kind in ("count", "balanced") and not 1 <= spec.count <= n_blocks:
        raise LocoError(
            f"model.split={split!r}: {spec.count} local modules is impossible: this backbone has "
            f"{n_blocks} blocks; use 1..{n_blocks} modules, 'stages' or 'blocks'"
        )
    if spec.kind == "blocks":
        blocks = list(range(1, n_blocks))
    elif spec.kind == "count":
        blocks = [round(i * n_blocks / spec.count) for i in range(1, spec.count)]
    elif spec.kind == "balanced":
        if costs is None or len(costs) != n_blocks:
            raise ValueError(f"balanced split needs one cost per block ({n_blocks})")
        blocks = balanced_cuts(costs, spec.count)
    else:
        blocks = list(spec.cuts)
        if not all(0 < c < n_blocks for c in blocks):
            raise LocoError(
                f"model.split cut points {blocks} are invalid: give increasing block indices in "
                f"1..{n_blocks - 1} (this backbone has {n_blocks} blocks; a module starts at each cut)"
            )
    edges = [0, *(first_block + c for c in blocks), len(units)]
    return [units[a:b] for a, b in zip(edges[:-1], edges[1:])]


def split_cuts(groups: list[list[Unit]]) -> list[int]:
    """The block indices where modules 2..K start (the list form of any split)."""
    first_block = next(i for i, u in enumerate(groups[0]) if u.is_block)
    cuts, seen = [], -first_block
    for g in groups[:-1]:
        seen += len(g)
        cuts.append(seen)
    return cuts


class StagedBackbone(nn.Module):
    """A timm model plus a split into local modules.

    ``forward_module(k, x)`` runs local module k; ``forward(x)`` runs them all and returns
    every module's output (feature maps ``[B,C,H,W]``, or tokens ``[B,N,C]`` for ViTs).
    """

    def __init__(self, model: nn.Module, groups: list[list[Unit]], name: str, image_size: int):
        super().__init__()
        self.body = model
        self.name = name
        self.groups = groups
        self._segments = [self._make_segments(g) for g in groups]
        # recompute[k]: True = module k keeps only its segments' inputs and recomputes each
        # segment (the stem, or one residual/transformer block) during backward; an int n =
        # only its first n segments; False = keep all activations.
        self.recompute: list[bool | int] = [False] * len(groups)
        # entered around every recomputation (loco.profiling counts what it keeps alive)
        self.recompute_context: Callable[[], contextlib.AbstractContextManager] | None = None
        self._embed = _ViTEmbed(model) if hasattr(model, "_pos_embed") else None
        with torch.no_grad():
            was_training = model.training
            model.eval()
            outs = self.forward(torch.zeros(1, 3, image_size, image_size))
            model.train(was_training)
        self.channels = [o.shape[-1] if o.dim() == 3 else o.shape[1] for o in outs]
        self.reductions = [image_size // o.shape[-1] if o.dim() == 4 else 0 for o in outs]
        self.image_size = image_size
        self.cuts = split_cuts(groups)  # block indices where modules 2..K start
        self.block_costs: list[int] | None = None  # per block, for a balanced split

    @property
    def num_modules(self) -> int:
        return len(self.groups)

    def unit_module(self, unit: Unit) -> nn.Module:
        if unit.path == VIT_EMBED:
            assert self._embed is not None
            return self._embed
        return self.body.get_submodule(unit.path)

    def module_parameters(self, k: int) -> list[nn.Parameter]:
        """The trainable parameters of local module k: what every method and the reference
        step update for it (from :func:`unit_parameters`, never from ``unit_module``)."""
        return _unique([p for seg in self.segment_parameters(k) for p in seg])

    def segment_parameters(self, k: int) -> list[list[nn.Parameter]]:
        """The trainable parameters of each of module k's recomputation segments."""
        return [
            _unique([p for u in seg for p in unit_parameters(self.body, u)])
            for seg in self.segments(k)
        ]

    def segments(self, k: int) -> list[list[Unit]]:
        """Module k's units in recomputation segments: one per block, and one for each run of
        stem parts (a stem part alone would keep its input and save nothing)."""
        return self._segments[k]

    @staticmethod
    def _make_segments(units: list[Unit]) -> list[list[Unit]]:
        out: list[list[Unit]] = []
        for unit in units:
            if unit.trailing and out:  # a final norm alone would recompute nothing worth it
                out[-1].append(unit)
            elif not unit.is_block and out and not out[-1][-1].is_block:
                out[-1].append(unit)
            else:
                out.append([unit])
        return out

    def compile_units(self, **options: object) -> None:
        """``torch.compile`` every unit in place (``nn.Module.compile``: state_dict keys stay
        as they are, so checkpoints load either way). Graph breaks fall at unit edges, where
        local methods detach and recompute anyway."""
        # LoCo backpropagates a middle module twice (retain_graph): compiled backward graphs
        # must not donate (reuse) their saved buffers then
        torch._functorch.config.donated_buffer = False
        for unit in (u for g in self.groups for u in g):
            if unit.path != VIT_EMBED:  # a pseudo-unit over several ViT modules: left eager
                self.unit_module(unit).compile(**options)

    def recomputed_segments(self, k: int) -> int:
        r = self.recompute[k]
        if isinstance(r, bool):
            return len(self.segments(k)) if r else 0
        return max(0, min(int(r), len(self.segments(k))))

    def forward_module(self, k: int, x: torch.Tensor) -> torch.Tensor:
        n_recompute = (
            self.recomputed_segments(k) if self.training and torch.is_grad_enabled() else 0
        )
        for i, segment in enumerate(self.segments(k)):
            mods = [self.unit_module(u) for u in segment]
            if i < n_recompute:
                x = checkpoint(
                    _run_sequence,
                    mods,
                    x,
                    use_reentrant=False,
                    context_fn=functools.partial(self._checkpoint_contexts, mods),
                )
            else:
                x = _run_sequence(mods, x)
        return x

    def _checkpoint_contexts(
        self, mods: list[nn.Module]
    ) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), self._recomputation(mods)

    @contextlib.contextmanager
    def _recomputation(self, mods: list[nn.Module]) -> Iterator[None]:
        """Entered by the checkpoint when it reruns ``mods`` (so hooks see its own hooks)."""
        observe = self.recompute_context() if self.recompute_context else contextlib.nullcontext()
        with observe, batchnorm_stats_kept(mods):
            yield

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for k in range(self.num_modules):
            x = self.forward_module(k, x)
            outs.append(x)
        return outs

    def forward_graph(self, k: int, x: torch.Tensor, passes: int = 1) -> ModuleGraph:
        """Run module k for a backward in ``passes`` (1 or 2) explicit passes; see :class:`ModuleGraph`."""
        return ModuleGraph(self, k, x, passes)

    def iter_modules(self) -> Iterator[int]:
        return iter(range(self.num_modules))

    def describe(self) -> str:
        rows = []
        for k, g in enumerate(self.groups):
            first, last = g[0].path, g[-1].path
            span = first if first == last else f"{first} .. {last}"
            rows.append(f"  S{k + 1}: {span} ({len(g)} units) -> {self.channels[k]} ch")
        return "\n".join(rows)


class ModuleGraph:
    """Module k's forward, kept for an explicit backward in one or two passes.

    Local methods backpropagate module by module. With two passes (LoCo's middle modules:
    first the input gradient for the module below, later the weight gradient once the loss
    above has sent its cotangent) ``torch.utils.checkpoint`` would recompute a segment for
    each pass. Here the recomputed segments (``backbone.recompute[k]``) keep their
    activations through the first pass, which frees them, and the last pass recomputes each
    segment once, top-down, so only one segment's activations are alive at a time. With one
    pass a recomputed segment keeps only its input from the start, as a checkpoint does.

    The recomputed segments form a chain of graphs joined at detached boundaries (their
    inputs, which are kept); the segments above them form one ordinary graph. A recomputed
    segment sees the same random numbers again and leaves BatchNorm's running statistics as
    the first forward left them, so a step with recomputation equals one without.
    """

    def __init__(self, backbone: StagedBackbone, k: int, x: torch.Tensor, passes: int = 1) -> None:
        if passes not in (1, 2):
            raise ValueError("passes must be 1 or 2")
        grad = backbone.training and torch.is_grad_enabled()
        n = backbone.recomputed_segments(k) if grad else 0
        self.x = x
        self.modules = [[backbone.unit_module(u) for u in seg] for seg in backbone.segments(k)]
        self.params = backbone.segment_parameters(k)
        self.n_recomputed = n
        self.passes_left = passes
        self.inputs: list[torch.Tensor] = []  # input of each recomputed segment (kept)
        self.outputs: list[torch.Tensor | None] = []  # its output, while its graph is kept
        self.rng: list[_RngState] = []
        h = x
        for j in range(n):
            h_in = x if j == 0 else h.detach().requires_grad_(True)
            self.rng.append(_RngState(h_in.device))
            with torch.set_grad_enabled(passes == 2):
                h = _run_sequence(self.modules[j], h_in)
            self.inputs.append(h_in)
            self.outputs.append(h if passes == 2 else None)
        self.top_input = h.detach().requires_grad_(True) if n else x
        self.output = _run_sequence([m for seg in self.modules[n:] for m in seg], self.top_input)

    def input_grad(self, cotangent: torch.Tensor) -> torch.Tensor:
        """First of two passes: the gradient of <output, cotangent> w.r.t. the module's input
        only. Keeps the top graph for :meth:`backward`; frees the recomputed segments'."""
        assert self.passes_left == 2, "input_grad is the first of two passes"
        self.passes_left = 1
        g = cotangent
        if self.output is not self.top_input:
            (g,) = torch.autograd.grad(self.output, self.top_input, g, retain_graph=True)
        for j in reversed(range(self.n_recomputed)):
            out, self.outputs[j] = self.outputs[j], None
            (g,) = torch.autograd.grad(out, self.inputs[j], g)
        return g

    def backward(self, cotangent: torch.Tensor, input_grad: bool = False) -> torch.Tensor | None:
        """The last pass: weight gradients into ``.grad``, and the input's gradient if asked.
        Recomputes each recomputed segment once, top-down."""
        assert self.passes_left >= 1, "the graph was already used"
        self.passes_left = 0
        n, g = self.n_recomputed, cotangent
        want_x = input_grad and self.x.requires_grad
        if self.output is not self.top_input:
            g = _backward(
                self.output,
                g,
                _unique([p for seg in self.params[n:] for p in seg]),
                self.top_input if n or want_x else None,
            )
        for j in reversed(range(n)):
            self.outputs[j] = None
            h_in = self.inputs[j]
            with self.rng[j].restored(), batchnorm_stats_kept(self.modules[j]):
                out = _run_sequence(self.modules[j], h_in)
            g = _backward(out, g, self.params[j], h_in if j > 0 or want_x else None)
        return g if want_x else None


def _unique(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """Trainable parameters, each once, in first-seen order."""
    seen: dict[int, nn.Parameter] = {}
    for p in params:
        if p.requires_grad:
            seen.setdefault(id(p), p)
    return list(seen.values())


def _backward(
    out: torch.Tensor,
    cotangent: torch.Tensor,
    params: list[nn.Parameter],
    leaf: torch.Tensor | None,
) -> torch.Tensor | None:
    """Accumulate d<out, cotangent>/dparams into ``.grad``; return d/d``leaf`` (if given)."""
    inputs = [*params, *([leaf] if leaf is not None else [])]
    if leaf is None:
        torch.autograd.backward(out, cotangent, inputs=inputs)
        return None
    leaf.grad = None
    torch.autograd.backward(out, cotangent, inputs=inputs)
    g, leaf.grad = leaf.grad, None
    return g


@contextlib.contextmanager
def batchnorm_stats_kept(modules: list[nn.Module]) -> Iterator[None]:
    """Run a forward again without updating BatchNorm running statistics a second time
    (plain activation checkpointing would count the batch twice)."""
    norms = [
        m
        for mod in modules
        for m in mod.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    names = ("running_mean", "running_var", "num_batches_tracked")
    kept = [{n: getattr(m, n) for n in names} for m in norms]
    for m, buffers in zip(norms, kept, strict=True):
        for n, b in buffers.items():  # the rerun updates scratch copies, the originals stay
            setattr(m, n, b.clone())
    try:
        yield
    finally:
        for m, buffers in zip(norms, kept, strict=True):
            for n, b in buffers.items():
                setattr(m, n, b)


class _RngState:
    """The random-number state a segment ran with, to run it again identically."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def _stem_width_ignored(model: nn.Module, cfg: ModelConfig) -> bool:
    """timm accepts some arguments it then ignores; a config that sets one describes a network
    that is not the one built. Detectable: ``stem_width`` on a ResNet whose stem is the single
    7x7 conv (always 64 channels; timm reads stem_width only for deep stems)."""
    return (
        "stem_width" in cfg.kwargs
        and isinstance(model, timm.models.resnet.ResNet)
        and isinstance(model.conv1, nn.Conv2d)
    )


def _reject_ignored_kwargs(model: nn.Module, cfg: ModelConfig) -> None:
    if _stem_width_ignored(model, cfg):
        raise LocoError(
            f"model.kwargs.stem_width={cfg.kwargs['stem_width']} has no effect on "
            f"'{cfg.backbone}': timm uses it only with a deep stem (stem_type: deep or "
            "deep_tiered), the plain stem has 64 channels; remove stem_width (the same network; "
            "a checkpoint saved with it loads without it)"
        )


def drop_ignored_kwargs(cfg: ModelConfig, source: str) -> ModelConfig:
    """``cfg`` (a checkpoint's saved model section) without the ``kwargs`` timm ignored for it,
    each dropped with a one-line warning: checkpoints saved before loco refused them hold the
    same network, so they still resume, evaluate and transfer. Other configs: ``cfg`` itself."""
    if "stem_width" not in cfg.kwargs:  # the one such key: nothing to build for the rest
        return cfg
    try:
        with torch.device("meta"):  # the architecture alone: no memory, no initialisation
            model = timm.create_model(
                cfg.backbone, num_classes=0, pretrained=False, **timm_kwargs(cfg, 224)
            )
    except Exception:  # noqa: BLE001 - building it for real reports the problem
        return cfg
    if not _stem_width_ignored(model, cfg):
        return cfg
    kwargs = {k: v for k, v in cfg.kwargs.items() if k != "stem_width"}
    log.warning(
        "%s: dropped model.kwargs.stem_width=%s from its saved config: timm ignores it for "
        "the plain stem of '%s' (the same network and weights)",
        source,
        cfg.kwargs["stem_width"],
        cfg.backbone,
    )
    return replace(cfg, kwargs=kwargs)


def _check_every_parameter_trained(model: nn.Module, units: list[Unit], name: str) -> None:
    """A timm parameter that no local module lists would silently keep its initial value."""
    listed = {id(p) for u in units for p in unit_parameters(model, u)}
    orphans = [n for n, p in model.named_parameters() if id(p) not in listed]
    if orphans:
        few = ", ".join(orphans[:4]) + (f" (+{len(orphans) - 4} more)" if len(orphans) > 4 else "")
        raise LocoError(
            f"timm backbone '{name}': parameters {few} belong to no local module, so no method "
            "would train them; this architecture is not supported (pick another timm model)"
        )


def unit_parameters(model: nn.Module, unit: Unit) -> list[nn.Parameter]:
    """The timm parameters a unit runs with: the one place that says which parameters a local
    module trains. A ViT's embedding pseudo-unit owns no module of its own, so its parameters
    (patch embedding, ``norm_pre``, the class/position tokens held by the ViT itself) are
    listed here; everything else is the unit module's ``parameters()``."""
    if unit.path == VIT_EMBED:
        return [
            *model.patch_embed.parameters(),
            *model.norm_pre.parameters(),
            *model.parameters(recurse=False),  # cls_token, pos_embed, reg_token
        ]
    return list(model.get_submodule(unit.path).parameters())


def _finish_units(
    model: nn.Module, units: list[Unit], image_size: int
) -> tuple[list[Unit], list[str]]:
    """What timm runs around the feature stages, found by running ``forward_features`` once.

    Returns the *trailing* units (modules that ``forward_features`` runs after the last
    feature stage, e.g. a ViT's final ``norm`` or EfficientNet's ``conv_head``/``bn2``: they
    join the last local module and are trained with it) and the *head* modules (modules whose
    parameters ``forward_features`` never uses, e.g. ConvNeXt's ``head.norm`` and
    MobileNetV3's ``conv_head``, which timm applies after global pooling: they are part of the
    classifier head, which a backbone does not have, so the caller removes them).
    """
    ran: list[str] = []
    hooks = [
        mod.register_forward_pre_hook(lambda _m, _a, path=path: ran.append(path))
        for path, mod in model.named_modules()
        if path
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.enable_grad():
            out = model.forward_features(torch.zeros(1, 3, image_size, image_size))
            out.float().sum().backward()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    model.zero_grad(set_to_none=True)

    last = units[-1].path
    end = max(i for i, path in enumerate(ran) if path == last or path.startswith(last + "."))
    trailing: list[str] = []
    for path in ran[end + 1 :]:
        inside = any(path.startswith(t + ".") for t in trailing)
        if not inside and path not in trailing:
            if not isinstance(model.get_submodule(path), nn.Identity):
                trailing.append(path)
    stage = units[-1].stage
    head = sorted({name.rpartition(".")[0] for name in unused} - set(ran) - {""})
    return [Unit(path, stage, is_block=False, trailing=True) for path in trailing], head


def timm_kwargs(cfg: ModelConfig, image_size: int) -> dict[str, object]:
    """The ``timm.create_model`` arguments that shape the weights (what an export records)."""
    kwargs = dict(cfg.kwargs)
    if "vit" in cfg.backbone or "deit" in cfg.backbone:
        kwargs["img_size"] = image_size
        kwargs["dynamic_img_size"] = True
    return kwargs


def build_backbone(
    cfg: ModelConfig, image_size: int, cuts: Sequence[int] | None = None
) -> StagedBackbone:
    """Create the timm model named by ``cfg.backbone`` and split it per ``cfg.split``.

    ``cuts``: the cut points a ``balanced:K`` run chose (its checkpoint's
    ``meta.split_cuts``), used instead of measuring again so a resume splits the same way."""
    import loco.models.presnet  # noqa: F401  (registers presnet50* with timm; not on --help's path)

    kwargs: dict[str, object] = {
        "num_classes": 0,
        "pretrained": False,
        **timm_kwargs(cfg, image_size),
    }
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    try:
        model = timm.create_model(cfg.backbone, **kwargs)
    except RuntimeError as exc:
        close = timm.list_models(f"*{cfg.backbone.split('_')[0]}*")[:5]
        hint = f"; similar: {', '.join(close)}" if close else "; see timm.list_models()"
        raise LocoError(f"unknown timm backbone '{cfg.backbone}' ({exc}){hint}") from None
    except TypeError as exc:
        raise LocoError(f"timm backbone '{cfg.backbone}' rejected its options: {exc}") from None
    _reject_ignored_kwargs(model, cfg)
    if not getattr(model, "feature_info", None):
        raise LocoError(
            f"timm backbone '{cfg.backbone}' has no feature_info, so its stages are unknown; "
            "pick a model with feature support (timm.list_models(pretrained=False))"
        )
    if _is_small_image(cfg, image_size) and not _make_small_image(model, cfg.backbone):
        if str(cfg.small_image).lower() == "true":
            raise LocoError(
                f"model.small_image=true is not supported for '{cfg.backbone}' (no conv1/maxpool "
                "or stem conv); set model.small_image=false"
            )
    units = _walk_units(model)
    spec = parse_split(cfg.split)
    costs: list[int] | None = None
    if spec.kind == "balanced" and cuts is not None:
        groups = resolve_split(units, list(cuts))  # a resumed run: the cuts it trained with
        if len(groups) != spec.count:
            raise LocoError(
                f"model.split={cfg.split!r} but the checkpoint's cuts {list(cuts)} give "
                f"{len(groups)} modules; resume with the run's own config"
            )
    elif spec.kind == "balanced":
        costs = block_costs(model, units, image_size, spec.metric)
        groups = resolve_split(units, cfg.split, costs)
        log.info(
            "model.split=%s: cuts %s from per-block %s (fp32, CPU, batch %d, %d px)",
            cfg.split,
            split_cuts(groups),
            "forward FLOPs" if spec.metric == "flops" else "saved-activation bytes",
            MEASURE_BATCH,
            image_size,
        )
    else:
        groups = resolve_split(units, cfg.split)
    trailing, head = _finish_units(model, units, image_size)
    for path in head:  # timm's post-pooling head: not part of a backbone (docs/methods.md)
        model.set_submodule(path, nn.Identity())
    groups[-1] = [*groups[-1], *trailing]
    _check_every_parameter_trained(model, [u for g in groups for u in g], cfg.backbone)
    backbone = StagedBackbone(model, groups, cfg.backbone, image_size)
    backbone.block_costs = costs
    return backbone


def block_costs(model: nn.Module, units: list[Unit], image_size: int, metric: str) -> list[int]:
    """Each block's cost under :mod:`loco.models.balance`'s fixed recipe."""
    blocks = StagedBackbone(model, resolve_split(units, "blocks"), "", image_size)
    with batchnorm_stats_kept([model]):
        return measure_blocks(
            blocks.forward_module,
            blocks.num_modules,
            image_size,
            metric,
            exclude=[*model.parameters(), *model.buffers()],
        )
