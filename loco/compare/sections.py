"""The sections of docs/results.md: what each one trains and evaluates, and where.

A section is a list of rows (:class:`Variant`: a ``configs/small/<config>.yaml`` plus
overrides, trained in one process or as K stage-parallel processes) x seeds, with its own
runs folder (``<runs>/<folder>``, holding ``protocol.json`` and ``summary.json``), its own
block of docs/results.md and its own plot. Rows may live in another section's folder
(``home``): the objectives section's SimCLR rows *are* the methods section's runs, reused,
not re-run. Building a section loads no config, so a row whose config key does not exist
yet (``method.objective`` before it lands) fails only when that row is planned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# the methods section's rows, in the order of its tables (configs/small/<name>.yaml)
VARIANTS: dict[str, str] = {
    "e2e": "SimCLR end to end, SimCLR's head (pool, 2-layer MLP)",
    "e2e_deep": "SimCLR end to end, LoCo's decoder (residual conv block, pool, 2-layer MLP): the fair baseline",
    "greedy": "Greedy InfoMax: a loss per stage, gradients stopped at every stage boundary; LoCo's decoder",
    "loco": "LoCo: a loss per stage, each reaching its own stage and the one below; LoCo's decoder",
    "loco_no_s1": "LoCo without the S1 loss (the paper's Figure 1); LoCo's decoder",
    "infopro": "InfoPro: per stage reconstruction + contrastive loss, gradient-isolated; its own heads",
}
ROUTINGS = ("e2e", "greedy", "loco")
OBJECTIVES = ("simclr", "byol", "vicreg")
# every routing x every objective: the pairs outside the grid above train once (seed 0) as
# the collapse check; (infopro, simclr) is the methods section's infopro row
ALL_ROUTINGS = (*ROUTINGS, "infopro")
ALL_OBJECTIVES = ("simclr", "mocov3", "byol", "barlow", "vicreg")
OBJECTIVE_COST = {"mocov3": 1.5, "byol": 1.5, "barlow": 1.05, "vicreg": 1.05}  # x simclr, ETA
SCHEDULES = ("sync", "pipelined")
# the stage-parallel rows' split: quarter-width ResNet-18 cut after block 3 = 52/48 % of the
# FLOPs (docs/bench.md, "Stage parallelism"; split=2 would be 62/38 %)
STAGE_SPLIT = "model.split=[3]"


@dataclass(frozen=True)
class Variant:
    """One row: ``configs/small/<config>.yaml`` + the section's and its own overrides."""

    name: str
    config: str
    about: str = ""
    overrides: tuple[str, ...] = ()
    eval_overrides: tuple[str, ...] = ()  # e.g. evaluate at the timm stages, not the modules
    processes: int = 1  # > 1: torchrun with that many CPU processes (1 thread each)
    home: str | None = None  # the section whose runs folder holds this row (shared runs)
    folder: str | None = None  # its folder there (default: name)
    cost: float | None = None  # ETA prior per step, x e2e, until measured
    seeds: tuple[int, ...] | None = None  # trained at these of the section's seeds only

    @property
    def dir_name(self) -> str:
        return self.folder or self.name


@dataclass(frozen=True)
class Section:
    name: str
    title: str
    folder: str  # under --runs
    plot: str  # file name under --docs
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...] = (0, 1)
    overrides: tuple[str, ...] = ()
    reference: bool = True
    floor: bool = True
    bench: bool = True
    floor_home: str | None = None  # the section whose random-init floor runs this one reuses
    stages: int = 4  # readout stages of its tables (columns shown before results exist)
    template: str = "report.md"  # its prose, next to this module (methods-like sections)
    cost_scale: float = 1.0  # ETA prior: a step of its network x the small ResNet-18's
    about: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def command(self) -> str:
        if self.name == "methods":
            return "python tools/compare.py"
        return f"python tools/compare.py --section {self.name}"


def _methods() -> Section:
    return Section(
        "methods",
        "Local learning at small scale: e2e, greedy, LoCo, InfoPro on CIFAR-10",
        "compare",
        "results_top1.png",
        tuple(Variant(n, n, about) for n, about in VARIANTS.items()),
        about="every method of configs/small/ x 2 seeds, random-init floor, independent SimCLR, bench",
    )


def _presnet() -> Section:
    # exactly the runs of `python tools/compare.py --methods e2e,greedy,loco --seeds 0,1
    # --out runs/compare_presnet --no-reference model.backbone=presnet50 "model.kwargs={width: 0.25}"`
    return Section(
        "presnet",
        "PResNet at small scale: e2e, greedy, LoCo on a narrow Progressive ResNet-50",
        "compare_presnet",
        "results_presnet.png",
        tuple(Variant(n, n, VARIANTS[n]) for n in ROUTINGS),
        overrides=("model.backbone=presnet50", "model.kwargs={width: 0.25}"),
        reference=False,
        stages=6,
        template="presnet.md",
        cost_scale=1.8,  # forward 162 vs 89 MFLOPs per 32 px image (torch's FLOP counter)
        about="e2e/greedy/loco on a quarter-width PResNet-50 (six stages) x 2 seeds",
    )


def _stage_parallel() -> Section:
    rows = tuple(
        Variant(
            f"loco_{schedule}",
            "loco",
            f"LoCo, 2 modules on 2 CPU processes (train.stage_parallel=2), schedule `{schedule}`",
            overrides=(
                STAGE_SPLIT,
                "train.stage_parallel=2",
                f"train.stage_schedule={schedule}",
                "train.log_every=5",  # a loss curve of 30 points
            ),
            eval_overrides=("model.split=stages",),
            processes=2,
            cost=1.0 if schedule == "pipelined" else 1.2,
        )
        for schedule in SCHEDULES
    )
    return Section(
        "stage_parallel",
        "Stage parallelism: LoCo on 2 processes, sync vs pipelined",
        "compare_stage_parallel",
        "results_stage_parallel.png",
        rows,
        reference=False,
        floor=False,
        bench=False,
        about="loco with train.stage_parallel=2, schedules sync and pipelined, x 2 seeds",
    )


def objective_variant(
    routing: str, objective: str, seeds: tuple[int, ...] | None = None
) -> Variant:
    about = f"{VARIANTS[routing].split(';')[0].split(',')[0]}, objective {objective}"
    if objective == "simclr":  # today's runs: the methods section's, reused
        return Variant(
            f"{routing}_simclr", routing, about, home="methods", folder=routing, seeds=seeds
        )
    return Variant(
        f"{routing}_{objective}",
        routing,
        about,
        overrides=(f"method.objective={objective}",),
        cost=OBJECTIVE_COST[objective] * (2.1 if routing == "infopro" else 1.0),
        seeds=seeds,
    )


def pair_rows() -> tuple[Variant, ...]:
    """The (routing, objective) pairs outside the 2-seed grid, seed 0 only: every objective
    trains under every routing, checked for collapse at the same protocol."""
    grid = {(r, o) for r in ROUTINGS for o in OBJECTIVES}
    return tuple(
        objective_variant(r, o, seeds=(0,))
        for o in ALL_OBJECTIVES
        for r in ALL_ROUTINGS
        if (r, o) not in grid and (r, o) != ("infopro", "simclr")
    )


def _objectives() -> Section:
    return Section(
        "objectives",
        "Objectives x routing: SimCLR, BYOL, VICReg with e2e, greedy, LoCo; every pair checked",
        "compare_objectives",
        "results_objectives.png",
        (*(objective_variant(r, o) for o in OBJECTIVES for r in ROUTINGS), *pair_rows()),
        reference=False,
        bench=False,
        floor_home="methods",
        about="routing {e2e, greedy, loco} x objective {simclr, byol, vicreg} x 2 seeds; "
        "the other routing x objective pairs (mocov3, barlow; infopro) at seed 0",
    )


SECTIONS: dict[str, Section] = {
    s.name: s for s in (_methods(), _presnet(), _stage_parallel(), _objectives())
}
ORDER = tuple(SECTIONS)  # the order of docs/results.md and of --section all
