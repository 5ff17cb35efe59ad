"""Checkpoints you can trust: exact resume, crash safety, another world size, export."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import DEEPSPEED, PYTHON, REPO, TINY, overrides, read_metrics, run

from launcher.checkpoints import store
from launcher.checkpoints.contract import CheckpointMeta

pytestmark = pytest.mark.integration

# Per-step losses (log_interval 1), dropout on (so RNG state matters), a schedule fixed by
# lr_decay_steps whatever max_steps a launch has.
EXACT = [
    *TINY,
    "model.dropout=0.1",
    "train.log_interval=1",
    "train.lr_decay_steps=8",
    "eval.interval=4",
    "checkpoint.interval=4",
    "sample.max_new_tokens=0",
]


def deepspeed(ranks: int, ds_config: str, *items: str, check: bool = True, **env: str):
    cmd = [DEEPSPEED, "--num_gpus", str(ranks), "launcher/run.py", "--ds_config", ds_config]
    return run([*cmd, *overrides(*items)], check=check, **env)


def copy_tag(run_dir: Path, tag: str, new_run: Path) -> Path:
    """A run directory holding only one tag of another run: a run stopped at that step."""
    (new_run / "checkpoints").mkdir(parents=True)
    shutil.copytree(run_dir / "checkpoints" / tag, new_run / "checkpoints" / tag)
    return new_run


def to_v1_layout(tag_dir: Path) -> None:
    """Rewrite a tag's zerolaunch.json in the layout zerolaunch 0.1 wrote (tests/assets holds
    one such file from a real run): no format version, `bf16` instead of `precision`."""
    template = json.loads((REPO / "tests" / "assets" / "zerolaunch_v1.json").read_text())
    meta = json.loads((tag_dir / store.META_FILE).read_text())
    meta["bf16"] = meta.pop("precision") == "bf16"
    old = {key: meta[key] for key in template}
    new = {"format_version", "tokenizer", "hashes", "parallel"}
    assert set(meta) - set(old) == new  # all that is new since 0.1
    (tag_dir / store.META_FILE).write_text(json.dumps(old, indent=1))


def losses(run_dir: Path, key: str = "Loss/train") -> dict[int, float]:
    return {m["step"]: m[key] for m in read_metrics(run_dir) if key in m}


# The Llama family on the tiny shape: rotary positions, RMSNorm, SwiGLU, 2 query heads sharing
# one key/value head, an untied head, no biases (and DeepSpeed's activation checkpointing).
LLAMA_STYLE = [
    "model.positions=rope",
    "model.norm=rmsnorm",
    "model.mlp=swiglu",
    "model.n_kv_head=1",
    "model.tie_embeddings=false",
    "model.bias=false",
    "model.activation_checkpointing=full",
]


ASYNC = "checkpoint.async_save=true"


@pytest.fixture(scope="module")
def zero2_async_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 uninterrupted ZeRO-2 steps saved asynchronously: the run both ZeRO-2 resumes of
    test_resume_is_bit_for_bit compare with (an async save changes no number)."""
    whole = tmp_path_factory.mktemp("zero2_async") / "whole"
    items = [*EXACT, ASYNC, f"data.train={tiny_data}", f"out_dir={whole}", "train.max_steps=8"]
    deepspeed(2, "ds_configs/zero2.json", *items)
    return whole


@pytest.mark.parametrize(
    ("stage", "layout"),
    [(1, "current"), (2, "0.1"), (2, "async"), (3, "current"), (2, "llama"), (3, "llama")],
    ids=["1", "2-old", "2-async", "3", "2-llama", "3-llama"],
)
def test_resume_is_bit_for_bit(
    tiny_data: Path, tmp_path: Path, stage: int, layout: str, request: pytest.FixtureRequest
) -> None:
    """With async, the tag at step 4 is written while steps 5-8 train: resuming from it gives
    the same losses only if the copy was taken at step 4, untouched by the steps after. The
    Llama-style ZeRO-3 run also resumes on one rank (DeepSpeed's universal format)."""
    config = f"ds_configs/zero{stage}.json"
    exact = [*EXACT, ASYNC] if layout == "async" else EXACT
    exact = [*exact, *LLAMA_STYLE] if layout == "llama" else exact
    if layout in ("0.1", "async"):  # one uninterrupted run for both
        whole = request.getfixturevalue("zero2_async_run")
    else:
        whole = tmp_path / "whole"
        items = [f"data.train={tiny_data}", f"out_dir={whole}", "train.max_steps=8"]
        deepspeed(2, config, *exact, *items)
    resumed = copy_tag(whole, "global_step4", tmp_path / "resumed")
    if layout == "0.1":  # a checkpoint written before the metadata had a version still resumes
        to_v1_layout(resumed / "checkpoints" / "global_step4")
    result = deepspeed(
        2, config, *exact, f"data.train={tiny_data}", f"out_dir={resumed}", "train.max_steps=8"
    )
    assert "resumed from" in result.stdout and "at step 4" in result.stdout
    uninterrupted, continued = losses(whole), losses(resumed)
    assert sorted(continued) == [5, 6, 7, 8]
    for step in continued:  # exactly equal: model, optimizer, data position and every RNG
        assert continued[step] == uninterrupted[step], (step, continued, uninterrupted)
    assert losses(resumed, "Loss/val")[8] == losses(whole, "Loss/val")[8]
    run_ids = {store.read_meta(d / "checkpoints" / "global_step8").run_id for d in (whole, resumed)}
    assert run_ids == {store.read_meta(whole / "checkpoints" / "global_step4").run_id}
    if (stage, layout) == (3, "llama"):  # 2 ranks -> 1, the same global batch of 16
        alone = copy_tag(whole, "global_step4", tmp_path / "alone")
        items = [*exact, "train.grad_accum_steps=2", f"data.train={tiny_data}"]
        result = deepspeed(1, config, *items, f"out_dir={alone}", "train.max_steps=5")
        assert "loading it in DeepSpeed's universal format" in result.stdout
        # Dropout's random streams differ with the rank layout: close, not equal.
        assert losses(alone)[5] == pytest.approx(uninterrupted[5], rel=0.05)


def _rank_process(launcher: subprocess.Popen, local_rank: int) -> psutil.Process:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        if f"--local_rank={local_rank}" in " ".join(child.cmdline()):
            return child
    raise AssertionError(f"no process for local rank {local_rank}")


def test_killed_save_falls_back_to_the_previous_complete_tag(
    tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    items = [
        *TINY,
        f"data.train={tiny_data}",
        f"out_dir={out}",
        "train.max_steps=20",
        "checkpoint.interval=5",
        "eval.interval=5",
        "checkpoint.keep_last=2",
        "sample.max_new_tokens=0",
    ]
    cmd = [
        DEEPSPEED,
        "--num_gpus",
        "2",
        "launcher/run.py",
        "--ds_config",
        "ds_configs/zero2.json",
        *overrides(*items),
    ]
    env = {**os.environ, "ZEROLAUNCH_TEST_SAVE_PAUSE": "10:120"}
    launcher = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    tag10 = out / "checkpoints" / "global_step10"
    deadline = time.monotonic() + 240
    while not (tag10 / "rng_state_rank1.pt").exists():  # shards written, tag not yet complete
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.stdout.read()
        time.sleep(0.2)
    # Both ranks, as a lost node does (a lone survivor, blocked in the save, would only wait out
    # the runner's 30 s between its SIGTERM and SIGKILL).
    for rank in [_rank_process(launcher, 1), _rank_process(launcher, 0)]:
        rank.send_signal(signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0
    assert not (tag10 / store.META_FILE).exists()
    assert store.read_pointer(out / "checkpoints", store.LATEST) == "global_step5"

    listing = run([PYTHON, "-m", "launcher.ckpt", "list", str(out)]).stdout
    assert "global_step5" in listing and "complete (latest, best)" in listing
    assert "INCOMPLETE: no completion marker" in listing

    again = deepspeed(2, "ds_configs/zero2.json", *items)
    assert (
        "skipping checkpoint" in again.stderr
        and "global_step10: no completion marker" in again.stderr
    )
    assert "resumed from" in again.stdout and "global_step5 at step 5" in again.stdout
    steps = [m["step"] for m in read_metrics(out) if "Loss/train" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 20  # no step logged twice
    assert [t for _, t in store.list_tags(out / "checkpoints")][-2:] == [
        "global_step15",
        "global_step20",
    ]

    # A truncated shard in the newest tag: auto falls back with a warning, a named path refuses.
    shard = out / "checkpoints" / "global_step20" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:-100])
    named = deepspeed(
        2, "ds_configs/zero2.json", *items, f"checkpoint.resume={shard.parent}", check=False
    )
    assert named.returncode == 2 and "the checkpoint is damaged" in named.stderr
    assert "(truncated)" in named.stderr
    auto = deepspeed(2, "ds_configs/zero2.json", *items)
    assert "skipping checkpoint" in auto.stderr and "global_step20: " in auto.stderr
    assert "global_step15 at step 15" in auto.stdout


@pytest.fixture(scope="module")
def base_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 ranks, ZeRO-2, global batch 8 (micro 4), dropout 0, checkpoints at steps 4 and 8."""
    out = tmp_path_factory.mktemp("base") / "run"
    deepspeed(
        2,
        "ds_configs/zero2.json",
        *EXACT,
        "model.dropout=0.0",
        "train.micro_batch_size=4",
        f"data.train={tiny_data}",
        f"out_dir={out}",
        "train.max_steps=8",
    )
    return out


@pytest.mark.parametrize(
    ("ranks", "micro", "accum", "config"),
    [
        (1, 4, 2, "ds_configs/zero2.json"),
        (4, 2, 1, "ds_configs/zero2.json"),
        (2, 4, 1, "ds_configs/zero1.json"),
    ],
    ids=["2to1", "2to4", "zero2to1"],
)
def test_resume_at_another_world_size_or_stage(
    base_run: Path, tiny_data: Path, tmp_path: Path, ranks, micro, accum, config
) -> None:
    resumed = copy_tag(base_run, "global_step4", tmp_path / "resumed")
    result = deepspeed(
        ranks,
        config,
        *EXACT,
        "model.dropout=0.0",
        f"train.micro_batch_size={micro}",
        f"train.grad_accum_steps={accum}",
        f"data.train={tiny_data}",
        f"out_dir={resumed}",
        "train.max_steps=8",
    )
    assert "loading it in DeepSpeed's universal format" in result.stdout
    assert "read again or skipped" not in result.stderr  # the same global batch: no warning
    assert (resumed / "checkpoints" / "global_step4_universal" / store.META_FILE).exists()
    # Same global batch (8 sequences), same samples: the losses the original run had at steps
    # 5-8 (the weights decide step 5; the optimizer's restored state the steps after it).
    again, before = losses(resumed), losses(base_run)
    assert sorted(again) == [5, 6, 7, 8]
    assert all(again[s] == pytest.approx(before[s], abs=1e-5) for s in again), (again, before)
    meta = store.read_meta(resumed / "checkpoints" / "global_step8")
    assert meta.world_size == ranks and meta.consumed_samples == 64


def test_export_loads_in_transformers_with_equal_logits(base_run: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")  # in the dev extra: present in CI
    out = tmp_path / "hf"
    result = run([PYTHON, "-m", "launcher.export", "--run", str(base_run), "--out", str(out)])
    assert "global_step8" in result.stdout
    assert {p.name for p in out.iterdir()} >= {
        "model.safetensors",
        "config.json",
        "zerolaunch_tokenizer.json",
    }
    from launcher.checkpoints.models import load_run_model

    ours, _ = load_run_model(base_run, None, torch.device("cpu"))
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    tokens = torch.randint(0, 97, (3, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(tokens).logits - ours.eval()(tokens)[0]).abs().max().item()
    assert diff < 1e-4
    # The char tokenizer as AutoTokenizer files: our ids, and transformers' greedy text is ours.
    from launcher.checkpoints.models import load_model_and_tokenizer

    _, tokenizer, _ = load_model_and_tokenizer(out, None, torch.device("cpu"))
    auto = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer.encode("What is an LLM?")
    assert auto("What is an LLM?")["input_ids"] == ids and auto.eos_token_id == tokenizer.eod_id
    prompt = torch.tensor([ids])
    greedy = hf.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    assert greedy.tolist() == ours.generate(prompt, 40, temperature=0).tolist()
    assert auto.decode(greedy[0]) == tokenizer.decode(greedy[0].tolist())
    sample = run(
        [
            PYTHON,
            "-m",
            "launcher.sample",
            "--run",
            str(out),
            "--prompt",
            "def ",
            "--max-new-tokens",
            "10",
            "--num-samples",
            "2",
        ]
    )
    assert sample.stdout.count("--- sample") == 2 and sample.stdout.count("def ") >= 2


def test_missing_tags_and_non_checkpoints_are_clear_errors(
    base_run: Path, tiny_data: Path, tmp_path: Path
) -> None:
    for cmd in (
        ["launcher.sample", "--run", str(base_run), "--tag", "global_step99"],
        [
            "launcher.export",
            "--run",
            str(base_run),
            "--tag",
            "global_step99",
            "--out",
            str(tmp_path / "x"),
        ],
    ):
        result = run([PYTHON, "-m", *cmd], check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "no complete checkpoint tag 'global_step99'" in result.stderr
        assert "global_step4, global_step8" in result.stderr
    for cmd in (
        ["launcher.sample", "--run", str(tmp_path)],
        ["launcher.ckpt", "list", str(tmp_path)],
    ):
        result = run([PYTHON, "-m", *cmd], check=False)
        assert result.returncode == 2 and "not a zerolaunch run directory" in result.stderr


def test_export_never_writes_into_a_run_or_over_a_users_files(
    base_run: Path, tmp_path: Path
) -> None:
    def export(out: Path, *extra: str):
        cmd = [PYTHON, "-m", "launcher.export", "--run", str(base_run), "--out", str(out)]
        return run([*cmd, *extra], check=False)

    def files(d: Path) -> dict:
        return {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}

    before = files(base_run)
    tag = base_run / "checkpoints" / "global_step8"
    for target in (tag, base_run / "checkpoints", base_run, tag / "sub"):
        result = export(target)
        assert result.returncode == 2 and "a zerolaunch run or checkpoint" in result.stderr
    assert files(base_run) == before  # the completion marker and everything else untouched
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("my own")
    refused = export(mine)
    assert refused.returncode == 2 and "already holds files (config.json)" in refused.stderr
    assert (mine / "config.json").read_text() == "my own"
    (tmp_path / "afile").write_text("x")
    assert "is a file" in export(tmp_path / "afile").stderr
    export(mine, "--force").check_returncode()
    assert {p.name for p in mine.iterdir()} == {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "zerolaunch_tokenizer.json",
        "zerolaunch_export.json",  # never the checkpoint marker's name
    }


def _fake_tag(ckpt_dir: Path, step: int, val: float) -> None:
    tag = store.tag_for(step)
    (ckpt_dir / tag).mkdir(parents=True)
    (ckpt_dir / tag / "shard.pt").write_bytes(b"x" * step)
    meta = CheckpointMeta(step, 8 * step, "run", {}, 2, 2, "fp32", val_loss=val, val_step=step)
    store.complete(ckpt_dir, tag, meta, keep_last=2)


def test_best_follows_val_loss_and_survives_rotation(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "checkpoints"
    for step, val in [(10, 3.0), (20, 1.0), (30, 2.0), (40, 4.0), (50, 5.0)]:
        _fake_tag(ckpt_dir, step, val)
    assert store.read_pointer(ckpt_dir, store.BEST) == "global_step20"
    assert store.read_pointer(ckpt_dir, store.LATEST) == "global_step50"
    assert [t for _, t in store.all_tags(ckpt_dir)] == [
        "global_step20",
        "global_step40",
        "global_step50",
    ]
    marker = json.loads((ckpt_dir / "global_step50" / store.META_FILE).read_text())
    assert marker["manifest"] == {"shard.pt": 50}


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 3 MiB filesystem (tmpfs): room for one checkpoint of the tiny model, not two."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI has it)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], check=True)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.parametrize("checked", [True, False], ids=["before-writing", "mid-save"])
def test_a_full_disk_stops_every_rank_with_one_message(
    tiny_data: Path, small_disk: Path, checked: bool
) -> None:
    out = small_disk / "run"
    env = {} if checked else {"ZEROLAUNCH_TEST_SKIP_SPACE_CHECK": "1"}  # let the write fail
    result = deepspeed(
        2,
        "ds_configs/zero2.json",
        *TINY,
        f"data.train={tiny_data}",
        f"out_dir={out}",
        "train.max_steps=20",
        "checkpoint.interval=5",
        "checkpoint.keep_last=5",
        "sample.max_new_tokens=0",
        "monitor.wandb.enabled=false",
        check=False,
        **env,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    if checked:  # found before writing anything: every rank stops, one message, no traceback
        assert "Traceback" not in output
        assert "error: not enough space to save checkpoint global_step10 in" in result.stderr
        assert "MiB free" in result.stderr and "checkpoint global_step5 is intact" in output
        assert "warning: the next checkpoint will not fit" in result.stderr  # said at step 5
    else:  # a write failed: that rank says why, the tag is incomplete or gone
        assert "could not write checkpoint global_step10" in result.stderr
        assert "global_step5 is intact" in result.stderr
    assert store.read_pointer(out / "checkpoints", store.LATEST) == "global_step5"
    assert store.verify(out / "checkpoints" / "global_step5") is None
    assert [t for _, t in store.list_tags(out / "checkpoints")] == ["global_step5"]
