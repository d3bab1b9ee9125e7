"""The run lock: one run trains in a run directory at a time.

Two processes training into one directory interleave ``metrics.jsonl`` and overwrite each
other's checkpoints (a job launched twice, a requeued job overlapping its zombie). The lock is
a file created with ``O_CREAT | O_EXCL``, which is atomic on NFS and Lustre where ``flock``
is not; it holds who owns it (host, pid, Slurm job id and ``SLURM_RESTART_COUNT``) and a
heartbeat that a background thread refreshes every :data:`HEARTBEAT_S` seconds.

A lock that exists belongs to a live run unless it is provably stale:

- its pid is dead and it was taken on this host;
- it was taken by the same Slurm job with a lower ``SLURM_RESTART_COUNT`` (we are the requeue);
- its heartbeat is older than :data:`STALE_S` seconds (a run on another host that died).

A zombie of the same job and restart count is live: it still writes. A stale lock is taken
over with a log line; a live one stops the new run with a one-line :class:`LocoError`. Only
one process of a multi-rank job takes it (rank 0); the trainer shares the outcome.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from loco.errors import LocoError

log = logging.getLogger("loco.runlock")

HEARTBEAT_S = 30.0  # how often the holder refreshes its heartbeat
STALE_S = 600.0  # a heartbeat older than this proves the holder dead (clock skew included)


@dataclass(frozen=True)
class Holder:
    """What the lock file says about its owner."""

    host: str
    pid: int
    job_id: str  # SLURM_JOB_ID, "" outside Slurm
    restart_count: int  # SLURM_RESTART_COUNT
    since: float  # time.time() when taken
    heartbeat: float  # time.time() of the last refresh
    token: str  # unique per acquisition: tells our lock from a successor's

    @classmethod
    def me(cls) -> Holder:
        now = time.time()
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            job_id=os.environ.get("SLURM_JOB_ID", ""),
            restart_count=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            since=now,
            heartbeat=now,
            token=uuid.uuid4().hex,
        )

    def describe(self) -> str:
        since = datetime.datetime.fromtimestamp(self.since).isoformat(timespec="seconds")
        job = f", Slurm job {self.job_id} (restart {self.restart_count})" if self.job_id else ""
        age = max(0.0, time.time() - self.heartbeat)
        return f"host {self.host}, pid {self.pid}{job}, since {since}, heartbeat {age:.0f} s ago"


def _read(path: Path) -> Holder | None:
    """The holder in ``path``; a file being written (or garbled) reads as an unknown holder
    whose heartbeat is the file's mtime. None when there is no lock."""
    try:
        text = path.read_text()
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        return Holder(**json.loads(text))
    except (ValueError, TypeError):
        return Holder("?", -1, "", 0, mtime, mtime, "")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def stale_reason(holder: Holder, me: Holder, stale_s: float = STALE_S) -> str | None:
    """Why ``holder``'s lock is provably stale for ``me``, or None when it may be live."""
    if holder.host == me.host and holder.pid > 0 and not _pid_alive(holder.pid):
        return f"pid {holder.pid} is dead on this host"
    if me.job_id and holder.job_id == me.job_id and me.restart_count > holder.restart_count:
        return (
            f"Slurm requeued job {me.job_id} (restart {holder.restart_count} -> {me.restart_count})"
        )
    age = time.time() - holder.heartbeat
    if age > stale_s:
        return f"no heartbeat for {age:.0f} s (> {stale_s:.0f} s)"
    return None


def _write_exclusive(path: Path, holder: Holder) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(asdict(holder)))
        f.flush()
        os.fsync(f.fileno())
    return True


def busy_error(root: Path, path: Path, holder: Holder, stale_s: float = STALE_S) -> LocoError:
    stop = f"scancel {holder.job_id}" if holder.job_id else f"kill {holder.pid} on {holder.host}"
    return LocoError(
        f"run dir {root} is in use by another run ({holder.describe()}); wait for it, stop it "
        f"({stop}) or use another train.output_dir; if that run is gone, delete {path} "
        f"(a lock without a heartbeat for {stale_s / 60:.0f} min is taken over by itself)"
    )


class RunLock:
    """Exclusive lock on a run directory, held from :meth:`acquire` to :meth:`release`."""

    def __init__(
        self, path: Path, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S
    ) -> None:
        self.path = Path(path)
        self.heartbeat_s = heartbeat_s
        self.stale_s = stale_s
        self.holder: Holder | None = None
        self.lost: str | None = None  # set when another run took the lock from us
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = Holder.me()
        for _ in range(10):  # retries only when a lock vanishes or is taken between two reads
            if _write_exclusive(self.path, me):
                self.holder = me
                self._thread = threading.Thread(target=self._beat, name="runlock", daemon=True)
                self._thread.start()
                return self
            other = _read(self.path)
            if other is None:
                continue
            reason = stale_reason(other, me, self.stale_s)
            if reason is None:
                raise busy_error(self.path.parent, self.path, other, self.stale_s)
            if self._remove_if_unchanged(other):
                log.warning(
                    "run lock %s: took over from %s: %s", self.path, other.describe(), reason
                )
        raise LocoError(f"could not take the run lock {self.path}: it keeps changing; retry")

    def _remove_if_unchanged(self, seen: Holder) -> bool:
        """Remove the lock if it still is ``seen``: rename it aside (atomic, one winner), then
        put it back if it changed between our read and the rename."""
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = _read(aside)
        if moved is not None and moved.token == seen.token and moved.heartbeat == seen.heartbeat:
            aside.unlink(missing_ok=True)
            return True
        try:
            os.link(aside, self.path)  # refreshed meanwhile: restore it (never over a new lock)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return False

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.refresh()

    def refresh(self) -> None:
        """Rewrite the heartbeat, unless another run has taken the lock (then set ``lost``)."""
        if self.holder is None:
            return
        current = _read(self.path)
        if current is not None and not current.token:
            return  # caught mid-write (unreadable): look again at the next beat
        if current is None or current.token != self.holder.token:
            self.lost = (
                f"the run lock {self.path} was taken over by "
                f"{current.describe() if current else 'nobody (deleted)'}"
            )
            return
        self.holder = Holder(**{**asdict(self.holder), "heartbeat": time.time()})
        tmp = self.path.with_name(f"{self.path.name}.{self.holder.token[:8]}.tmp")
        tmp.write_text(json.dumps(asdict(self.holder)))
        os.replace(tmp, self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.holder is not None:
            current = _read(self.path)
            if current is not None and current.token == self.holder.token:
                self.path.unlink(missing_ok=True)
            self.holder = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_free(path: Path, stale_s: float = STALE_S) -> None:
    """Raise the one-line error if a live run holds the lock at ``path`` (takes nothing)."""
    holder = _read(path)
    if holder is not None and stale_reason(holder, Holder.me(), stale_s) is None:
        raise busy_error(path.parent, path, holder, stale_s)
