"""``loco pretrain``: the training loop.

config -> data -> staged backbone -> method.training_step -> optimizer -> momentum
(EMA) update, for objectives with a momentum target -> checkpoint.
The method leaves gradients in ``.grad`` (local methods call autograd per module); the
loop averages them over ranks, steps the optimizer and the per-iteration schedule, logs
JSONL metrics, and writes atomic checkpoints from which a run resumes exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.nn as nn
from tqdm import tqdm

from loco import checkpoint as ckpt
from loco import resume
from loco.config import Config, dump_yaml, load_config
from loco.data.loaders import build_pretrain_loader, resumable_batches, steps_per_epoch
from loco.distributed import (
    DistInfo,
    any_rank,
    average_gradients,
    barrier,
    broadcast_parameters,
    gather_to_main,
    init_distributed,
    rank_codes,
    seed_per_rank,
)
from loco.errors import LocoError
from loco.methods import METHODS, Method, build_method
from loco.models.backbone import build_backbone
from loco.models.sync_bn import sync_batchnorm
from loco.monitor import KNNMonitor, OnlineProbe, collapse_std
from loco.optim import build_optimizer, build_scheduler
from loco.plans import parse_recompute_plan, parse_split
from loco.rundir import RunDir, git_revision
from loco.runlock import RunLock
from loco.stop import StopFlag, request_stop

log = logging.getLogger("loco.train")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config (see configs/); defaults if omitted")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. method.name=greedy optim.batch_size=128 train.output_dir=runs/x",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    from loco.objectives import OBJECTIVES

    parser.epilog = (
        f"methods (method.name): {', '.join(sorted(METHODS))}; objectives (method.objective): "
        f"{', '.join(sorted(OBJECTIVES))}"
    )


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_yaml(cfg))
        return 0
    pretrain(cfg)
    return 0


# -- environment ------------------------------------------------------------------------
def resolve_device(cfg: Config, info: DistInfo) -> torch.device:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise LocoError(
            "train.device=cuda but no CUDA device is visible; use train.device=auto or cpu"
        )
    if want == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", info.local_rank)


def autocast_for(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (no loss scaling needed); fp32 on CPU unless asked."""
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# -- the run -----------------------------------------------------------------------------
def load_method_state(method: nn.Module, path: Path, state: dict[str, Any]) -> None:
    """A checkpoint's method weights (backbone + decoders), or one line saying why not."""
    try:
        method.load_state_dict(state["method"])
    except (RuntimeError, KeyError) as exc:
        raise LocoError(
            f"checkpoint {path} does not fit this model: {str(exc).splitlines()[0]}"
        ) from None


def leave_stopped(trainer: Any, stopped: str, last_saved: int, bar: tqdm) -> NoReturn:
    """After a stop request: save the current step unless it is saved, and exit with the
    signal's status (143 for SIGTERM, else 130) so Slurm and shells see a stop, not success."""
    if last_saved != trainer.step:
        trainer.save()
    bar.close()
    log.warning("stopped by %s at step %d; resume with train.resume=auto", stopped, trainer.step)
    trainer.metrics.close()
    raise SystemExit(143 if stopped == "SIGTERM" else 130)


def take_run_lock(run_dir: Path, is_main: bool) -> RunLock | None:
    """Rank 0 takes the run lock for the whole job (any trainer, any layout of ranks: one
    lock per run dir); every rank learns the outcome, so all stop or all go on."""
    lock, error = None, None
    if is_main:
        try:
            lock = RunLock(RunDir(run_dir).lock).acquire()
        except LocoError as exc:
            error = exc
    if any_rank(error is not None):
        raise error or LocoError(f"run dir {run_dir} is in use (see rank 0's error)")
    return lock


def finish(trainer: Any, bar: tqdm) -> Path:
    """The end of a completed run: close the bar, name the unreadable images that were
    skipped, close the metrics; returns the run directory."""
    bar.close()
    if trainer.skipped_count:
        log.warning(
            "skipped %d unreadable images (first: %s)",
            trainer.skipped_count,
            ", ".join(trainer.skipped_images),
        )
    trainer.metrics.close()
    return trainer.run_dir


def progress_bar(cfg: Config, total: int, initial: int, desc: str, is_main: bool) -> tqdm:
    """The pretraining progress bar (rank 0 only, ``train.progress``), on stderr."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not (cfg.train.progress and is_main),
        dynamic_ncols=True,
        file=sys.stderr,
    )


def show_losses(bar: tqdm, values: dict[str, float]) -> None:
    """The progress bar's postfix: every local loss and the throughput of a metrics row."""
    losses = {
        k.replace("loss/", ""): f"{v:.3f}" for k, v in values.items() if k.startswith("loss/")
    }
    bar.set_postfix(losses | {"img/s": f"{values['img_per_s']:.0f}"})


class MetricsWriter:
    """JSONL metrics (always) and TensorBoard events (when tensorboard is installed)."""

    def __init__(self, run_dir: Path, enabled: bool, wandb_cfg: Config | None = None) -> None:
        self.enabled = enabled
        self.wandb_cfg = wandb_cfg  # W&B too when given (opened at the first write)
        self.wandb: Any = None
        self.path = RunDir(run_dir).metrics
        self.tb_dir = RunDir(run_dir).tensorboard
        self.tb: Any = None  # opened at the first write: nothing is written before the run lock

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.tb_dir))
            except ImportError:
                self.tb = False
        if self.wandb is None and self.wandb_cfg is not None:
            from loco.tracking import WandbRun

            self.wandb = WandbRun(RunDir(self.path.parent), self.wandb_cfg)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.wandb is not None:
            self.wandb.log(step, values)
        if self.tb:
            for k, v in values.items():
                if isinstance(v, int | float):
                    self.tb.add_scalar(k, v, step)

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint (they will be logged again)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [
            ln
            for ln in self.path.read_text().splitlines()
            if ln and json.loads(ln).get("step", 0) <= step
        ]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        self.tb = None
        if self.wandb is not None:
            self.wandb.close()
        self.wandb = None


class Pretrainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.info = init_distributed()
        self.device = resolve_device(cfg, self.info)
        self.run_dir = Path(cfg.train.output_dir)
        # the same seed on every rank: identical initial weights (augmentation randomness is
        # per sample, from the data sampler, so ranks still see different views)
        torch.manual_seed(cfg.train.seed)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        self.loader = build_pretrain_loader(
            cfg, rank=self.info.rank, world_size=self.info.world_size, device=self.device
        )
        self.steps_per_epoch = steps_per_epoch(self.loader)
        self.total_steps = cfg.optim.max_steps or cfg.optim.epochs * self.steps_per_epoch

        cuts = None  # a balanced split goes on with the cuts it chose (meta, not config)
        if parse_split(cfg.model.split).kind == "balanced":
            src = resume.weights_source(cfg) or ckpt.find_resume(self.run_dir, cfg.train.resume)
            cuts = ckpt.load(src, mmap=True)["meta"].get("split_cuts") if src else None
        backbone = build_backbone(cfg.model, cfg.data.image_size, cuts=cuts)
        backbone.recompute = parse_recompute_plan(cfg.train.recompute, backbone.num_modules)
        method = build_method(backbone, cfg)
        if cfg.model.sync_bn:  # backbone and decoders alike
            method = sync_batchnorm(method, self.device)
        self.method: Method = method.to(self.device)
        if self.device.type == "cuda" and cfg.train.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)
        broadcast_parameters(self.method)
        # identical weights everywhere; from here on each rank draws its own randomness
        # (stochastic depth, dropout), and a checkpoint keeps every rank's generators
        seed_per_rank(cfg.train.seed, self.info.rank)
        self.optimizer = build_optimizer(self.method, cfg.optim, self.info.world_size)
        self.scheduler = build_scheduler(
            self.optimizer, cfg.optim, self.total_steps, self.steps_per_epoch
        )
        classes = self.loader.dataset.classes
        if not classes and (cfg.monitor.online_linear or cfg.monitor.knn_every > 0):
            log.info("unlabelled training data: the online linear probe and kNN monitor are off")
        self.probe = (
            OnlineProbe(backbone.channels[-1], len(classes)).to(self.device)
            if cfg.monitor.online_linear and classes
            else None
        )
        self.knn_monitor = (
            KNNMonitor(cfg, self.device)
            if cfg.monitor.knn_every > 0 and self.info.is_main and classes
            else None
        )
        self.params = [p for p in self.method.parameters() if p.requires_grad]
        self.step = 0
        self.lock: RunLock | None = None  # held by rank 0 while fit() runs
        self.metrics = MetricsWriter(
            self.run_dir, self.info.is_main, cfg if cfg.train.wandb else None
        )
        # fp16: one gradient scaler for all local losses of a step (Method.backward_loss)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.precision == "fp16")
        if self.scaler.is_enabled():
            self.method.loss_scaler = self.scaler.scale
        self.skipped_images: list[str] = []
        self.skipped_count = 0
        if cfg.train.compile:
            self.method.backbone.compile_units()

    # -- state ------------------------------------------------------------------------
    def state_dict(self, rngs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The checkpoint; ``rngs``: every rank's generator states, rank 0 first."""
        rngs = rngs or [ckpt.rng_state()]
        # the momentum backbone (BYOL, MoCo v3) for `loco eval/export --ema`; the method
        # state holds it too, with the decoders' momentum copies
        ema = (
            {"backbone_ema": self.method.momentum.backbone.body.state_dict()}
            if self.method.momentum
            else {}
        )
        return {
            "method": self.method.state_dict(),
            "backbone": self.method.backbone.body.state_dict(),
            **ema,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "probe": self.probe.state_dict() if self.probe else None,
            "step": self.step,
            "rng": rngs[0],  # rank 0's (what checkpoints before per-rank states held)
            "rng_per_rank": rngs,
            "config": self.cfg.to_dict(),
            "meta": {
                "backbone": self.cfg.model.backbone,
                "method": self.cfg.method.name,
                "channels": self.method.backbone.channels,
                "split_cuts": self.method.backbone.cuts,
                "image_size": self.cfg.data.image_size,
                "world_size": self.info.world_size,
                "git": git_revision(),
            },
        }

    def save(self) -> None:
        rngs = gather_to_main(ckpt.rng_state())
        if self.info.is_main:
            path = ckpt.save_run_checkpoint(
                self.run_dir, self.state_dict(rngs), self.step, self.cfg.train.keep_checkpoints
            )
            log.info("checkpoint: %s (step %d)", path, self.step)
        barrier()

    def maybe_resume(self) -> None:
        """Continue the run's checkpoint (``train.resume``: auto, extend or a path) or start
        from another run's weights (``weights:PATH``); the rules are in :mod:`loco.resume`."""
        weights = resume.weights_source(self.cfg)
        if weights is not None:
            self.load_weights(weights)
            return
        path = ckpt.find_resume(self.run_dir, self.cfg.train.resume)
        if path is None:
            return
        state = ckpt.load(path)
        extend = self.cfg.train.resume == "extend"
        resume.check(path, state, self.cfg, self.info.world_size, "extend" if extend else "exact")
        self.load_method(path, state)
        self.optimizer.load_state_dict(state["optimizer"])
        if not extend:  # extend: keep the schedule built for the new horizon
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.probe and state.get("probe"):
            self.probe.load_state_dict(state["probe"])
        self.step = int(state["step"])
        rngs = state.get("rng_per_rank") or [state["rng"]]  # older checkpoints: rank 0's only
        if self.info.rank < len(rngs):
            ckpt.set_rng_state(rngs[self.info.rank])
        self.metrics.truncate_after(self.step)
        log.info("resumed from %s at step %d/%d", path, self.step, self.total_steps)

    def load_weights(self, path: Path) -> None:
        """``train.resume=weights:PATH``: a new run from the weights of PATH (step 0, fresh
        optimizer and schedule), in a run dir of its own."""
        state = ckpt.load(path)
        self.load_method(path, state)
        log.info("new schedule from the weights of %s (its step %s)", path, state.get("step"))

    def load_method(self, path: Path, state: dict[str, Any]) -> None:
        load_method_state(self.method, path, state)

    # -- loop -------------------------------------------------------------------------
    def train_step(self, batch) -> dict[str, float]:
        views, labels, bad = batch
        if bad:
            self.skipped_count += len(bad)
            self.skipped_images += bad[: max(0, 5 - len(self.skipped_images))]
        views = [v.to(self.device, non_blocking=True) for v in views]
        if self.device.type == "cuda" and self.cfg.train.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        labels = labels.to(self.device, non_blocking=True)
        self.scheduler.step_update(self.step)
        self.method.train()
        self.optimizer.zero_grad(set_to_none=True)
        with autocast_for(self.cfg, self.device):
            out = self.method.training_step(views, labels)
        values = {k: float(v) for k, v in out.losses.items()}
        values["collapse/std"] = collapse_std(out.features)  # ~1 spread, 0 collapsed
        self.check_health(values)
        average_gradients(self.params)
        if self.scaler.is_enabled():  # an inf/NaN gradient anywhere skips the whole step
            self.scaler.unscale_(self.optimizer)
        if self.cfg.optim.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            self.scaler.update()
            values["loss_scale"] = float(self.scaler.get_scale())
        else:
            self.optimizer.step()
        momentum = self.method.update_momentum(self.step, self.total_steps)  # BYOL, MoCo v3
        if momentum is not None:
            values["momentum"] = momentum
        if self.probe is not None:
            values.update(self.probe.step(out.features, labels.repeat(len(views))))
        values["lr"] = self.optimizer.param_groups[0]["lr"]
        return values

    def fit(self) -> Path:
        """Train (or resume) under the run lock: no other run writes into this run dir."""
        self.lock = self.take_lock()
        try:
            return self._fit()
        finally:
            if self.lock is not None:
                self.lock.release()
                self.lock = None

    def take_lock(self) -> RunLock | None:
        return take_run_lock(self.run_dir, self.info.is_main)

    def _fit(self) -> Path:
        cfg = self.cfg
        if self.info.is_main:
            log.info("loco %s | git %s | run dir %s", cfg.method.name, git_revision(), self.run_dir)
            log.info("resolved config:\n%s", dump_yaml(cfg))
            log.info(
                "backbone %s split into %d local modules:\n%s",
                cfg.model.backbone,
                self.method.backbone.num_modules,
                self.method.backbone.describe(),
            )
        self.maybe_resume()
        if self.info.is_main:  # after the resume check: a refused resume leaves it as it was
            RunDir(self.run_dir).config.write_text(dump_yaml(cfg))
        if self.step >= self.total_steps:
            log.info("already finished (%d steps)", self.step)
            return self.run_dir
        bar = progress_bar(
            cfg, self.total_steps, self.step, f"pretrain {cfg.method.name}", self.info.is_main
        )
        images = cfg.optim.batch_size * self.info.world_size
        t_last, n_last = time.perf_counter(), self.step
        last_saved = self.step
        stopped: str | None = None
        with StopFlag() as stop:
            for batch in resumable_batches(self.loader, self.step):
                values = self.train_step(batch)
                self.step += 1
                bar.update(1)
                monitored = self.knn_monitor is not None and self.step % cfg.monitor.knn_every == 0
                if monitored:
                    values.update(self.knn_monitor(self.method.backbone))
                    log.info(
                        "step %d: kNN monitor top-1 %.2f%%", self.step, values["monitor/knn_top1"]
                    )
                if (
                    monitored
                    or self.step % cfg.train.log_every == 0
                    or self.step == self.total_steps
                ):
                    now = time.perf_counter()
                    values["img_per_s"] = images * (self.step - n_last) / max(now - t_last, 1e-9)
                    values["epoch"] = self.step / self.steps_per_epoch
                    values["peak_mem_mb"] = peak_memory_mb(self.device)
                    t_last, n_last = now, self.step
                    self.metrics.write(self.step, values)
                    show_losses(bar, values)
                end_of_epoch = self.step % self.steps_per_epoch == 0
                if (
                    self.step == self.total_steps
                    or self.step % cfg.train.ckpt_every == 0
                    or end_of_epoch
                ):
                    self.save()
                    last_saved = self.step
                # a signal or request_stop() (loco.stop; the Slurm entry point's USR2); all
                # ranks agree, so that they save and stop at the same step
                stopped = stop.reason()
                if any_rank(bool(stopped)):
                    stopped = stopped or "a signal on another rank"
                if stopped or self.step >= self.total_steps:
                    break
            request_stop(None)  # consumed (or moot: the run is complete)
            if stopped and self.step < self.total_steps:
                leave_stopped(self, stopped, last_saved, bar)
        return finish(self, bar)

    def check_health(self, losses: dict[str, float]) -> None:
        """Before the optimizer step, all ranks agree whether to go on: a non-finite loss on
        any rank, or a run lock taken over by another run, stops every rank at this step,
        leaving the last good checkpoint as it is."""
        lost = self.lock.lost if self.lock is not None else None
        finite = all(math.isfinite(v) for v in losses.values())
        codes = rank_codes((0 if finite else 1) | (2 if lost else 0))
        step = self.step + 1
        if any(c & 2 for c in codes):
            raise LocoError(f"stopped at step {step}: {lost or 'rank 0 lost the run lock'}")
        bad = [r for r, c in enumerate(codes) if c & 1]
        if bad:
            where = f" on rank {', '.join(map(str, bad))}" if len(codes) > 1 else ""
            raise LocoError(
                f"non-finite loss at step {step}{where} (this rank: {losses}); the last good "
                f"checkpoint {RunDir(self.run_dir).checkpoint} is kept; lower optim.base_lr "
                "or raise method.temperature, then resume from it"
            )


def pretrain(cfg: Config) -> Path:
    """Run (or resume) a pretraining run; returns its run directory."""
    if cfg.train.stage_parallel > 1:  # one local module per rank: loco.parallel
        from loco.parallel.trainer import pretrain_stage_parallel

        return pretrain_stage_parallel(cfg)
    return Pretrainer(cfg).fit()
