"""One run per directory: `out_dir/.zerolaunch.lock`, held by rank 0 for the run's life.

Two launches into one run directory would both resume from the same tag, interleave their
metrics and overwrite each other's checkpoints. The lock file is created exclusively
(O_CREAT | O_EXCL, atomic on local and NFSv3+ filesystems alike) and says who holds it: host,
pid, the process's start time, the Slurm job. A thread touches it every HEARTBEAT_S so that
other machines of a shared filesystem can tell a live holder from a dead one.

A lock is stale, and taken over with a warning, when its holder is this Slurm job's previous
incarnation (a requeue: a lower SLURM_RESTART_COUNT), a process of this host that no longer
runs, or a process elsewhere whose heartbeat stopped STALE_S ago. Tools that only read a run
(sample, export, ckpt, report) never take it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from launcher.errors import UserError

LOCK_FILE = ".zerolaunch.lock"
HEARTBEAT_S = 30.0
STALE_S = 180.0
"""A holder on another machine whose heartbeat is older than this is presumed dead."""


@dataclass(frozen=True)
class Holder:
    """Who holds a run directory."""

    host: str
    pid: int
    process_start: float
    """The holder process's start (psutil create_time): a reused pid is not the holder."""
    since: float
    job: str | None = None
    """SLURM_JOB_ID of the holder, if it ran under Slurm."""
    restart: int = 0
    """SLURM_RESTART_COUNT of the holder: a requeue counts up."""

    @classmethod
    def me(cls) -> Holder:
        import psutil

        pid = os.getpid()
        return cls(
            socket.gethostname(),
            pid,
            psutil.Process(pid).create_time(),
            time.time(),
            os.environ.get("SLURM_JOB_ID"),
            int(os.environ.get("SLURM_RESTART_COUNT") or 0),
        )

    def describe(self) -> str:
        job = f", Slurm job {self.job}" if self.job else ""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} on {self.host}{job}, since {since}"


class RunLockError(UserError):
    """The run directory is held by a live run."""


def stale_reason(holder: Holder | None, heartbeat_age: float, me: Holder) -> str | None:
    """Why a lock whose holder is `holder` (None: unreadable) is stale, or None if it is live."""
    if holder is None:
        return "its lock file is unreadable" if heartbeat_age > HEARTBEAT_S else None
    if holder.job and holder.job == me.job and holder.restart < me.restart:
        return f"it was this Slurm job ({me.job}) before its requeue"
    if holder.host == me.host:
        return None if _running(holder) else f"pid {holder.pid} no longer runs on {holder.host}"
    if heartbeat_age > STALE_S:
        return f"its heartbeat stopped {heartbeat_age:.0f} s ago"
    return None


def _running(holder: Holder) -> bool:
    import psutil

    try:
        process = psutil.Process(holder.pid)
        return abs(process.create_time() - holder.process_start) < 1.0 and (
            process.status() != psutil.STATUS_ZOMBIE
        )
    except psutil.Error:
        return False


class RunLock:
    """The lock of one run directory, held by this process until `release`."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.me = Holder.me()
        self.text = json.dumps(asdict(self.me))
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> str | None:
        """Take the lock (a warning when a stale one was taken over); RunLockError if a live
        run holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        warning = None
        if not self._create():
            holder, age = self._read()
            why = stale_reason(holder, age, self.me)
            if why is None:
                raise RunLockError(self._busy(holder))
            warning = f"took over the lock of {self.path.parent} ({why})"
            self._take_over(holder)
        atexit.register(self.release)
        self._beat = threading.Thread(target=self._heartbeat, name="run-lock", daemon=True)
        self._beat.start()
        return warning

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self.text)
        return True

    def _read(self) -> tuple[Holder | None, float]:
        age = float("inf")
        try:
            age = time.time() - self.path.stat().st_mtime
            return Holder(**json.loads(self.path.read_text())), age
        except (OSError, ValueError, TypeError):
            return None, age

    def _take_over(self, holder: Holder | None) -> None:
        """Replace a stale lock; if another launch took it over at the same moment, one of the
        two sees the other's holder on reading back and stops."""
        tmp = self.path.with_name(f"{LOCK_FILE}.{self.me.host}.{self.me.pid}")
        tmp.write_text(self.text)
        os.replace(tmp, self.path)
        time.sleep(0.2)
        if self.path.read_text() != self.text:
            raise RunLockError(self._busy(self._read()[0]))

    def _busy(self, holder: Holder | None) -> str:
        who = holder.describe() if holder else "a run whose lock file is being written"
        return (
            f"{self.path.parent} is in use by another run ({who}): two runs in one directory "
            "would overwrite each other's checkpoints and metrics. Wait for it to end, stop it "
            f"(kill -USR1 {holder.pid if holder else 'PID'} saves and exits), or pick another "
            f"out_dir (or name). If that run is gone without a trace, delete {self.path}"
        )

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Give the directory back (only a lock that is still ours is removed)."""
        self._stop.set()
        with contextlib.suppress(OSError):
            if self.path.read_text() == self.text:
                self.path.unlink()
