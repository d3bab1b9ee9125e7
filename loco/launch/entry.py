"""What runs on the nodes: ``loco JOB ...`` in every Slurm task, requeued on timeout or preemption.

:class:`LocoJob` is the callable that ``loco submit`` pickles for submitit. Each task of the
job calls it; torch.distributed comes up from submitit's ``JobEnvironment``
(:func:`loco.distributed.init_distributed`), so the training code is the one that runs
under torchrun or in a single process.

Stopping a job without losing or repeating a step:

1. Slurm sends USR2 ``signal_delay_s`` seconds before the time limit (``#SBATCH --signal``);
   a simulated preemption (submitit's ``job._interrupt()``) sends SIGTERM, then USR2. The job
   routes USR2 to :func:`loco.stop.request_stop` instead of submitit's handler, which would
   checkpoint in the middle of a step; the loops catch SIGTERM themselves, and the data
   workers ignore both (:mod:`loco.stop`).
2. Every rank finishes the current optimizer step; they agree to stop at the same step, the
   trainer saves a checkpoint of that step and raises SystemExit (feature extraction stops
   after its batch and caches nothing).
3. Rank 0 hands over to submitit's handler, which calls :meth:`LocoJob.checkpoint` (a copy of
   the job that resumes with ``train.resume=auto``), requeues the job (``scontrol requeue``)
   and exits. The other ranks exit; the requeue ends the rest of the job.

A stop by SIGTERM alone (``scancel``, ``scontrol requeue``, or a preemption that Slurm
requeues by itself) saves the same way and exits without requeueing; when Slurm restarts the
job (``SLURM_RESTART_COUNT``), it resumes all the same. Eval and transfer jobs run
``loco.cli.main([...])``. USR2 outside a stoppable loop (imports, model building, a probe on
cached features) requeues at once: nothing of this run needs saving. A
:class:`~loco.errors.LocoError` ends the job with one ``error: ...`` line in its log, as on
the command line, which ``loco jobs`` shows.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import time
from typing import Any

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

from loco import stop
from loco.errors import LocoError
from loco.rundir import RunDir

log = logging.getLogger("loco.launch")

# after a stop by SIGTERM, rank 0 waits this long for a USR2 (preemption) before exiting
TERM_GRACE_S = 10.0
# torchrun's variables, exported by sbatch from the submitting shell if set there: in this job
# ranks come from Slurm (loco.distributed reads submitit's JobEnvironment)
INHERITED = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK")


def restart_count() -> int:
    """How many times Slurm requeued this job (0 on its first run)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def _drop_timeout_guess(record: logging.LogRecord) -> bool:
    """submitit guesses "timed out" from the elapsed time alone ("Job has timed out. Ran 0
    minutes" after a manual USR2 on a short job); _on_usr2 logs what is known instead."""
    text = str(record.msg)
    return not (
        text.startswith(("Job has timed out", "Job has not timed out"))
        or (text.startswith("Caught signal SIGUSR2"))
    )


class LocoJob(Checkpointable):
    """``loco COMMAND ARGV`` as a Slurm job.

    ``config`` is the pretraining config resolved at submission (frozen: editing the YAML
    while the job waits in the queue changes nothing); ``argv`` is the command line, shown in
    logs, and what eval/transfer jobs run. ``resume`` is set on the copies that requeue.
    """

    def __init__(
        self,
        command: str,
        argv: list[str],
        run_dir: str,
        *,
        config: dict[str, Any] | None = None,
        max_requeues: int = 5,
        resume: bool = False,
    ) -> None:
        if command == "pretrain" and config is None:
            raise ValueError("a pretrain job needs its resolved config")
        self.command = command
        self.argv = list(argv)
        self.run_dir = str(run_dir)
        self.config = config
        self.max_requeues = max_requeues
        self.resume = resume
        self._usr2 = False

    def __repr__(self) -> str:
        return f"LocoJob(loco {self.command} {shlex.join(self.argv)})"

    # -- on the nodes -----------------------------------------------------------------
    def __call__(self) -> int:
        env = submitit.JobEnvironment()
        for var in INHERITED:
            os.environ.pop(var, None)
        logging.basicConfig(
            level=logging.INFO if env.global_rank == 0 else logging.WARNING,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
            force=True,
        )
        submitit_log = logging.getLogger("submitit")
        submitit_log.propagate = False  # it has its own handler
        submitit_log.addFilter(_drop_timeout_guess)
        log.info("%s | %r | restarts: %d | run dir %s", env, self, restart_count(), self.run_dir)
        self._usr2 = False
        previous = signal.signal(signal.SIGUSR2, self._on_usr2)
        self._submitit_handler = previous
        try:
            return self._run()
        except SystemExit as exc:
            if exc.code in (130, 143):  # a loop stopped at a safe point (and saved)
                self._after_stop(env, previous)
            raise
        except LocoError as exc:  # one line, as on the command line; `loco jobs` shows it
            print(f"error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        finally:
            signal.signal(signal.SIGUSR2, previous)

    def _run(self) -> int:
        if self.command == "pretrain":
            return self._pretrain()
        from loco.cli import main

        status = main([self.command, *self.argv])  # prints a LocoError as one line itself
        if status:
            raise SystemExit(status)
        return 0

    def _pretrain(self) -> int:
        from loco import train
        from loco.config import config_from_dict

        cfg = config_from_dict(self.config)
        resuming = self.resume or restart_count() > 0
        latest = RunDir(cfg.train.output_dir).checkpoint
        if resuming and latest.is_file() and cfg.train.resume != "extend":
            cfg.train.resume = "auto"  # (extend: its first save may not have happened yet)
            log.info("requeued run: resuming from %s", latest)
        train.pretrain(cfg)
        return 0

    def _on_usr2(self, signum: int, frame: Any) -> None:
        self._usr2 = True
        handler = getattr(self, "_submitit_handler", None)
        if not stop.listening() and callable(handler):
            # outside a stoppable loop (starting up, or a probe on cached features): nothing
            # of this run to save; requeue now (a pretraining resumes from its checkpoint, an
            # eval reuses its completed feature caches)
            log.warning("SIGUSR2 (time limit near, preemption, or `scancel -s USR2`): requeueing")
            handler(signum, frame)
            return
        log.warning(
            "SIGUSR2 (time limit near, preemption, or `scancel -s USR2`): stopping at the end "
            "of this step to save and requeue"
        )
        stop.request_stop("SIGUSR2")

    def _after_stop(self, env: Any, previous: Any) -> None:
        """The trainer stopped early and saved: requeue (rank 0, after USR2) or just exit."""
        if env.global_rank != 0:
            raise SystemExit(0)  # rank 0 decides; the requeue ends this task's step
        deadline = time.monotonic() + TERM_GRACE_S
        while not self._usr2 and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._usr2 and callable(previous):
            # submitit's handler: checkpoint() -> dump the new pickle -> scontrol requeue ->
            # sys.exit; it raises UncompletedJobError when it does not requeue
            previous(signal.SIGUSR2, None)

    # -- called by submitit on USR2 (rank 0) ----------------------------------------------
    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission | None:
        done = restart_count()
        if done >= self.max_requeues:
            log.warning(
                "not requeued: already requeued %d time(s), --max-requeues is %d; submit the "
                "same command again to continue from %s",
                done,
                self.max_requeues,
                self.run_dir,
            )
            return None
        log.info(
            "requeueing (%d/%d); the job resumes in %s", done + 1, self.max_requeues, self.run_dir
        )
        again = LocoJob(
            self.command,
            self.argv,
            self.run_dir,
            config=self.config,
            max_requeues=self.max_requeues,
            resume=True,
        )
        return DelayedSubmission(again)
