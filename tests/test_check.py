"""`python -m launcher check`: every pre-launch check and a memory estimate, nothing launched."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import PYTHON, overrides, run

from launcher.check import parse_memory
from launcher.config.ds_config import resolve_engine
from launcher.config.spec import TrainConfig
from launcher.training.memory import (
    GIB,
    deepspeed_estimate,
    estimate,
    startup_memory_warning,
)
from model.gpt import GPTConfig, count_params

GPT_13B = [
    "model.n_layer=40",
    "model.n_head=40",
    "model.n_embd=5120",
    "model.block_size=2048",
    "model.vocab_size=50304",
    "train.micro_batch_size=4",
]


def check(*args: str, check_rc: bool = True):
    return run([PYTHON, "-m", "launcher", "check", *args], check=check_rc)


def test_a_13b_model_is_checked_in_seconds_on_the_meta_device(
    tiny_data: Path, tmp_path: Path
) -> None:
    started = time.perf_counter()
    result = check(
        "--ds_config",
        "ds_configs/zero3.json",
        "--world-size",
        "64",
        "--device",
        "cuda",
        "--device-memory",
        "80GB",
        *overrides(*GPT_13B, f"data.train={tiny_data}", f"out_dir={tmp_path / 'r'}"),
    )
    assert time.perf_counter() - started < 60
    out = result.stdout
    assert "parameters: 12,853,626,880" in out and "precision: bf16" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line[:1] in "0123"}
    assert "DOES NOT FIT" in rows["0"] and "fits" in rows["3"] and "<- configured" in rows["3"]
    assert not (tmp_path / "r").exists()  # nothing written, nothing launched
    # Each rank makes its own parameters, one module at a time: at most the 50304 x 5120
    # embedding in fp32 (the whole model first, as before, was 383 GiB for 8 ranks).
    need = 8 * 4 * 50304 * 5120
    assert (
        f"start-up host memory per node: {need / GIB:,.2f} GiB (8 rank(s) x one whole module "
        "in fp32 at most: each makes only its own parameters, on its device)"
    ) in out
    assert "warning: starting takes" not in out
    whole = 8 * 4 * 12_853_626_880  # a tensor- or pipeline-parallel init_from tag: put together
    assert startup_memory_warning(whole, whole, 8, True) is None  # it fits: nothing to say
    short = startup_memory_warning(whole, 100 * GIB, 8, True)
    assert "up to 383 GiB of host memory on this node (8 rank(s), each putting the init" in short
    small = startup_memory_warning(need, 4 * GIB, 8, False)
    assert "up to 8 GiB of host memory on this node (8 rank(s), each making its parameters" in small
    assert "100 GiB is available" in short and "Start fewer ranks per node" in short


def test_all_problems_are_listed_together(tmp_path: Path) -> None:
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 7}))
    result = check(
        "--ds_config",
        str(ds),
        "--world-size",
        "4",
        *overrides(f"data.train={tmp_path / 'none'}"),
        check_rc=False,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "2 problems" in result.stderr
    assert (
        'ds.json sets "train_batch_size": 7' in result.stderr and "4 data-parallel" in result.stderr
    )
    assert "no prepared dataset" in result.stderr


def test_device_memory_units() -> None:
    assert parse_memory("80GB") == 80e9
    assert parse_memory("141GiB") == 141 * GIB
    assert parse_memory("80") == 80 * GIB
    with pytest.raises(Exception, match="expected a size"):
        parse_memory("lots")


def engine(zero: dict, world_size: int = 8):
    settings, _ = resolve_engine(
        {"bf16": {"enabled": True}, "zero_optimization": zero},
        TrainConfig(micro_batch_size=1),
        world_size,
        paths=("spec.yaml", "ds.json"),
        device_type="cuda",
        bf16_supported=True,
    )
    return settings


def test_estimate_follows_the_zero_paper() -> None:
    config = GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)
    psi = count_params(config)
    e0, e3 = estimate(config, engine({"stage": 0})), estimate(config, engine({"stage": 3}))
    assert (e0.params, e0.grads, e0.optimizer, e0.step_grads) == (2 * psi, 2 * psi, 12 * psi, 0)
    assert (e3.params, e3.grads, e3.optimizer) == (2 * psi / 8, 2 * psi / 8, 12 * psi / 8)
    assert e3.step_grads == 4 * psi / 8  # the fp32 gradient partition of the step (bf16)
    offload = estimate(
        config,
        engine(
            {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}
        ),
    )
    assert offload.model_states == 0 and offload.cpu == (2 + 2 + 4 + 12) * psi / 8
    small_vocab = GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=128)
    acts = estimate(small_vocab, engine({"stage": 0}))  # logits aside, checkpointing keeps ~1/34
    assert acts.activations_checkpointed < acts.activations / 3


def test_model_states_agree_with_deepspeeds_own_estimate() -> None:
    config = GPTConfig(n_layer=40, n_head=40, n_embd=5120, block_size=2048, vocab_size=50304)
    psi = count_params(config)
    zero2 = engine({"stage": 2}, world_size=8)
    ours = estimate(config, zero2)
    name, device, _ = deepspeed_estimate(config, zero2, gpus_per_node=8)
    # 2 Psi bf16 parameters + 18 Psi / W: bf16 and fp32 gradients, fp32 master, Adam moments.
    assert name == "estimate_zero2_model_states_mem_needs"
    assert ours.model_states == device == 2 * psi + 18 * psi // 8
    zero3 = engine({"stage": 3}, world_size=8)
    _, device, _ = deepspeed_estimate(config, zero3, gpus_per_node=8)
    assert abs(estimate(config, zero3).model_states - device) < 0.05 * device
    assert deepspeed_estimate(config, engine({"stage": 1}), gpus_per_node=8) is None
