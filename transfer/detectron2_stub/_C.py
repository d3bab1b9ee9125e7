"""loco's pure-Python stand-in for Detectron2's compiled extension ``detectron2._C``.

``tools/install_detectron2.py`` installs this file as ``detectron2/_C.py`` when it builds
Detectron2 without compiled ops (the pure-Python code of ``sal-detectron2`` repacked as a
``py3-none-any`` wheel).  Mask R-CNN / Faster R-CNN / RetinaNet with FPN need no compiled
Detectron2 op (ROIAlign and NMS come from torchvision), so they build, train and evaluate
with this stand-in.  The compiled ops themselves are not reimplemented here:

* every op attribute (``deform_conv_forward``, ``COCOevalEvaluateImages``, ...) raises
  :class:`Detectron2CompiledOpUnavailable` on access, naming the op and the fix;
* the rotated-box ops that the real extension registers under ``torch.ops.detectron2``
  (``nms_rotated``, ``box_iou_rotated``, ``roi_align_rotated_forward/backward``) are
  registered here too, and raise the same error when called;
* the three informational entries used by ``detectron2.utils.collect_env`` (and so by
  ``detectron2.engine.default_setup``) answer instead of raising: ``get_compiler_version``,
  ``get_cuda_version`` and ``has_cuda``.

Importing this module never raises: ``detectron2.layers.deform_conv`` and
``detectron2.evaluation.fast_eval_api`` do ``from detectron2 import _C`` at import time and
touch its attributes only when an op is called.  Consequence for COCO evaluation:
``COCOEvaluator``'s default fast path (``use_fast_impl=True``) fails when it evaluates; pass
``COCOEvaluator(..., use_fast_impl=False)`` to use pycocotools.

The error is both an ``AttributeError`` (so ``hasattr``/``getattr(_C, name, default)`` treat
an op as absent) and a ``NotImplementedError``.
"""

__loco_standin__ = True
__all__ = []  # `from detectron2._C import *` imports nothing

_FROM_SOURCE = (
    "python -m pip install --no-build-isolation "
    "'git+https://github.com/facebookresearch/detectron2.git'"
)

# The entries of the real extension (detectron2/layers/csrc/vision.cpp).
_PYBIND_OPS = (
    "deform_conv_forward",
    "deform_conv_backward_input",
    "deform_conv_backward_filter",
    "modulated_deform_conv_forward",
    "modulated_deform_conv_backward",
    "COCOevalAccumulate",
    "COCOevalEvaluateImages",
    "InstanceAnnotation",
    "ImageEvaluation",
)
# name -> schema of the ops the real extension registers with TORCH_LIBRARY(detectron2, m).
_TORCH_OPS = {
    "nms_rotated": "nms_rotated(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "box_iou_rotated": "box_iou_rotated(Tensor boxes1, Tensor boxes2) -> Tensor",
    "roi_align_rotated_forward": (
        "roi_align_rotated_forward(Tensor input, Tensor rois, float spatial_scale, "
        "int pooled_height, int pooled_width, int sampling_ratio) -> Tensor"
    ),
    "roi_align_rotated_backward": (
        "roi_align_rotated_backward(Tensor grad, Tensor rois, float spatial_scale, "
        "int pooled_height, int pooled_width, int batch_size, int channels, int height, "
        "int width, int sampling_ratio) -> Tensor"
    ),
}
__loco_ops__ = _PYBIND_OPS + tuple(_TORCH_OPS)

_HINTS = {
    "COCOevalAccumulate": "use_fast",
    "COCOevalEvaluateImages": "use_fast",
    "InstanceAnnotation": "use_fast",
    "ImageEvaluation": "use_fast",
}


class Detectron2CompiledOpUnavailable(AttributeError, NotImplementedError):
    """A compiled Detectron2 op was requested from loco's stand-in ``detectron2._C``."""


def _message(op: str) -> str:
    msg = (
        f"detectron2._C.{op} is not available: this Detectron2 was installed without its "
        f"compiled ops (tools/install_detectron2.py); build Detectron2 from source for {op} "
        f"({_FROM_SOURCE})"
    )
    if _HINTS.get(op) == "use_fast":
        msg += "; or evaluate with COCOEvaluator(..., use_fast_impl=False) (pycocotools)"
    return msg


def __getattr__(name: str):
    # Private and dunder names (probed by import machinery, pickle, inspect, IPython, ...)
    # are plain missing attributes; every public name is a compiled op we do not have.
    if name.startswith("_"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    raise Detectron2CompiledOpUnavailable(_message(name))


def __dir__():
    return sorted(set(globals()) | set(__loco_ops__))


def get_compiler_version() -> str:
    return "none (loco stand-in detectron2._C: no compiled ops)"


def get_cuda_version() -> str:
    return "none (loco stand-in detectron2._C: no compiled ops)"


def has_cuda() -> bool:
    return False


def _register_torch_ops():
    """Register torch.ops.detectron2.<op> entries that raise the clear error when called."""
    import torch

    lib = torch.library.Library("detectron2", "FRAGMENT")
    for op, schema in _TORCH_OPS.items():
        try:
            getattr(torch.ops.detectron2, op)
            continue  # already registered by something else: leave it alone
        except (AttributeError, RuntimeError):
            pass

        def _unavailable(*args, _op=op, **kwargs):
            raise Detectron2CompiledOpUnavailable(_message(_op))

        lib.define(schema)
        lib.impl(op, _unavailable, "CompositeImplicitAutograd")
    return lib


try:
    _LIB = _register_torch_ops()  # keep a reference: the registrations live as long as it does
except Exception:  # never break `import detectron2`; the ops then stay unregistered
    _LIB = None
