"""One launcher/run.py under any launcher, and stopping early cleanly (signals, time limits)."""

from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest
import torch
from conftest import (
    PYTHON,
    TINY,
    output_of,
    overrides,
    read_metrics,
    run,
    start_deepspeed_run,
)

from launcher.config.spec import parse_duration
from launcher.errors import EXIT_REQUEUE
from launcher.runtime import slurm, stopping
from launcher.runtime.distributed import DistEnv, LaunchEnvError, detect_env


def test_torchrun_and_deepspeed_variables_win() -> None:
    environ = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "2"}
    environ |= {"MASTER_ADDR": "node0", "MASTER_PORT": "29500", "SLURM_PROCID": "0"}
    assert detect_env(environ) == DistEnv(3, 1, 8, 2, "torchrun/deepspeed")
    assert environ["LOCAL_SIZE"] == "2"  # what DeepSpeed's CPU shared-memory all-reduce reads


SRUN_TASK = {
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_STEP_NUM_TASKS": "7",
    "SLURM_STEP_TASKS_PER_NODE": "2(x3),1",
    "SLURM_NODEID": "2",
    "SLURM_JOB_ID": "1234",
    "SLURM_STEP_ID": "0",
    "MASTER_ADDR": "10.0.0.1",
}


def test_srun_tasks_are_ranks_and_the_batch_shell_is_not() -> None:
    task = dict(SRUN_TASK)
    env = detect_env(task)
    assert env == DistEnv(5, 1, 7, 2, "slurm")
    assert (task["RANK"], task["WORLD_SIZE"], task["LOCAL_RANK"]) == ("5", "7", "1")
    assert task["MASTER_ADDR"] == "10.0.0.1"
    # Every rank derives the same port from the job; an exported one is kept.
    rank0 = dict(SRUN_TASK, SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0")
    assert detect_env_port(rank0) == task["MASTER_PORT"]
    assert detect_env_port(dict(SRUN_TASK, MASTER_PORT="31337")) == "31337"
    last_node = dict(SRUN_TASK, SLURM_PROCID="6", SLURM_LOCALID="0", SLURM_NODEID="3")
    assert detect_env(last_node).local_world_size == 1
    # A batch script has SLURM_PROCID=0 and SLURM_NTASKS but no step: one process, not rank 0
    # of a job that would wait forever for the others.
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1234"}
    assert detect_env(batch) == DistEnv(0, 0, 1, 1, "python")


def detect_env_port(environ: dict) -> str:
    detect_env(environ)
    return environ["MASTER_PORT"]


def test_openmpi_and_pmi_variables() -> None:
    ompi = {
        "OMPI_COMM_WORLD_RANK": "2",
        "OMPI_COMM_WORLD_LOCAL_RANK": "0",
        "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
        "MASTER_ADDR": "node0",
        "MASTER_PORT": "29500",
        # mpirun inside an allocation: these describe its daemons, not the ranks
        "SLURM_PROCID": "1",
        "SLURM_STEP_NUM_TASKS": "2",
    }
    assert detect_env(ompi) == DistEnv(2, 0, 4, 2, "openmpi")
    hydra = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
    assert detect_env(hydra) == DistEnv(1, 1, 2, 2, "pmi")
    assert hydra["MASTER_ADDR"] == "127.0.0.1"  # all ranks on this machine


def test_launch_variables_that_cannot_work_are_user_errors() -> None:
    across_nodes = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4"}
    across_nodes["OMPI_COMM_WORLD_LOCAL_SIZE"] = "2"
    with pytest.raises(LaunchEnvError, match="MASTER_ADDR and MASTER_PORT is not set"):
        detect_env(across_nodes)
    with pytest.raises(LaunchEnvError, match="rank 4 .* of 4"):
        detect_env({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "a", "MASTER_PORT": "1"})
    with pytest.raises(LaunchEnvError, match="PMI_SIZE='two' is not an integer"):
        detect_env({"PMI_RANK": "0", "PMI_SIZE": "two"})


def test_scontrol_output_parsing() -> None:
    node = "NodeName=gpu003 Arch=x86_64 CoresPerSocket=32 NodeAddr=10.1.2.3 NodeHostName=gpu003"
    assert slurm.node_address(node, "gpu003") == "10.1.2.3"
    assert slurm.node_address("NodeName=x", "x") == "x"
    job = "JobId=7 JobState=RUNNING TimeLimit=01:00:00 StartTime=2026-01-01T10:00:00 "
    end = slurm.parse_end_time(job + "EndTime=2026-01-01T11:00:00 Deadline=N/A")
    start = slurm.parse_end_time(job.replace("StartTime", "EndTime"))
    assert end is not None and start is not None and end - start == 3600
    assert slurm.parse_end_time("TimeLimit=UNLIMITED EndTime=2027-01-01T00:00:00") is None
    assert slurm.parse_end_time("JobState=PENDING EndTime=Unknown") is None


def test_durations() -> None:
    assert [parse_duration(v) for v in (90, "90s", "45m", "2h", "1:30", "02:00:00")] == [
        90,
        90,
        2700,
        7200,
        90,
        7200,
    ]
    assert parse_duration("1-12:00:00") == 36 * 3600
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("tomorrow")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_time_limit_stops_while_one_more_step_and_a_save_still_fit() -> None:
    clock = Clock()
    deadline = stopping.Deadline.after(100.0, started_wall=1000.0, clock=clock)
    stopper = stopping.Stopper(torch.device("cpu"), deadline, checkpoint_bytes=0)
    stopper.saved(4.0)  # a timed save replaces the guess
    decisions = []
    while clock.now < 1100:
        clock.now += 5.0  # each step takes 5 s
        decisions.append((clock.now, stopper.poll()))
        if decisions[-1][1]:
            break
    at, reason = decisions[-1]
    assert reason == "the time limit is near"
    # 1.5 x (2 x 5 s steps + 4 s save) = 21 s of room needed: seen at 1080 (20 s left), acted on
    # at the next boundary, 1085, which leaves one step's worth beyond the 4 s save.
    assert at == 1085.0
    assert all(r is None for _, r in decisions[:-1])


def test_a_signal_asks_for_a_stop_instead_of_killing(monkeypatch) -> None:
    monkeypatch.setattr(stopping, "_received", [])
    previous = {s: signal.getsignal(s) for s in stopping.STOP_SIGNALS}
    try:
        stopping.install_signal_handlers()
        stopper = stopping.Stopper(torch.device("cpu"), stopping.Deadline(None), checkpoint_bytes=0)
        assert stopper.poll() is None
        signal.raise_signal(signal.SIGUSR1)
        assert stopper.poll() is None  # seen at this boundary, acted on at the next one
        assert stopper.poll() == "received SIGUSR1"
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_ctrl_c_asks_for_a_save_and_twice_stops_at_once(monkeypatch) -> None:
    monkeypatch.setattr(stopping, "_received", [])
    previous = {s: signal.getsignal(s) for s in stopping.STOP_SIGNALS}
    try:
        stopping.install_signal_handlers()
        stopper = stopping.Stopper(torch.device("cpu"), stopping.Deadline(None), 0)
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)  # deepspeed's launch.py passes the Ctrl-C on as TERM
        assert stopper.poll() is None and stopper.poll() == "received SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


LAGGED = """
import sys, torch, torch.distributed as dist
from launcher.runtime.stopping import LaggedMax
dist.init_process_group("gloo")
rank, flags = dist.get_rank(), LaggedMax(2, torch.device("cpu"))
# Rank 1 raises the first flag at call 2, rank 0 the second at call 3.
seen = [flags([float(rank == 1 and i >= 2), float(rank == 0 and i >= 3)]) for i in range(5)]
print(seen)
"""


def test_every_rank_sees_every_flag_one_boundary_later(tmp_path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2"}
    procs = [
        subprocess.Popen(
            [PYTHON, "-c", LAGGED],
            env={**os.environ, **env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    expected = "[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]"
    assert [o.strip() for o in outputs] == [expected, expected]


@pytest.mark.integration
def test_time_limit_saves_exits_75_and_the_same_command_finishes(tiny_data, tmp_path) -> None:
    out = tmp_path / "run"
    items = [*TINY, f"data.train={tiny_data}", f"out_dir={out}", "train.log_interval=1"]
    items += ["train.max_steps=100000", "checkpoint.interval=0", "sample.max_new_tokens=0"]
    cmd = [PYTHON, "launcher/run.py", "--ds_config", "ds_configs/zero1.json"]
    # The budget counts from the process start: imports and start-up take 5-20 s of it (more on
    # a loaded machine), and the first save is guessed at 5 s until one is timed.
    first = run([*cmd, *overrides(*items, "train.time_limit=40")], check=False)
    assert first.returncode == EXIT_REQUEUE, first.stdout + first.stderr
    stopped = re.search(r"stopping at step (\d+) of 100000: the time limit is near", first.stdout)
    assert stopped, first.stdout
    step = int(stopped.group(1))
    assert step > 10
    assert (out / "checkpoints" / "latest").read_text() == f"global_step{step}"
    second = run([*cmd, *overrides(*items, f"train.max_steps={step + 5}")])
    assert f"resumed from {out / 'checkpoints' / f'global_step{step}'}" in second.stdout
    steps = [m["step"] for m in read_metrics(out) if "Loss/train" in m]
    assert steps == list(range(1, step + 6))


def stopped_step(output: str, reason: str, out) -> int:
    found = re.search(
        rf"stopping at step (\d+) of 100000: {reason}; checkpoint global_step\1 saved", output
    )
    assert found, output
    step = int(found.group(1))
    assert (out / "checkpoints" / "latest").read_text() == f"global_step{step}"
    return step


@pytest.mark.integration
def test_ctrl_c_saves_and_the_same_command_resumes(tiny_data, tmp_path) -> None:
    out = tmp_path / "run"
    proc = start_deepspeed_run(tiny_data, out)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does: every process
    output = output_of(proc)  # once every rank has closed its output
    step = stopped_step(output, "received SIGINT", out)
    assert "interrupted: saving at the next step boundary" in output
    items = [*TINY, f"data.train={tiny_data}", f"out_dir={out}", "train.log_interval=1"]
    items += [f"train.max_steps={step + 2}", "sample.max_new_tokens=0"]
    resumed = run([PYTHON, "launcher/run.py", "--ds_config", "ds_configs/zero2.json",
                   *overrides(*items)])  # fmt: skip
    assert f"at step {step}" in resumed.stdout


@pytest.mark.integration
def test_ranks_whose_launcher_is_gone_save_and_stop(tiny_data, tmp_path) -> None:
    out = tmp_path / "run"
    proc = start_deepspeed_run(tiny_data, out)
    proc.send_signal(signal.SIGINT)  # the runner alone: it exits, its ranks would train on
    output = output_of(proc)  # once every rank has closed its output
    stopped_step(output, r"the launcher that started the ranks \(pid \d+\) is gone", out)
