"""Running the comparison: each job in-process (pretraining, ``evaluate_run``, the bench,
the independent SimCLR), skipping finished ones, rewriting the report after each."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

from loco.compare.collect import collect
from loco.compare.plan import (
    FLOOR,
    REFERENCE,
    ROOT,
    _t,
    base_config,
    bench_argv,
    check_protocol,
    estimate,
    is_done,
    jobs,
    parse_args,
    pretrain_config,
    reference_settings,
    run_dir,
    simclr_minimal,
    torchrun_argv,
    unavailable,
    variant,
)
from loco.compare.write import write_outputs
from loco.errors import LocoError
from loco.rundir import RunDir


def run_job(args: argparse.Namespace, kind: str, name: str, seed: int | None) -> None:
    from loco.eval import evaluate_run
    from loco.train import pretrain

    rd = run_dir(args, name, seed) if seed is not None else None
    if kind == "bench":
        from loco import bench

        parser = argparse.ArgumentParser()
        bench.add_arguments(parser)
        bench.run(parser.parse_args(bench_argv(args, name)))
        return
    if kind == "pretrain" and name == REFERENCE:
        simclr_minimal().train(reference_settings(args, seed))
        return
    if kind == "pretrain" and variant(args, name).processes > 1:
        pretrain_config(args, name, seed)  # a bad config fails here, before any process starts
        run_processes(torchrun_argv(args, name, seed))
        return
    if kind == "pretrain":
        pretrain(pretrain_config(args, name, seed))
        return
    common = dict(
        knn=True,
        linear=True,
        train_per_class=args.eval_train_per_class,
        val_per_class=args.eval_val_per_class,
        seed=seed,
        batch_size=args.eval_batch,
        epochs=args.linear_epochs,
        progress=False,
    )
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if name == FLOOR:
        evaluate_run(base_config(args, seed), None, rd / "eval", **common)
    elif name == REFERENCE:
        weights = rd / f"{REFERENCE}.pt"
        evaluate_run(base_config(args, seed), weights, rd / "eval", **common)
        # the reference's own kNN (its own code, last stage) cross-checks loco's evaluation
        extra["own_knn_top1"] = simclr_minimal().knn_top1(
            reference_settings(args, seed),
            weights,
            args.eval_train_per_class,
            args.eval_val_per_class,
        )
    else:
        overrides = variant(args, name).eval_overrides
        evaluate_run(None, RunDir(rd).checkpoint, rd / "eval", overrides=overrides, **common)
    done = {"eval_s": time.perf_counter() - t0, **extra}
    (rd / "eval" / "done.json").write_text(json.dumps(done, indent=1) + "\n")


def run_processes(argv: list[str]) -> None:
    """Stage-parallel pretraining: torchrun's CPU processes, one thread each. Ctrl-C reaches
    them too (same process group): they save a checkpoint, and we wait for that."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.Popen(argv, env=env)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    if code == 130:
        raise KeyboardInterrupt
    if code != 0:
        raise LocoError(
            f"stage-parallel pretraining exited with status {code} (its log is above); "
            "fix the cause and re-run the same command"
        )


# -- main -----------------------------------------------------------------------------------
def describe(kind: str, name: str, seed: int | None) -> str:
    return f"{kind} {name}" + (f" seed {seed}" if seed is not None else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.sections:
        return run_section(args)
    worst = 0
    for section_args in args.sections:  # every section in the page's order
        print(f"== section {section_args.section.name}: {section_args.display}", flush=True)
        code = run_section(section_args)
        if code not in (0, 2):  # interrupted: stop; a section that cannot run: the next one
            return code
        worst = max(worst, code)
    if args.plan:
        shared: dict = {}
        for a in args.sections:
            shared.update(getattr(a, "eta", {}))
        print(
            f"\nall sections: estimate {_t(sum(shared.values()))} to run (jobs shared by sections "
            "counted once; idle 2-core guess until measured)"
        )
    return worst


def run_section(args: argparse.Namespace) -> int:
    try:
        check_protocol(args)
        all_jobs = jobs(args)
        if args.report_only:
            write_outputs(args, all_jobs)
            print(
                f"wrote {args.docs / 'results.md'} ({args.section.name}) and {args.out / 'summary.json'}"
            )
            return 0
        summary = collect(args, all_jobs)
        todo = [j for j in all_jobs if not is_done(args, *j)]
        args.eta = {  # per job, keyed by where it writes: sections share the methods runs
            (j[0], str(run_dir(args, j[1], j[2]) if j[2] is not None else args.out / j[1])): (
                estimate(args, summary, *j)
            )
            for j in todo
        }
        total = sum(args.eta.values())
        print(
            f"compare {args.section.name}: {len(all_jobs)} jobs, {len(all_jobs) - len(todo)} done, {len(todo)} to run; "
            f"estimate {_t(total)} (idle 2-core guess until measured)",
            flush=True,
        )
        if args.plan:
            for kind, name, seed in all_jobs:
                state = (
                    "done"
                    if (kind, name, seed) not in todo
                    else f"~{_t(estimate(args, summary, kind, name, seed))}"
                )
                why = unavailable(args, name) if kind == "pretrain" and name != REFERENCE else None
                if why:
                    state += f"  UNAVAILABLE: {why}"
                print(f"  {describe(kind, name, seed):<34} {state}")
            for name in summary["methods"]:
                print(
                    f"\n# {name}\n"
                    + "\n".join(summary["methods"][name]["commands"][str(args.seeds[0])])
                )
            return 0
        t_start = time.perf_counter()
        for i, job in enumerate(all_jobs, 1):
            desc = describe(*job)
            if is_done(args, *job):
                print(f"[{i}/{len(all_jobs)}] {desc}: done, skipped", flush=True)
                continue
            print(
                f"[{i}/{len(all_jobs)}] {desc} (~{_t(estimate(args, summary, *job))}) ...",
                flush=True,
            )
            t0 = time.perf_counter()
            try:
                run_job(args, *job)
            except Exception as exc:  # the benchmark is optional; a missing one leaves '-' cells
                if job[0] != "bench":
                    raise
                print(
                    f"[{i}/{len(all_jobs)}] {desc}: FAILED ({type(exc).__name__}: {exc}); cost cells stay empty",
                    flush=True,
                )
            gc.collect()
            summary = write_outputs(args, all_jobs)
            left = sum(estimate(args, summary, *j) for j in all_jobs[i:] if not is_done(args, *j))
            print(
                f"[{i}/{len(all_jobs)}] {desc}: {_t(time.perf_counter() - t0)}; elapsed "
                f"{_t(time.perf_counter() - t_start)}, ETA {_t(left)}",
                flush=True,
            )
        write_outputs(args, all_jobs)
        print(
            f"done: {args.docs / 'results.md'} ({args.section.name}), "
            f"{args.docs / args.section.plot}, {args.out / 'summary.json'}"
        )
        return 0
    except LocoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit) as exc:
        code = exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 130
        print(
            "\ninterrupted: re-run the same command to resume (finished jobs are skipped)",
            file=sys.stderr,
        )
        return code
