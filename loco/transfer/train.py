"""Mask R-CNN on a pretrained loco backbone: config setup, trainer, train and eval entries.

``setup_cfg`` turns (a config file, a loco checkpoint, ``KEY VALUE`` overrides, optional
COCO json + image folders) into a frozen Detectron2 config:

1. Detectron2 defaults + ``MODEL.LOCO`` keys, the file (``_BASE_`` chains resolved by
   Detectron2), the overrides;
2. ``MODEL.PIXEL_MEAN/STD`` = the checkpoint's ``data.mean/std`` x 255 and
   ``INPUT.FORMAT = RGB`` (how the backbone was pretrained), logged;
3. datasets registered (``--train-json`` etc., recorded in ``DATASETS.LOCO_FILES`` so a
   saved ``config.yaml`` re-registers them), every file they read checked to exist (before
   anything is built), ``ROI_HEADS.NUM_CLASSES`` from their categories;
4. device and world-size fallbacks: no CUDA -> ``MODEL.DEVICE=cpu``; SyncBN with one
   process or on CPU -> BN (identical statistics on one process), with a warning.

Training is Detectron2's ``DefaultTrainer`` with ``COCOEvaluator(use_fast_impl=False)``
(pycocotools, so no compiled Detectron2 op is needed) scoring every task the model has,
detections or not. The final evaluation is written as detection rows of
:mod:`loco.eval.results` (protocols ``maskrcnn-bbox`` / ``maskrcnn-segm``, metrics ``ap,
ap50, ap75, aps, apm, apl``); a metric COCO cannot compute (NaN: no detection, or no
object of a size range) is stored as null with a note. ``loco transfer eval`` loads its
weights strictly: a tensor missing or of another shape is an error, not a skipped layer.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultTrainer, HookBase, launch
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from fvcore.common.checkpoint import _filter_reused_missing_keys

from loco import checkpoint as ckpt
from loco.errors import LocoError
from loco.eval.results import make_row, write_results
from loco.stop import StopFlag, worker_init
from loco.transfer import datasets as ds
from loco.transfer.backbone import add_loco_config, read_loco_checkpoint

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "transfer" / "configs"
NORM_KEYS = (
    "MODEL.LOCO.NORM",
    "MODEL.RESNETS.NORM",
    "MODEL.FPN.NORM",
    "MODEL.ROI_BOX_HEAD.NORM",
    "MODEL.ROI_MASK_HEAD.NORM",
    "MODEL.SEM_SEG_HEAD.NORM",
)
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # -> ap, ap50, ... in results rows
AREA_RANGES = {
    "aps": "small (< 32^2 px)",
    "apm": "medium (32^2-96^2 px)",
    "apl": "large (> 96^2 px)",
}


def resolve_config(name: str | Path) -> Path:
    """A config path, or the name of one in ``transfer/configs`` (``.yaml`` optional)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / path, CONFIG_DIR / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    raise LocoError(
        f"config '{name}' not found"
        + (f"; shipped configs: {', '.join(shipped)}" if shipped else "")
    )


def _get(cfg: CfgNode, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        if part not in node:
            return None
        node = node[part]
    return node


def _set(cfg: CfgNode, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[last] = value


def _world_fallbacks(cfg: CfgNode) -> None:
    if str(cfg.MODEL.DEVICE).startswith("cuda") and not torch.cuda.is_available():
        log.warning("MODEL.DEVICE=%s but CUDA is not available: running on cpu", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    world, device = comm.get_world_size(), str(cfg.MODEL.DEVICE)
    if world > 1 and device.startswith("cuda"):
        return
    synced = [k for k in NORM_KEYS if _get(cfg, k) == "SyncBN"]
    for key in synced:
        _set(cfg, key, "BN")
    if synced:
        log.warning(
            "SyncBN needs several CUDA processes (world size %d, device %s): using BN for %s "
            "(identical on one process)",
            world,
            device,
            ", ".join(synced),
        )


def _apply_checkpoint(cfg: CfgNode) -> None:
    source = read_loco_checkpoint(cfg)
    cfg.MODEL.LOCO.BACKBONE = source.model.backbone
    if not cfg.MODEL.LOCO.PIXEL_STATS_FROM_CHECKPOINT:
        return
    mean = [round(m * 255.0, 4) for m in source.mean]
    std = [round(s * 255.0, 4) for s in source.std]
    log.info(
        "input as pretrained (%s): INPUT.FORMAT=RGB, MODEL.PIXEL_MEAN=%s, MODEL.PIXEL_STD=%s "
        "(was %s, %s, %s)",
        source.source,
        mean,
        std,
        cfg.INPUT.FORMAT,
        list(cfg.MODEL.PIXEL_MEAN),
        list(cfg.MODEL.PIXEL_STD),
    )
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD, cfg.INPUT.FORMAT = mean, std, "RGB"


def _register(cfg: CfgNode, split: str, json_file: str | None, images: str | None) -> str | None:
    if not json_file and not images:
        return None
    if not (json_file and images):
        raise LocoError(f"--{split}-json and --{split}-images go together")
    name = ds.register_coco_json(json_file, images, split)
    files = [list(f) for f in cfg.DATASETS.LOCO_FILES if f[0] != name]
    cfg.DATASETS.LOCO_FILES = [
        *files,
        [name, str(Path(json_file).resolve()), str(Path(images).resolve())],
    ]
    return name


def setup_cfg(
    config: str | Path,
    checkpoint: str | None = None,
    opts: Sequence[str] = (),
    *,
    prefix: str | None = None,
    train_json: str | None = None,
    train_images: str | None = None,
    val_json: str | None = None,
    val_images: str | None = None,
    output_dir: str | None = None,
    train: bool = True,
) -> CfgNode:
    """The frozen Detectron2 config of a transfer run (see the module docstring).

    ``train=False`` (evaluation) needs only the test datasets on disk.
    """
    cfg = get_cfg()
    add_loco_config(cfg)
    cfg.merge_from_file(str(resolve_config(config)))
    if len(opts) % 2:
        raise LocoError(f"overrides come in KEY VALUE pairs, got {len(opts)} items: {list(opts)}")
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, AssertionError, ValueError) as exc:
        raise LocoError(f"bad override in {list(opts)}: {exc}") from None
    if checkpoint:  # absolute, so the saved config.yaml works from any directory
        cfg.MODEL.LOCO.CHECKPOINT = str(Path(checkpoint).resolve())
    if prefix is not None:
        cfg.MODEL.LOCO.PREFIX = prefix
    if output_dir:
        cfg.OUTPUT_DIR = str(output_dir)
    for name, json_file, images in cfg.DATASETS.LOCO_FILES:  # from a saved config.yaml
        if train or name.split("_")[1] != "train":
            ds.register_coco_json(json_file, images, name.split("_")[1])
    train_name = _register(cfg, "train", train_json, train_images)
    val_name = _register(cfg, "val", val_json, val_images)
    if train_name:
        cfg.DATASETS.TRAIN = (train_name,)
    if val_name:
        cfg.DATASETS.TEST = (val_name,)
    for name in (*(cfg.DATASETS.TRAIN if train else ()), *cfg.DATASETS.TEST):
        ds.ensure_registered(name)
    if train:
        ds.check_files(cfg.DATASETS.TRAIN, "train")
    ds.check_files(cfg.DATASETS.TEST, "val")
    _apply_checkpoint(cfg)
    if train_json and val_json:
        ds.check_same_categories(train_json, val_json)
    if train_json or val_json:
        n = ds.num_categories(train_json or val_json)
        if n != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            log.info("MODEL.ROI_HEADS.NUM_CLASSES=%d (the categories of the COCO json)", n)
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = n
    if train_json and cfg.MODEL.MASK_ON and ds.has_rle_masks(train_json):
        if cfg.INPUT.MASK_FORMAT != "bitmask":
            log.info("INPUT.MASK_FORMAT=bitmask: '%s' stores instance masks as RLE", train_json)
        cfg.INPUT.MASK_FORMAT = "bitmask"
    _world_fallbacks(cfg)
    cfg.freeze()
    return cfg


class StopAtSignal(HookBase):
    """SIGTERM/SIGINT/SIGUSR1 (or the Slurm entry's USR2 request, :mod:`loco.stop`) end
    training after the current iteration with a checkpoint that ``--resume`` continues."""

    def before_train(self) -> None:
        self.flag = StopFlag().__enter__()

    def after_step(self) -> None:
        reason = self.flag.reason()
        if not any(comm.all_gather(bool(reason))):  # all ranks stop at the same iteration
            return
        it = self.trainer.iter
        if comm.is_main_process():
            self.trainer.checkpointer.save(f"model_{it:07d}", iteration=it)
        log.warning("stopped by %s at iteration %d; run the same command to resume", reason, it)
        raise SystemExit(143 if reason == "SIGTERM" else 130)

    def after_train(self) -> None:
        self.flag.__exit__(None, None, None)


class LocoTrainer(DefaultTrainer):
    """DefaultTrainer scoring with pycocotools (no compiled Detectron2 op); data workers
    ignore the stop signals and a stop signal saves and ends training (:class:`StopAtSignal`)."""

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        loader = super().build_train_loader(cfg)
        inner = loader  # Detectron2 wraps the DataLoader (aspect-ratio grouping)
        while inner is not None and not isinstance(inner, torch.utils.data.DataLoader):
            inner = getattr(inner, "dataset", getattr(inner, "_dataset", None))  # no len()
        if inner is not None:  # set before its first iteration starts the workers
            inner.worker_init_fn = worker_init(inner.worker_init_fn)
        return loader

    def build_hooks(self) -> list[HookBase]:
        return [*super().build_hooks(), StopAtSignal()]

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None):
        """Scores every task of the model: COCOEvaluator would otherwise infer the tasks from
        the predictions and drop ``segm`` when the model detected nothing."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        tasks = ["bbox"] + ["segm"] * cfg.MODEL.MASK_ON + ["keypoints"] * cfg.MODEL.KEYPOINT_ON
        return COCOEvaluator(
            dataset_name, tasks=tasks, output_dir=output_folder, use_fast_impl=False
        )


class StrictCheckpointer(DetectionCheckpointer):
    """Loads weights for evaluation: a tensor of the model missing from them, or of another
    shape, is an error (Detectron2 would skip it with a warning and evaluate random weights)."""

    def _log_incompatible_keys(self, incompatible) -> None:
        shapes = [
            f"{k} {tuple(a)} in the weights, {tuple(b)} in the model"
            for k, a, b in incompatible.incorrect_shapes
        ]
        skipped = {k for k, _, _ in incompatible.incorrect_shapes}  # also reported missing
        missing = [
            k
            for k in _filter_reused_missing_keys(self.model, incompatible.missing_keys)
            if k not in skipped
        ]
        problems = [f"{len(shapes)} tensors of another shape"] * bool(shapes)
        problems += [f"{len(missing)} tensors missing"] * bool(missing)
        if problems:
            listed = sorted(  # the backbone's keys first: the likely cause
                shapes + [f"{k} missing" for k in missing],
                key=lambda k: not k.startswith("backbone.bottom_up."),
            )
            first = "; ".join(listed[:3])
            raise LocoError(
                f"the weights do not fit the model built from this config and --checkpoint "
                f"({' and '.join(problems)}: {first}); evaluate with the --checkpoint (backbone) "
                "and --config the weights were trained with"
            )
        super()._log_incompatible_keys(incompatible)


# -- results ------------------------------------------------------------------------------
def _dataset_label(name: str) -> str:
    """``coco128-seg/instances_val2017`` for a dataset registered from a json path."""
    if not name.startswith("loco_"):
        return name
    json_file = Path(MetadataCatalog.get(name).json_file)
    root = json_file.parent.parent if json_file.parent.name == "annotations" else json_file.parent
    return f"{root.name}/{json_file.stem}"


def _n_images(name: str) -> int | None:
    """Images in a dataset; None where its files are not on disk (evaluation only)."""
    if name not in DatasetCatalog.list():
        return None
    meta = MetadataCatalog.get(name)
    json_file = meta.get("json_file")
    if json_file:
        if not Path(json_file).is_file():
            return None
        with open(json_file) as f:
            return len(json.load(f)["images"])
    return len(DatasetCatalog.get(name))


def metrics_and_notes(task_metrics: dict[str, float]) -> tuple[dict[str, float], dict[str, str]]:
    """COCOEvaluator's ``{"AP": ..}`` as results-row metrics, NaN (what COCO cannot compute)
    as None with the reason in the notes."""
    values = {m.lower(): float(task_metrics.get(m, float("nan"))) for m in COCO_METRICS}
    nan = [k for k, v in values.items() if math.isnan(v)]
    notes = {}
    for key in nan:
        if len(nan) == len(values):
            notes[key] = "the model detected nothing on the val set"
        elif key in AREA_RANGES:
            notes[key] = f"the val set has no {AREA_RANGES[key]} object"
        else:
            notes[key] = "COCOeval could not compute it"
    return {k: (None if k in nan else round(v, 4)) for k, v in values.items()}, notes


def result_rows(
    cfg: CfgNode, results: dict[str, Any], step: int | None = None
) -> list[dict[str, Any]]:
    """``results.json`` rows of COCOEvaluator output, one per (test dataset, task)."""
    if not results:
        return []
    if any(task in results for task in ("bbox", "segm")):
        results = {cfg.DATASETS.TEST[0]: results}
    path = cfg.MODEL.LOCO.CHECKPOINT
    source = read_loco_checkpoint(cfg)
    checkpoint_id = ckpt.file_hash(path) if path else "random-init"
    counts = [_n_images(n) for n in cfg.DATASETS.TRAIN]
    n_train = None if None in counts else sum(counts)
    freeze_at = int(cfg.MODEL.BACKBONE.FREEZE_AT)
    rows = []
    for dataset, per_task in results.items():
        n_val = _n_images(dataset)
        for task in ("bbox", "segm"):
            if task not in per_task:
                continue
            metrics, notes = metrics_and_notes(per_task[task])
            rows.append(
                make_row(
                    method=source.method,
                    backbone=source.model.backbone,
                    stage=len(cfg.MODEL.LOCO.OUT_FEATURES),
                    protocol=f"maskrcnn-{task}",
                    dataset=_dataset_label(dataset),
                    checkpoint=checkpoint_id,
                    n_train=n_train,
                    n_val=n_val,
                    step=step,
                    **metrics,
                    notes=notes,
                    train_dataset=",".join(_dataset_label(n) for n in cfg.DATASETS.TRAIN),
                    freeze_at=freeze_at,
                    setting="frozen" if freeze_at >= 5 else "finetune",
                    iterations=int(cfg.SOLVER.MAX_ITER),
                    checkpoint_path=path or None,
                )
            )
    return rows


# -- run set-up ---------------------------------------------------------------------------
def _start_run(cfg: CfgNode, args: argparse.Namespace, kind: str) -> logging.Handler | None:
    """Seed, and on the main process: output dir, config.yaml, log.txt, resolved config."""
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + comm.get_rank())
    if not comm.is_main_process():
        return None
    from loco.rundir import git_revision

    out = Path(cfg.OUTPUT_DIR)
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    if kind == "train":
        (out / "config.yaml").write_text(cfg.dump())
    log.info(
        "loco transfer %s | git %s | world size %d | output %s\n%s",
        kind,
        git_revision(),
        comm.get_world_size(),
        out,
        cfg.dump(),
    )
    return handler


def _end_run(handler: logging.Handler | None) -> None:
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _cfg_from_args(args: argparse.Namespace, config: str | Path, train: bool) -> CfgNode:
    return setup_cfg(
        config,
        args.checkpoint,
        args.opts,
        prefix=args.prefix,
        train_json=getattr(args, "train_json", None),
        train_images=getattr(args, "train_images", None),
        val_json=args.val_json,
        val_images=args.val_images,
        output_dir=args.output_dir,
        train=train,
    )


def _write(
    cfg: CfgNode, args: argparse.Namespace, results: dict[str, Any], step: int | None
) -> list[dict]:
    rows = result_rows(cfg, results or {}, step)
    if rows:
        for target in {cfg.OUTPUT_DIR, *(args.results_to or [])}:
            log.info("results -> %s", write_results(target, rows))
    return rows


def _train_worker(args: argparse.Namespace) -> list[dict[str, Any]]:
    cfg = _cfg_from_args(args, args.config, train=True)
    handler = _start_run(cfg, args, "train")
    try:
        trainer = LocoTrainer(cfg)
        if cfg.MODEL.WEIGHTS or (args.resume and trainer.checkpointer.has_checkpoint()):
            trainer.resume_or_load(resume=args.resume)
        else:  # Detectron2 would log "No checkpoint found. Initializing model from scratch"
            log.info(
                "detector: backbone from %s, FPN and heads initialised at random "
                "(no MODEL.WEIGHTS, nothing to resume in %s)",
                cfg.MODEL.LOCO.CHECKPOINT or "random init",
                cfg.OUTPUT_DIR,
            )
        trainer.train()
        results = getattr(trainer, "_last_eval_results", None)
        if comm.is_main_process():
            return _write(cfg, args, results, trainer.iter)  # == MAX_ITER once training ends
        return []
    finally:
        _end_run(handler)


def _eval_worker(args: argparse.Namespace) -> list[dict[str, Any]]:
    run_dir = Path(args.output_dir) if args.output_dir else None
    config = args.config or (run_dir / "config.yaml" if run_dir else None)
    if config is None:
        raise LocoError("pass --config, or --output-dir of a training run (uses its config.yaml)")
    cfg = _cfg_from_args(args, config, train=False)
    handler = _start_run(cfg, args, "eval")
    try:
        model = LocoTrainer.build_model(cfg)
        checkpointer = StrictCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        weights = args.weights
        if weights is None:
            if not checkpointer.has_checkpoint():
                raise LocoError(
                    f"no trained weights: pass --weights, or --output-dir of a run holding "
                    f"last_checkpoint (looked in {cfg.OUTPUT_DIR})"
                )
            weights = checkpointer.get_checkpoint_file()
        checkpointer.load(weights)
        results = LocoTrainer.test(cfg, model)
        return _write(cfg, args, results, None) if comm.is_main_process() else []
    finally:
        _end_run(handler)


def _launch(worker, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The worker on this process, or on each of Detectron2's processes (then no rows back:
    the main process wrote them)."""
    if args.num_gpus * args.num_machines <= 1:
        return worker(args)
    if not torch.cuda.is_available():
        raise LocoError(f"--num-gpus {args.num_gpus} needs CUDA, which is not available")
    launch(
        worker,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
    return []


def train_main(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``loco transfer train``: train, evaluate at the end, write results.json; its rows."""
    return _launch(_train_worker, args)


def eval_main(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``loco transfer eval``: evaluate trained weights, write results.json; its rows."""
    return _launch(_eval_worker, args)
