"""Stopping early and cleanly: on a signal, a stop file, or before a time limit runs out.

Slurm warns a job before its time limit (`#SBATCH --signal=B:USR1@120`) or before preemption
(SIGTERM), a user may ask a run to stop (`kill -USR1`), and a spec may give the run a wall-time
budget (`train.time_limit`). A signal reaches ranks at different moments, or only some of them;
acting on it mid-step would leave the others waiting in a collective. So a handler only records
it, and at every step boundary all ranks all-reduce what they know: they stop together, at the
same step, save one checkpoint together, and exit with EXIT_REQUEUE (75).

The all-reduce of a boundary is read at the next one (`LaggedMax`), so the loop never waits for
the device between log steps: a stop takes effect one step after it is asked for.

The time limit is the earlier of `train.time_limit` after the process started and the end of the
Slurm job (its EndTime, read with scontrol). The run stops at the last step boundary from which
one more step and a checkpoint are still predicted to fit, from the slowest step and the slowest
save seen so far in this process (two steps, since the decision arrives a step late).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from launcher.errors import launcher_rank
from launcher.runtime import slurm

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
"""The signals that ask for a save-and-stop, the least telling first: a Ctrl-C reaches the
deepspeed launcher too, which passes it on to the ranks as SIGTERM, and Slurm's USR1 warning
comes before its TERM; the reason a run gives is the most telling one any rank received."""
TIME_LIMIT = "the time limit is near"
"""The reason a run gives when it stops for its time limit."""
LAUNCHER_CHECK_S = 1.0
"""How often a rank checks that the launcher that started it is still there."""
SLURM_RECHECK_S = 300.0
"""How often rank 0 re-reads the Slurm job's end time (an admin may extend it)."""
SAVE_BYTES_PER_S = 200e6
"""Before a save has been timed: assume this rate (a slow shared filesystem) plus 5 s."""

_received: list[int] = []


def _record(signum: int, frame: object) -> None:
    if signum == signal.SIGINT and signal.SIGINT in _received:
        raise KeyboardInterrupt  # Ctrl-C twice: stop now, without the save
    _received.append(signum)
    if signum == signal.SIGINT and launcher_rank() == 0:
        print(
            "\ninterrupted: saving at the next step boundary, then stopping (Ctrl-C again to "
            "stop at once, without saving)",
            file=sys.stderr,
            flush=True,
        )


def install_signal_handlers() -> None:
    """From now on USR1, TERM and a first INT (Ctrl-C) ask for a save-and-stop instead of
    killing the process; a second INT stops it at once."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record)


def launcher_chain() -> list[tuple[int, float]]:
    """(pid, start time) of the launcher processes above this one (the deepspeed runner and its
    launch.py, torchrun's agent): a rank whose launcher is gone stops with a save instead of
    training on with nobody watching. Empty for a process started by a shell, srun or mpirun
    (a run under `nohup` survives its shell as intended)."""
    import psutil

    chain = []
    try:
        parent = psutil.Process().parent()
        while parent is not None and _is_launcher(parent.cmdline()):
            chain.append((parent.pid, parent.create_time()))
            parent = parent.parent()
    except psutil.Error:
        pass
    return chain


def _is_launcher(cmdline: list[str]) -> bool:
    text = " ".join(cmdline)
    markers = ("deepspeed.launcher", "bin/deepspeed", "torch.distributed.run", "bin/torchrun")
    return any(m in text for m in markers)


def launcher_gone(chain: list[tuple[int, float]]) -> int | None:
    """The pid of the first launcher of `chain` that is no longer running, or None."""
    import psutil

    for pid, started in chain:
        try:
            process = psutil.Process(pid)
            alive = process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            alive = False
        if not alive:
            return pid
    return None


def received_signal() -> int:
    """The most telling stop signal this process received, as its place in STOP_SIGNALS
    counted from 1 (0 if none): every rank's maximum is the reason the run stops."""
    return max((STOP_SIGNALS.index(s) + 1 for s in _received), default=0)


class Deadline:
    """When the run must be over: `train.time_limit` after the process started, or the end of
    the Slurm job (rank 0 reads it with scontrol, again every SLURM_RECHECK_S), whichever is
    first."""

    def __init__(
        self,
        own: float | None,
        slurm_job_id: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.own, self.slurm_job_id, self.clock = own, slurm_job_id, clock
        self.slurm_end: float | None = None
        self.slurm_checked = -float("inf")

    @classmethod
    def after(cls, time_limit_s: float | None, started_wall: float, **kwargs) -> Deadline:
        """The deadline of a process started at `started_wall` with this budget (or none)."""
        return cls(started_wall + time_limit_s if time_limit_s else None, **kwargs)

    def at(self, now: float) -> float | None:
        """The deadline as known at `now` (None: no limit)."""
        if self.slurm_job_id and now - self.slurm_checked > SLURM_RECHECK_S:
            self.slurm_end, self.slurm_checked = slurm.job_end_time(self.slurm_job_id), now
        limits = [d for d in (self.own, self.slurm_end) if d is not None]
        return min(limits) if limits else None


class LaggedMax:
    """Every rank's element-wise maximum of a few flags, one call behind.

    Each call starts this call's all-reduce and returns the previous call's result (zeros the
    first time). On GPUs nothing waits for the device to drain: the values travel through
    pinned host buffers with asynchronous copies, and a call waits only for the previous call's
    all-reduce, queued a whole step earlier. Two slots alternate, so a buffer is reused only
    after the work that read it is known to be done.
    """

    def __init__(self, size: int, device: torch.device) -> None:
        pinned = device.type == "cuda"
        self.size, self.device, self.cuda = size, device, pinned
        self.send = [torch.zeros(size, pin_memory=pinned) for _ in range(2)]
        self.recv = [torch.zeros(size, pin_memory=pinned) for _ in range(2)]
        self.reduced = [torch.zeros(size, device=device) for _ in range(2)]
        self.done: list[torch.cuda.Event | None] = [None, None]
        self.calls = 0

    def __call__(self, values: list[float], on_device: torch.Tensor | None = None) -> list[float]:
        """`values` from the host, then (the last flags) `on_device`, values still on the
        device: they join the all-reduce without a sync."""
        slot, previous = self.calls % 2, (self.calls + 1) % 2
        result = [0.0] * self.size
        if self.calls > 0:
            if self.done[previous] is not None:
                self.done[previous].synchronize()  # the previous boundary's work, not this step's
            result = self.recv[previous].tolist()
        host = len(values)
        self.send[slot][:host].copy_(torch.tensor(values, dtype=torch.float32))
        self.reduced[slot][:host].copy_(self.send[slot][:host], non_blocking=True)
        if on_device is not None:
            self.reduced[slot][host:].copy_(on_device.reshape(-1))
        else:
            self.reduced[slot][host:].zero_()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.reduced[slot], op=dist.ReduceOp.MAX)
        self.recv[slot].copy_(self.reduced[slot], non_blocking=True)
        if self.cuda:
            self.done[slot] = torch.cuda.Event()
            self.done[slot].record()
        self.calls += 1
        return result


class Stopper:
    """Asked at every step boundary, gives the same answer on every rank: stop now, and why."""

    def __init__(
        self,
        device: torch.device,
        deadline: Deadline,
        checkpoint_bytes: int,
        stop_file: str | None = None,
    ) -> None:
        """`stop_file` (rank 0's): its appearance asks for a stop; `checkpoint_bytes` guesses
        how long a save takes until one has been timed."""
        self.deadline, self.clock = deadline, deadline.clock
        self.flags = LaggedMax(6, device)
        self.diverged = 0.0
        """Every rank's maximum of the `diverged` flag (0: no rank saw a non-finite value)."""
        self.busy = False
        """Whether any rank was still writing a checkpoint (`busy` of the previous poll)."""
        self.launchers = launcher_chain()
        self.launcher_checked, self.launcher_lost = -float("inf"), 0
        self.stop_file = Path(stop_file) if stop_file else None
        self.stop_note = ""
        self.slowest_step = 0.0
        self.slowest_save = 5.0 + checkpoint_bytes / SAVE_BYTES_PER_S
        self.save_timed = False
        self.last_boundary = self.clock()

    def saved(self, seconds: float) -> None:
        """A checkpoint save took this long (the first real timing replaces the guess)."""
        self.slowest_save = seconds if not self.save_timed else max(self.slowest_save, seconds)
        self.save_timed = True

    @property
    def polls(self) -> int:
        """Polls so far: a poll's answer reflects what every rank sent at the one before."""
        return self.flags.calls

    def poll(self, diverged: torch.Tensor | None = None, busy: bool = False) -> str | None:
        """Called by every rank at every step boundary; the reason to stop, or None. The answer
        is what all ranks knew at the previous boundary (see LaggedMax). `diverged`: a flag on
        the device (DivergenceWatch's); when any rank raised it, its maximum lands in
        `self.diverged` and the reason is "training diverged". `busy`: this rank is still
        writing a checkpoint (every rank's answer lands in `self.busy`)."""
        now = self.clock()
        self.slowest_step = max(self.slowest_step, now - self.last_boundary)
        self.last_boundary = now
        local = [received_signal(), self._deadline_near(now), self._file(), self._orphaned(now)]
        flags = self.flags([float(v) for v in [*local, busy]], diverged)
        place, deadline, requested, lost = (int(v) for v in flags[:4])
        self.busy, self.diverged = bool(flags[4]), flags[5]
        if self.diverged:
            return "training diverged"
        if place:
            return f"received {STOP_SIGNALS[place - 1].name}"
        if lost:
            return f"the launcher that started the ranks (pid {lost}) is gone"
        if deadline:
            return TIME_LIMIT
        if requested:
            return f"stop requested ({self.stop_note or 'ZEROLAUNCH_STOP_FILE exists'})"
        return None

    def room_to_start(self) -> bool:
        """Before the first step (every rank, one synchronous all-reduce): whether one step and
        a save still fit before the deadline. The lagged check would only see it a step late."""
        now = self.clock()
        near = torch.tensor([float(self._deadline_near(now))], device=self.flags.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(near, op=dist.ReduceOp.MAX)
        return not near.item()

    def too_short(self, started_at: float) -> str:
        """Why the time limit left no room for one step and a save: said (exit 2) instead of
        a stop with exit 75, which a requeue would repeat forever. `started_at`: the process
        start on time.perf_counter's clock."""
        now = self.clock()
        deadline = self.deadline.at(now) or now
        which = "train.time_limit" if deadline == self.deadline.own else "the Slurm job's end"
        startup = time.perf_counter() - started_at
        need, left = 1.5 * (2 * self.slowest_step + self.slowest_save), deadline - now
        return (
            f"{which} leaves no room to train: start-up took {startup:.0f} s, after which "
            f"{f'{left:.0f} s were left' if left > 0 else 'the limit had passed'}: less than one "
            f"step and a save need with margin ({need:.0f} s). Allow "
            f"at least {startup + need:.0f} s plus the training you want (train.time_limit, or the "
            "job's --time); no step was trained and nothing was saved"
        )

    def _deadline_near(self, now: float) -> bool:
        deadline = self.deadline.at(now)
        if deadline is None:
            return False
        # The decision lands a step late: two more steps, then a save, with room for all of it
        # to run slower than the slowest yet.
        return now + 1.5 * (2 * self.slowest_step + self.slowest_save) >= deadline

    def _orphaned(self, now: float) -> int:
        """The pid of a launcher above this rank that has gone away (0: none), checked about
        once a second."""
        due = now - self.launcher_checked >= LAUNCHER_CHECK_S
        if self.launchers and not self.launcher_lost and due:
            self.launcher_checked = now
            self.launcher_lost = launcher_gone(self.launchers) or 0
        return self.launcher_lost

    def _file(self) -> bool:
        if self.stop_file is None or not self.stop_file.exists():
            return False
        # What the requester wrote there, e.g. slurm/launch.sh: "SIGUSR1 to the batch shell".
        with contextlib.suppress(OSError):
            self.stop_note = self.stop_file.read_text().strip()[:200]
        return True
