"""Which rank runs which local module: K stage groups x world/K data-parallel replicas.

Rank ``r * K + k`` is stage k of replica r, so the K ranks of one replica are neighbours:
under torchrun or Slurm with K tasks per node, a replica's stages share a node (fast
point-to-point for activations) and replicas span nodes (one gradient all-reduce per stage).
Every check here runs before any process starts work, so bad input fails in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.distributed as dist

from loco.errors import LocoError

if TYPE_CHECKING:
    from loco.config import Config


@dataclass(frozen=True)
class StageLayout:
    world: int
    stages: int

    @property
    def replicas(self) -> int:
        return self.world // self.stages

    def stage_of(self, rank: int) -> int:
        return rank % self.stages

    def replica_of(self, rank: int) -> int:
        return rank // self.stages

    def rank_of(self, stage: int, replica: int) -> int:
        return replica * self.stages + stage

    def stage_ranks(self, stage: int) -> list[int]:
        """The replicas of one stage: they share negatives and average gradients."""
        return [self.rank_of(stage, r) for r in range(self.replicas)]

    def replica_ranks(self, replica: int) -> list[int]:
        """The stages of one replica: activations go up and cotangents down among them."""
        return [self.rank_of(k, replica) for k in range(self.stages)]

    def describe(self) -> str:
        rows = [
            f"  stage S{k + 1}: ranks {', '.join(map(str, self.stage_ranks(k)))}"
            for k in range(self.stages)
        ]
        return "\n".join(rows)


def check_request(
    stages: int, world: int, method: str, num_modules: int | None = None
) -> StageLayout:
    """The layout for ``train.stage_parallel=stages`` on ``world`` ranks, or a one-line error."""
    if stages > 1 and method == "e2e":
        raise LocoError(
            "train.stage_parallel>1 needs a local method (greedy, loco, infopro); e2e keeps "
            "plain data parallelism: set train.stage_parallel=1"
        )
    if stages < 1 or world % stages:
        raise LocoError(
            f"train.stage_parallel={stages} does not divide the world size {world}: launch a "
            f"multiple of {stages} processes (stages x replicas)"
        )
    if num_modules is not None and num_modules != stages:
        raise LocoError(
            f"train.stage_parallel={stages} but model.split gives {num_modules} local modules: "
            f"one module per stage, so set model.split={stages} (or train.stage_parallel={num_modules})"
        )
    return StageLayout(world, stages)


def check_modules(param_counts: list[int]) -> None:
    """A stage needs a module with weights of its own (a module without parameters has
    nothing to train and only adds a pipeline hop)."""
    empty = [k + 1 for k, n in enumerate(param_counts) if n == 0]
    if empty:
        raise LocoError(
            f"local module(s) S{', S'.join(map(str, empty))} have no trainable parameters, too "
            "small for a stage of their own: choose cut points in model.split that give every "
            "module at least one block"
        )


def check_config(cfg: Config, world: int) -> StageLayout:
    """Everything about ``train.stage_parallel`` that can be refused before a process builds
    data or a model (the trainer at start, ``loco submit`` before queueing)."""
    if cfg.monitor.knn_every > 0:
        raise LocoError(
            "monitor.knn_every>0 needs the whole backbone on one rank; with "
            "train.stage_parallel>1 set monitor.knn_every=0 and run loco eval on the checkpoint"
        )
    if cfg.model.sync_bn:
        raise LocoError(
            "model.sync_bn is not supported with train.stage_parallel>1 yet (each stage's "
            "replicas would sync over their stage group); set model.sync_bn=false"
        )
    if cfg.train.precision == "fp16" and cfg.train.stage_schedule != "sync":
        raise LocoError(
            "train.precision=fp16 with train.stage_schedule=pipelined: the stages' updates of "
            "one step belong to different batches, so they cannot skip an overflow together; "
            "use train.precision=bf16 or train.stage_schedule=sync"
        )
    if cfg.train.compile:
        raise LocoError(
            "train.compile=true is not supported with train.stage_parallel>1 yet (untested with "
            "the pipelined weight stash); set train.compile=false"
        )
    if world == 1:
        raise LocoError(
            f"train.stage_parallel={cfg.train.stage_parallel} needs a multiple of "
            f"{cfg.train.stage_parallel} processes; launch with torchrun "
            f"--nproc_per_node={cfg.train.stage_parallel} -m loco pretrain ... or loco submit "
            f"pretrain --stage-parallel {cfg.train.stage_parallel}"
        )
    return check_request(cfg.train.stage_parallel, world, cfg.method.name)


@dataclass
class StageGroups:
    """This rank's process groups (every rank creates every group, in the same order, as
    torch.distributed requires)."""

    stage: dist.ProcessGroup | None  # the replicas of this rank's stage
    replica: dist.ProcessGroup | None  # the stages of this rank's replica (collectives)
    p2p: dist.ProcessGroup | None  # the same ranks again, for activations and cotangents only:
    # NCCL serialises a communicator's operations, so sends that cross a step boundary
    # (pipelined) must not queue behind that step's collectives


def make_groups(layout: StageLayout, rank: int) -> StageGroups:
    mine: dict[str, dist.ProcessGroup | None] = {}
    for k in range(layout.stages):
        g = dist.new_group(layout.stage_ranks(k))
        if k == layout.stage_of(rank):
            mine["stage"] = g
    for kind in ("replica", "p2p"):
        for r in range(layout.replicas):
            g = dist.new_group(layout.replica_ranks(r))
            if r == layout.replica_of(rank):
                mine[kind] = g
    return StageGroups(**mine)


def stage_mapping(job: str, stages: int, nodes: int, tasks_per_node: int) -> str:
    """``loco submit --stage-parallel K``: which Slurm task runs which stage (checked first)."""
    if job != "pretrain":
        raise LocoError(f"--stage-parallel applies to pretrain, not {job}")
    world = nodes * tasks_per_node
    layout = check_request(stages, world, "greedy")
    lines = [
        f"# stage parallel: {stages} stages x {layout.replicas} replicas on {nodes} node(s) x "
        f"{tasks_per_node} task(s); global batch = optim.batch_size x {layout.replicas}"
    ]
    for rank in range(world):
        node, local = divmod(rank, tasks_per_node)
        lines.append(
            f"#   task {rank} (node {node}, local {local}) -> stage S{layout.stage_of(rank) + 1}, "
            f"replica {layout.replica_of(rank)}"
        )
    return "\n".join(lines)


def batch_and_lr(config: dict, stages: int, world: int) -> str:
    """The global batch and learning rate a stage-parallel launch trains with."""
    from loco.config import config_from_dict
    from loco.optim import scaled_lr

    optim = config_from_dict(config).optim
    replicas = world // stages
    return (
        f"# global batch {optim.batch_size * replicas} = optim.batch_size {optim.batch_size} x "
        f"{replicas} replicas; lr {scaled_lr(optim, replicas):g} = base_lr {optim.base_lr:g} x "
        f"{optim.batch_size * replicas}/256"
    )
