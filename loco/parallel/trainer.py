"""``loco pretrain`` with ``train.stage_parallel=K``: each rank trains one local module.

The loop is the single-process one (loco.train) with the step replaced by
:class:`loco.parallel.stage.StageEngine`: same config, data order per replica, learning
rate schedule, JSONL metrics, stop signals and checkpoint format. What differs:

* the global batch is ``optim.batch_size`` x replicas (world / K), and the lr scales with it;
* each replica's K stage ranks read the same batches (rank = replica for the sampler);
  stage 0 feeds the images, upper stages use them only for InfoPro's reconstruction
  target and for labels (online probe, SupCon);
* a checkpoint gathers every stage's part (module, decoder, optimizer state) into one file
  in today's format, written by rank 0, so ``loco eval``/``transfer`` and a resume with
  any K (or none) read it. Pipelined runs drain first, so the file is a consistent state;
* resume follows :mod:`loco.resume` with the replicas as the world size: any K (or none)
  with the same number of replicas continues exactly (same global batch, data order, lr;
  ``sync`` is the single-process step); a different number of replicas is refused;
* fp16 needs ``sync``: one ShardedGradScaler agrees on overflows over every rank, so all
  stages keep one scale and skip a step together (``pipelined`` would mix batches in one
  step: refused); a non-finite loss is seen after its stage stepped (the run stops and the
  last checkpoint is kept).
Everything else (run lock held by rank 0, metrics and W&B, stop signals, ``ckpt_every``,
``keep_checkpoints``, ``resume=extend``/``weights:``) is the single-process trainer's.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from loco import checkpoint as ckpt
from loco import resume
from loco import train as single
from loco.config import Config, dump_yaml
from loco.data.loaders import build_pretrain_loader, resumable_batches, steps_per_epoch
from loco.distributed import (
    barrier,
    broadcast_parameters,
    gather_to_main,
    init_distributed,
    rank_codes,
    seed_per_rank,
)
from loco.errors import LocoError
from loco.methods import Method, build_method
from loco.models.backbone import StagedBackbone, build_backbone
from loco.monitor import OnlineProbe
from loco.optim import build_optimizer, build_scheduler, scaled_lr
from loco.parallel.layout import check_config, check_modules, check_request, make_groups
from loco.parallel.schedule import placement_report
from loco.parallel.stage import StageEngine, owned_state_names
from loco.plans import parse_recompute_plan, parse_split
from loco.rundir import RunDir
from loco.runlock import RunLock
from loco.stop import StopFlag, request_stop

log = logging.getLogger("loco.parallel")


class StagePretrainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.info = init_distributed()
        self.layout = check_config(cfg, self.info.world_size)
        self.rank = self.info.rank
        self.device = single.resolve_device(cfg, self.info)
        self.run_dir = Path(cfg.train.output_dir)
        torch.manual_seed(cfg.train.seed)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        backbone = self.build_backbone()
        check_request(
            cfg.train.stage_parallel, self.info.world_size, cfg.method.name, backbone.num_modules
        )
        check_modules([len(backbone.module_parameters(k)) for k in range(backbone.num_modules)])
        backbone.recompute = parse_recompute_plan(cfg.train.recompute, backbone.num_modules)
        method = build_method(backbone, cfg).to(self.device)
        if self.device.type == "cuda" and cfg.train.channels_last:
            method = method.to(memory_format=torch.channels_last)
        self.method: Method = method
        broadcast_parameters(self.method)
        seed_per_rank(cfg.train.seed, self.rank)  # own streams for stochastic layers
        self.stage = self.layout.stage_of(self.rank)
        self.replica = self.layout.replica_of(self.rank)
        self.loader = build_pretrain_loader(
            cfg, rank=self.replica, world_size=self.layout.replicas, device=self.device
        )
        self.steps_per_epoch = steps_per_epoch(self.loader)
        self.total_steps = cfg.optim.max_steps or cfg.optim.epochs * self.steps_per_epoch
        self.optimizer = build_optimizer(self.method, cfg.optim, self.layout.replicas)
        self.scheduler = build_scheduler(
            self.optimizer, cfg.optim, self.total_steps, self.steps_per_epoch
        )
        top = self.stage == self.layout.stages - 1
        classes = self.loader.dataset.classes
        if not classes and cfg.monitor.online_linear and self.info.is_main:
            log.info("unlabelled training data: the online linear probe is off")
        self.probe = (
            OnlineProbe(backbone.channels[-1], len(classes)).to(self.device)
            if cfg.monitor.online_linear and top and classes
            else None
        )
        # fp16 (sync only, see check_config): every local loss scaled by one factor that all
        # ranks share; an overflow on any rank skips the step on all (Method.backward_loss)
        self.scaler = ShardedGradScaler(
            self.device.type, enabled=cfg.train.precision == "fp16", process_group=None
        )
        if self.scaler.is_enabled():
            self.method.loss_scaler = self.scaler.scale
        self.groups = make_groups(self.layout, self.rank)
        self.engine = StageEngine(
            self.method,
            self.optimizer,
            self.scheduler,
            self.layout,
            self.rank,
            self.groups,
            cfg.train.stage_schedule,
            cfg.optim.grad_clip,
            self.probe,
            self.scaler if self.scaler.is_enabled() else None,
        )
        self.owned = owned_state_names(self.method, self.stage)
        self.step = 0
        self.lock: RunLock | None = None  # held by rank 0 while fit() runs
        self.metrics = single.MetricsWriter(
            self.run_dir, self.info.is_main, cfg if cfg.train.wandb else None
        )
        self.global_batch = cfg.optim.batch_size * self.layout.replicas
        self.skipped_images: list[str] = []
        self.skipped_count = 0

    def build_backbone(self) -> StagedBackbone:
        """The staged backbone, cut the same way on every rank: ``balanced:K`` cuts come from
        the checkpoint being resumed (``meta.split_cuts``) or are measured once on rank 0 and
        broadcast, so no rank can disagree on which blocks its module holds."""
        cfg = self.cfg
        if parse_split(cfg.model.split).kind != "balanced":
            return build_backbone(cfg.model, cfg.data.image_size)
        src = resume.weights_source(cfg) or ckpt.find_resume(self.run_dir, cfg.train.resume)
        cuts = ckpt.load(src, mmap=True)["meta"].get("split_cuts") if src else None
        if cuts is None:
            box: list[Any] = [None]
            if self.info.is_main:
                box[0] = build_backbone(cfg.model, cfg.data.image_size).cuts
            dist.broadcast_object_list(box, src=0)
            cuts = box[0]
        return build_backbone(cfg.model, cfg.data.image_size, cuts=cuts)

    # -- state ------------------------------------------------------------------------
    def release_unowned(self) -> None:
        """Free the other stages' weights, buffers and optimizer state: this rank holds
        module k and its decoders only (their entries stay as empty placeholders)."""
        others = set().union(
            *(
                owned_state_names(self.method, k)
                for k in range(self.layout.stages)
                if k != self.stage
            )
        )
        with torch.no_grad():
            for name, t in self.method.state_dict(keep_vars=True).items():
                if name in others:  # what no stage trains stays everywhere
                    t.data = torch.empty(0, dtype=t.dtype, device=t.device)
        for p in self.method.parameters():
            if p.numel() == 0:
                self.optimizer.state.pop(p, None)

    def state_dict(self, rngs: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Every stage's part, gathered on rank 0 (None elsewhere); ``rngs``: every rank's
        generator states, rank 0 first (on rank 0)."""
        mine = None
        if self.replica == 0:
            sd = self.method.state_dict()
            mine = {
                "method": {n: sd[n] for n in self.owned},
                "optimizer": self.optimizer.state_dict()["state"],
                "probe": self.probe.state_dict() if self.probe else None,
            }
        parts: list[Any] = [None] * self.layout.world if self.info.is_main else []
        dist.gather_object(mine, parts if self.info.is_main else None, dst=0)
        if not self.info.is_main:
            return None
        method = self.method.state_dict()
        optimizer = self.optimizer.state_dict()
        probe = None
        for part in (p for p in parts if p is not None):
            method.update(part["method"])
            optimizer["state"].update(part["optimizer"])
            probe = part["probe"] or probe
        prefix = "backbone.body."
        return {
            "method": method,
            "backbone": {n[len(prefix) :]: v for n, v in method.items() if n.startswith(prefix)},
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),  # one scale, the same on every rank
            "probe": probe,
            "step": self.step,
            "rng": rngs[0],
            "rng_per_rank": rngs,  # by global rank (stage-parallel layout)
            "config": self.cfg.to_dict(),
            "meta": {
                "backbone": self.cfg.model.backbone,
                "method": self.cfg.method.name,
                "channels": self.method.backbone.channels,
                "split_cuts": self.method.backbone.cuts,
                "image_size": self.cfg.data.image_size,
                "world_size": self.layout.replicas,  # the data-parallel world (resume rules)
                "ranks": self.info.world_size,
                "stage_parallel": self.layout.stages,
                "replicas": self.layout.replicas,
                "global_batch": self.global_batch,
                "git": single.git_revision(),
            },
        }

    def save(self) -> None:
        self.engine.drain()  # a checkpoint is a state every stage agrees on
        state = self.state_dict(gather_to_main(ckpt.rng_state()))
        if state is not None:
            path = ckpt.save_run_checkpoint(
                self.run_dir, state, self.step, self.cfg.train.keep_checkpoints
            )
            log.info("checkpoint: %s (step %d)", path, self.step)
        barrier()

    def maybe_resume(self) -> None:
        """The rules of :mod:`loco.resume`, with the data-parallel world being the number of
        replicas: a checkpoint continues exactly under any K (or none) that keeps the
        replicas, hence the global batch, data order and lr; other replica counts are refused."""
        weights = resume.weights_source(self.cfg)
        path = weights or ckpt.find_resume(self.run_dir, self.cfg.train.resume)
        if path is None:
            return
        state = ckpt.load(path)
        extend = self.cfg.train.resume == "extend"
        if weights is None:
            mode = "extend" if extend else "exact"
            resume.check(path, state, self.cfg, self.layout.replicas, mode)
        single.load_method_state(self.method, path, state)
        if weights is not None:
            log.info("new schedule from the weights of %s (its step %s)", path, state.get("step"))
            return
        self.optimizer.load_state_dict(state["optimizer"])
        if not extend:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.probe and state.get("probe"):
            self.probe.load_state_dict(state["probe"])
        self.step = int(state["step"])
        self.engine.fed = self.step
        rngs = state.get("rng_per_rank") or [state["rng"]]
        same_layout = state.get("meta", {}).get("ranks") == self.info.world_size
        ckpt.set_rng_state(rngs[self.rank] if same_layout and self.rank < len(rngs) else rngs[0])
        self.metrics.truncate_after(self.step)
        log.info("resumed from %s at step %d/%d", path, self.step, self.total_steps)

    # -- loop -------------------------------------------------------------------------
    def gather_values(self) -> dict[str, float]:
        """Replica 0's losses of every stage, on rank 0."""
        parts: list[Any] = [None] * self.layout.world if self.info.is_main else []
        mine = None
        if self.replica == 0:  # each stage's own peak: the ranks hold different modules
            mine = {**self.engine.values, f"peak_mem_mb/s{self.stage + 1}": self.peak_mb()}
        dist.gather_object(mine, parts if self.info.is_main else None, dst=0)
        merged: dict[str, float] = {}
        for part in (p for p in parts if p):
            merged.update(part)
        return dict(sorted(merged.items()))

    def peak_mb(self) -> float:
        return single.peak_memory_mb(self.device)

    def describe(self) -> str:
        cfg, lay = self.cfg, self.layout
        lines = [
            f"stage parallel: {lay.stages} stages x {lay.replicas} replicas "
            f"({lay.world} ranks), schedule {cfg.train.stage_schedule}",
            f"global batch {self.global_batch} = optim.batch_size {cfg.optim.batch_size} x "
            f"{lay.replicas} replicas; lr {scaled_lr(cfg.optim, lay.replicas):g} "
            f"(base_lr {cfg.optim.base_lr:g} x {self.global_batch}/256)",
            lay.describe(),
            placement_report(self.method, cfg.data.image_size),
        ]
        return "\n".join(lines)

    def fit(self) -> Path:
        """Train (or resume) under the run lock, held by rank 0 for the whole job: no other
        run (stage-parallel or not) writes into this run dir meanwhile."""
        self.lock = single.take_run_lock(self.run_dir, self.info.is_main)
        try:
            return self._fit()
        finally:
            if self.lock is not None:
                self.lock.release()
                self.lock = None

    def _fit(self) -> Path:
        cfg = self.cfg
        if self.info.is_main:
            log.info(
                "loco %s | git %s | run dir %s",
                cfg.method.name,
                single.git_revision(),
                self.run_dir,
            )
            log.info("resolved config:\n%s", dump_yaml(cfg))
            log.info("%s", self.describe())
        self.maybe_resume()
        if self.info.is_main:  # after the resume check: a refused resume leaves it as it was
            RunDir(self.run_dir).config.write_text(dump_yaml(cfg))
        self.release_unowned()
        units = self.method.backbone.groups[self.stage]
        log.info(
            "rank %d: stage S%d of replica %d: %s (%d parameters with its decoder)",
            self.rank,
            self.stage + 1,
            self.replica,
            units[0].path if len(units) == 1 else f"{units[0].path} .. {units[-1].path}",
            sum(p.numel() for p in self.engine.params),
        )
        if self.step >= self.total_steps:
            log.info("already finished (%d steps)", self.step)
            return self.run_dir
        desc = f"pretrain {cfg.method.name} x{self.layout.stages} stages"
        bar = single.progress_bar(cfg, self.total_steps, self.step, desc, self.info.is_main)
        t_last, n_last, last_saved = time.perf_counter(), self.step, self.step
        stopped: str | None = None
        self.method.train()
        channels_last = self.device.type == "cuda" and cfg.train.channels_last
        with StopFlag() as stop:
            for views, labels, bad in resumable_batches(self.loader, self.step):
                if bad:
                    self.skipped_count += len(bad)
                    self.skipped_images += bad[: max(0, 5 - len(self.skipped_images))]
                views = [v.to(self.device, non_blocking=True) for v in views]
                if channels_last:
                    views = [v.contiguous(memory_format=torch.channels_last) for v in views]
                labels = labels.to(self.device, non_blocking=True)
                self.engine.values = {}
                with single.autocast_for(cfg, self.device):
                    self.engine.feed(views, labels)
                self.step += 1
                bar.update(1)
                # one tiny all-reduce: a stop request, a non-finite loss or a lost run lock
                # on any rank stops every rank at this step
                stopped = self.check_health(stop.reason())
                end = self.step >= self.total_steps
                if self.step % cfg.train.log_every == 0 or end:
                    values = self.gather_values()
                    if self.info.is_main:
                        now = time.perf_counter()
                        values["img_per_s"] = (
                            self.global_batch * (self.step - n_last) / max(now - t_last, 1e-9)
                        )
                        values["lr"] = self.optimizer.param_groups[0]["lr"]
                        values["epoch"] = self.step / self.steps_per_epoch
                        peaks = [v for k, v in values.items() if k.startswith("peak_mem_mb/")]
                        values["peak_mem_mb"] = max(peaks, default=self.peak_mb())
                        t_last, n_last = now, self.step
                        self.metrics.write(self.step, values)
                        single.show_losses(bar, values)
                if (
                    end
                    or self.step % cfg.train.ckpt_every == 0
                    or self.step % self.steps_per_epoch == 0
                ):
                    self.save()
                    last_saved = self.step
                if stopped or end:
                    break
            request_stop(None)
            if stopped and self.step < self.total_steps:
                single.leave_stopped(self, stopped, last_saved, bar)
        self.engine.drain()
        return single.finish(self, bar)

    def check_health(self, stop_reason: str | None) -> str | None:
        """All ranks agree, after each step: a lost run lock or a non-finite loss (of the
        batches this rank ran in the step) on any rank raises on every rank, leaving the
        last good checkpoint as it is (this step's updates are already applied: unlike the
        single-process trainer, a stage steps as soon as its gradient is complete); a stop
        request on any rank is returned as the reason to stop on every rank."""
        lost = self.lock.lost if self.lock is not None else None
        finite = all(math.isfinite(v) for k, v in self.engine.values.items() if "loss" in k)
        code = (0 if finite else 1) | (2 if lost else 0) | (4 if stop_reason else 0)
        codes = rank_codes(code)
        if any(c & 2 for c in codes):
            raise LocoError(f"stopped at step {self.step}: {lost or 'rank 0 lost the run lock'}")
        bad = [r for r, c in enumerate(codes) if c & 1]
        if bad:
            stages = sorted({self.layout.stage_of(r) + 1 for r in bad})
            raise LocoError(
                f"non-finite loss at step {self.step} on rank(s) {', '.join(map(str, bad))} "
                f"(stage(s) S{', S'.join(map(str, stages))}); the last good checkpoint "
                f"{RunDir(self.run_dir).checkpoint} is kept; lower optim.base_lr or raise "
                "method.temperature, then resume from it"
            )
        if any(c & 4 for c in codes):
            return stop_reason or "a signal on another rank"
        return None


def pretrain_stage_parallel(cfg: Config) -> Path:
    return StagePretrainer(cfg).fit()
