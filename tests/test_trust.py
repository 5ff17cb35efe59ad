"""Training state you can trust: divergence never saved, `best` never a NaN, honest stops."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import torch
from conftest import (
    DEEPSPEED,
    PYTHON,
    REPO,
    TINY,
    corpus_documents,
    free_port,
    overrides,
    read_metrics,
    run,
    start_deepspeed_run,
)

from launcher.checkpoints import store
from launcher.checkpoints.contract import CheckpointMeta
from launcher.checkpoints.integrity import share
from launcher.errors import EXIT_DIVERGED, EXIT_USER_ERROR
from launcher.runtime.distributed import SHM_DIR
from launcher.runtime.run_lock import LOCK_FILE, Holder, stale_reason
from launcher.training.divergence import Diverged, DivergenceWatch, decode


def fake_tag(ckpt_dir: Path, step: int, val: float, train: float = 1.0, keep: int = 1) -> None:
    tag = store.tag_for(step)
    (ckpt_dir / tag).mkdir(parents=True)
    (ckpt_dir / tag / "shard.pt").write_bytes(b"x" * step)
    meta = CheckpointMeta(
        step, 8 * step, "run", {}, 2, 2, "fp32", train_loss=train, val_loss=val, val_step=step
    )
    store.complete(ckpt_dir, tag, meta, keep_last=keep)


def test_best_is_never_a_nan_and_the_last_good_tag_survives_rotation(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "checkpoints"
    fake_tag(ckpt_dir, 4, 4.645)
    fake_tag(ckpt_dir, 10, math.nan, train=math.nan)  # what an older zerolaunch saved
    fake_tag(ckpt_dir, 12, math.inf, train=math.inf)
    assert store.read_pointer(ckpt_dir, store.BEST) == "global_step4"
    # keep_last=1: the newest tag stays, and so does the last good one (also `best` here).
    assert [t for _, t in store.all_tags(ckpt_dir)] == ["global_step4", "global_step12"]
    # resume: auto passes over a diverged tag, with a warning that says why.
    tag_dir, warnings = store.resolve_resume("auto", tmp_path)
    assert tag_dir == ckpt_dir / "global_step4"
    assert len(warnings) == 1 and "global_step12: its losses are not finite" in warnings[0]


def test_the_watch_names_the_first_bad_step_without_waiting() -> None:
    watch = DivergenceWatch(torch.device("cpu"), watch_grad_norm=True)
    watch.observe(1, torch.tensor(4.0), 1.5)
    assert decode(watch.encoded.item()) == 0
    watch.observe(2, torch.tensor(3.0), math.inf)  # the gradient norm blew up first
    watch.observe(3, torch.tensor(math.nan), torch.tensor(math.nan))
    assert decode(watch.encoded.item()) == 2
    fp16 = DivergenceWatch(torch.device("cpu"), watch_grad_norm=False)
    fp16.observe(1, torch.tensor(4.0), math.inf)  # loss scaling: an overflow step is skipped
    assert decode(fp16.encoded.item()) == 0


def test_a_save_refuses_a_non_finite_parameter() -> None:
    watch = DivergenceWatch(torch.device("cpu"), watch_grad_norm=True)
    model = torch.nn.Linear(3, 3)
    watch.check_now(model, 5)  # finite: nothing to say
    with torch.no_grad():
        model.weight[1, 2] = math.inf
    with pytest.raises(Diverged, match="a parameter is not finite at step 5"):
        watch.check_now(model, 5)


# One bf16 ZeRO-1 engine on the CPU whose first block's attention weight gets a NaN gradient at
# step 2: prints DeepSpeed's gradient norm per step and the step the divergence watch names.
NAN_GRADIENT = """
import json, math, sys, torch
from launcher.bench import SyntheticBatches
from launcher.config.load import load_spec
from launcher.runtime.distributed import init_process_group
from launcher.training.divergence import DivergenceWatch, decode
from launcher.training.engine import build_engine
from launcher.training.plan import engine_settings
from launcher.training.step import train_step
from model.gpt import GPT
spec = load_spec(None, sys.argv[2:])
settings, _ = engine_settings(spec, None, sys.argv[1], 1, "cpu")
init_process_group()
model = GPT(spec.model)
step = 0
model.transformer.h[0].attn.c_attn.weight.register_hook(
    lambda g: g * math.nan if step == 2 else g)
engine = build_engine(model, spec.train, settings)
watch = DivergenceWatch(torch.device("cpu"), watch_grad_norm=True)
m = spec.model
batches = SyntheticBatches.make(m.vocab_size, 2, m.block_size, 1, torch.device("cpu"), 0)
norms = []
for step in range(1, 4):
    loss = train_step(engine, batches, step, 1)
    norms.append(float(engine.get_global_grad_norm()))
    watch.observe(step, loss.mean, engine.get_global_grad_norm())
print(json.dumps({"norms": norms, "named": decode(watch.encoded.item()),
                  "check": settings.ds_config["bf16"]["check_grad_overflow"]}))
"""


def test_a_nan_gradient_under_bf16_is_named_without_deepspeeds_overflow_check(tmp_path) -> None:
    """bf16 runs without DeepSpeed's per-tensor overflow check (config/ds_config.py): its global
    gradient norm still comes back infinite, and the watch stops the run at that step (the NaN
    reaches the weights, as it does in fp32: no tag of them is written, training/divergence.py)."""
    ds = tmp_path / "bf16.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}))
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "PYTHONPATH": str(REPO)}  # fmt: skip
    args = [*TINY, "model.vocab_size=96", "train.grad_clip=1.0"]
    out = run([PYTHON, "-c", NAN_GRADIENT, str(ds), *args], **env)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["check"] is False
    first, bad, after = figures["norms"]
    assert math.isfinite(first) and math.isinf(bad), figures
    assert figures["named"] == 2


STABLE = [*TINY, "train.log_interval=1", "eval.interval=2", "checkpoint.interval=2",
          "checkpoint.keep_last=1", "sample.max_new_tokens=0"]  # fmt: skip


@pytest.mark.integration
def test_divergence_stops_two_ranks_before_saving_and_keeps_best(tiny_data, tmp_path) -> None:
    """The issue's reproduction: a good run (best at step 4), resumed into one that diverges
    (lr 1e3, no clipping). Before: NaN tags saved, `best` moved to a NaN tag, the real best
    rotated away, exit 0."""
    out = tmp_path / "run"
    base = [*STABLE, f"data.train={tiny_data}", f"out_dir={out}"]
    cmd = [DEEPSPEED, "--num_gpus", "2", "launcher/run.py", "--ds_config", "ds_configs/zero2.json"]
    run([*cmd, *overrides(*base, "train.max_steps=4")])
    ckpt_dir = store.checkpoint_dir(out)
    assert store.read_pointer(ckpt_dir, store.BEST) == "global_step4"
    wild = ["train.lr=1e3", "train.grad_clip=0", "train.warmup_steps=0", "train.max_steps=40"]
    result = run([*cmd, *overrides(*base, *wild)], check=False)
    assert result.returncode == EXIT_DIVERGED, result.stdout + result.stderr
    assert "error: training diverged:" in result.stderr
    assert "No checkpoint of this state was saved" in result.stderr
    assert "resume from global_step" in result.stderr
    for _, tag in store.list_tags(ckpt_dir):  # every tag on disk is finite
        assert not store.diverged(store.read_meta(ckpt_dir / tag)), tag
    best = store.read_pointer(ckpt_dir, store.BEST)
    assert store.verify(ckpt_dir / best) is None
    assert math.isfinite(store.read_meta(ckpt_dir / best).own_val_loss)
    assert (ckpt_dir / "global_step4").is_dir()


@pytest.mark.integration
def test_a_time_limit_too_short_for_one_step_is_an_error_not_a_requeue(tiny_data, tmp_path):
    out = tmp_path / "run"
    items = [*STABLE, f"data.train={tiny_data}", f"out_dir={out}", "train.max_steps=50"]
    cmd = [PYTHON, "launcher/run.py", "--ds_config", "ds_configs/zero1.json"]
    result = run([*cmd, *overrides(*items, "train.time_limit=1")], check=False)
    assert result.returncode == EXIT_USER_ERROR, result.stdout + result.stderr
    assert "error: train.time_limit leaves no room to train" in result.stderr
    assert "no step was trained and nothing was saved" in result.stderr
    assert "checkpoint" not in result.stdout.split("resume:")[-1].replace("checkpoints in", "")
    assert not store.list_tags(store.checkpoint_dir(out))
    metrics = out / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip()
    json.loads((out / "ranks.json").read_text())  # the run did start: the error is not pre-flight


def holder(**kw) -> Holder:
    fields = {"host": "n1", "pid": 4242, "process_start": 1.0, "since": 2.0, "job": None}
    return Holder(**(fields | kw))


def test_a_lock_is_stale_only_when_its_holder_is_gone() -> None:
    me = Holder.me()
    alive_here = holder(host=me.host, pid=me.pid, process_start=me.process_start)
    assert stale_reason(alive_here, 0.0, replace(me, pid=1)) is None
    assert "no longer runs" in stale_reason(holder(host=me.host, pid=2**22 + 7), 0.0, me)
    reused = holder(host=me.host, pid=me.pid, process_start=me.process_start - 100)
    assert "no longer runs" in stale_reason(reused, 0.0, me)  # the pid was reused
    assert stale_reason(holder(host="elsewhere"), 60.0, me) is None  # its heartbeat is fresh
    assert "heartbeat stopped" in stale_reason(holder(host="elsewhere"), 1000.0, me)
    requeued = replace(me, job="77", restart=1)
    assert "before its requeue" in stale_reason(holder(host="elsewhere", job="77"), 1.0, requeued)
    step_beside = replace(me, job="77")  # another srun of the same allocation: not a requeue
    assert stale_reason(holder(host="elsewhere", job="77"), 1.0, step_beside) is None
    assert stale_reason(None, 1.0, me) is None  # being written right now
    assert stale_reason(None, 1000.0, me) is not None


def two_ranks(*items: str) -> list[str]:
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "launcher/run.py"]
    return [*cmd, "--ds_config", "ds_configs/zero2.json", *overrides(*items)]


@pytest.mark.integration
def test_one_run_per_directory_and_a_killed_runs_lock_is_taken_over(tiny_data, tmp_path):
    """The issue's reproduction: the same command started twice. Before: both trained, the
    metrics interleaved, spec.yaml/ds_config.json/ranks.json overwritten."""
    out = tmp_path / "run"
    shm_before = set(SHM_DIR.glob("deepspeed_allreduce_buffer_*"))
    first = start_deepspeed_run(tiny_data, out, "checkpoint.interval=2")
    run_files = {p: p.read_bytes() for p in out.iterdir() if p.is_file() and p.suffix != ".jsonl"}
    records = len(read_metrics(out))
    items = [*STABLE, f"data.train={tiny_data}", f"out_dir={out}"]
    second = run(two_ranks(*items, "train.max_steps=100000"), check=False)
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"error: {out} is in use by another run (pid " in second.stderr
    assert "kill -USR1" in second.stderr and "Traceback" not in second.stderr
    assert {p: p.read_bytes() for p in run_files} == run_files  # nothing of the first touched
    assert len(read_metrics(out)) >= records  # the first run's metrics were not trimmed
    listing = run([PYTHON, "-m", "launcher.ckpt", "list", str(out)])  # readers need no lock
    assert "complete" in listing.stdout
    os.killpg(first.pid, signal.SIGKILL)  # a crash: the lock stays behind, its holder gone
    first.communicate(timeout=60)
    assert (out / LOCK_FILE).exists()
    latest = store.read_pointer(store.checkpoint_dir(out), store.LATEST)
    step = int(latest.removeprefix("global_step"))
    resumed = run(two_ranks(*items, f"train.max_steps={step + 2}"))
    assert "warning: took over the lock of" in resumed.stderr and "no longer runs" in resumed.stderr
    assert f"at step {step}" in resumed.stdout
    assert not (out / LOCK_FILE).exists()  # given back at the end
    # DeepSpeed's CPU all-reduce segments (66 MB a rank) are gone, even those of the killed run.
    assert set(SHM_DIR.glob("deepspeed_allreduce_buffer_*")) <= shm_before


@pytest.mark.integration
def test_the_tokenizer_is_bound_to_its_checkpoints(tiny_data, tmp_path) -> None:
    """The issue's reproduction: a run resumed on a dataset of another tokenizer whose padded
    vocabulary has the same size. Before: it resumed silently and replaced tokenizer.json."""
    text = tmp_path / "text"
    text.mkdir()
    for i, doc in enumerate(corpus_documents()):  # the last four characters gone: ids unchanged
        (text / f"doc{i}.txt").write_text(doc.translate({ord(c): None for c in "{|}~"}))
    other = tmp_path / "data" / "other"
    run([PYTHON, "-m", "data_pipeline.prepare", "--input", str(text), "--tokenizer", "char",
         "--val-fraction", "0.2", "--out", str(other)])  # fmt: skip
    out = tmp_path / "run"
    cmd = [PYTHON, "launcher/run.py", "--ds_config", "ds_configs/zero1.json"]
    items = [*STABLE, f"out_dir={out}", "eval.interval=0", "checkpoint.interval=0"]
    run([*cmd, *overrides(*items, f"data.train={tiny_data}", "train.max_steps=30")])
    tokenizer_json = (out / "tokenizer.json").read_bytes()
    refused = run([*cmd, *overrides(*items, f"data.train={other}", "train.max_steps=40")],
                  check=False)  # fmt: skip
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "was trained with the tokenizer char" in refused.stderr
    assert "checkpoint.init_from=" in refused.stderr
    assert (out / "tokenizer.json").read_bytes() == tokenizer_json
    meta = store.read_meta(store.checkpoint_dir(out) / "global_step30")
    assert meta.tokenizer["type"] == "char" and meta.tokenizer["vocab_size"] == 97
    # Said explicitly, a new run starts from those weights: its first loss is the trained one.
    fresh = tmp_path / "fresh"
    tag = store.checkpoint_dir(out) / "global_step30"
    items = [*STABLE, f"out_dir={fresh}", f"data.train={other}", "train.max_steps=1"]
    started = run(
        [*cmd, *overrides(*items, f"checkpoint.init_from={tag}", "train.lr=1e-9", "train.min_lr=0")]
    )
    assert f"fresh start from the weights of {tag}" in started.stdout
    assert "its embeddings start from rows that meant other tokens" in started.stderr
    first = [m["Loss/train"] for m in read_metrics(fresh) if "Loss/train" in m][0]
    trained = [m["Loss/train"] for m in read_metrics(out) if "Loss/train" in m][-1]
    assert first < trained + 0.3 < 4.0, (first, trained)


def test_files_are_dealt_out_evenly_and_identically_on_every_rank() -> None:
    files = {"a": 100, "b": 60, "c": 50, "d": 10}
    deals = [share(files, rank, 2) for rank in range(2)]
    assert deals == [["a", "d"], ["b", "c"]]  # 110 bytes each
    assert sorted(deals[0] + deals[1]) == sorted(files)
    assert share(files, 0, 1) == ["a", "b", "c", "d"]


@pytest.mark.integration
def test_a_flipped_byte_in_a_shard_is_caught_and_the_previous_tag_used(tiny_data, tmp_path):
    """The issue's reproduction: one byte flipped in the middle of an optimizer shard, same
    size. Before: listed complete, resumed, NaN two steps later."""
    out = tmp_path / "run"
    items = [*STABLE, f"data.train={tiny_data}", f"out_dir={out}", "checkpoint.keep_last=3"]
    run(two_ranks(*items, "train.max_steps=4"))
    tag = store.checkpoint_dir(out) / "global_step4"
    shard = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(raw)
    assert store.verify(tag) is None  # the sizes alone cannot tell
    checked = run([PYTHON, "-m", "launcher.ckpt", "verify", str(out)], check=False)
    assert checked.returncode == 2
    assert "global_step2           ok" in checked.stdout
    assert f"global_step4           DAMAGED: {shard.name} has changed" in checked.stdout
    explicit = run(two_ranks(*items, f"checkpoint.resume={tag}", "train.max_steps=6"), check=False)
    assert explicit.returncode == 2 and "the checkpoint is damaged" in explicit.stderr
    assert "Traceback" not in explicit.stderr
    resumed = run(two_ranks(*items, "train.max_steps=6"))
    assert f"skipping checkpoint {tag}: {shard.name} has changed" in resumed.stderr
    assert "at step 2" in resumed.stdout


@pytest.mark.integration
def test_an_async_save_killed_mid_write_leaves_the_previous_tag(tiny_data, tmp_path) -> None:
    out = tmp_path / "run"
    items = [*TINY, f"data.train={tiny_data}", f"out_dir={out}", "train.log_interval=1",
             "train.max_steps=20", "checkpoint.interval=5", "checkpoint.keep_last=1",
             "eval.interval=5", "sample.max_new_tokens=0",
             "checkpoint.async_save=true"]  # fmt: skip
    env = {
        **os.environ,
        "ZEROLAUNCH_TEST_WRITE_PAUSE": "global_step10:120",
        "WANDB_MODE": "offline",
    }
    launcher = subprocess.Popen(two_ranks(*items), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
    tag10 = store.checkpoint_dir(out) / "global_step10"
    deadline = time.monotonic() + 240
    while ([{"step": -1}] + read_metrics(out))[-1]["step"] < 13:
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.stdout.read()
        time.sleep(0.2)
    assert not (tag10 / store.META_FILE).exists()  # training went on while step 10 was written
    # Both ranks, as a lost node does (a lone survivor would wait out the runner's 30 s between
    # its SIGTERM and SIGKILL).
    ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True)
             if "--local_rank=" in " ".join(p.cmdline())]  # fmt: skip
    assert len(ranks) == 2
    for rank in ranks:
        rank.send_signal(signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0
    assert not (tag10 / store.META_FILE).exists()
    assert store.read_pointer(store.checkpoint_dir(out), store.LATEST) == "global_step5"
    again = run(two_ranks(*items))
    assert "global_step10: no completion marker" in again.stderr
    assert "at step 5" in again.stdout
    assert [t for _, t in store.list_tags(store.checkpoint_dir(out))][-1] == "global_step20"
    run([PYTHON, "-m", "launcher.ckpt", "verify", str(out)])
