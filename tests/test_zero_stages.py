"""Every shipped ZeRO stage and offload gives the ZeRO-0 loss curve; checkpointing is free."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import DEEPSPEED, TINY, overrides, read_metrics, run

pytestmark = pytest.mark.integration

STEPS = 10
SAME = [
    *TINY,
    "model.dropout=0.0",
    "train.log_interval=1",
    "eval.interval=0",
    "checkpoint.interval=0",
    "sample.max_new_tokens=0",
    f"train.max_steps={STEPS}",
    "monitor.wandb.mode=disabled",
]
# fp32 sums reduced in another order (buckets, partitions, CPU Adam) differ in the last bits.
TOLERANCE = 2e-4


@pytest.fixture(scope="module")
def curves(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    root = tmp_path_factory.mktemp("stages")
    out = {}
    runs = {
        "zero0": [],
        "zero1": [],
        "zero2": [],
        "zero3": [],
        "zero2_offload": [],
        # ZeRO-3 with optimizer and parameters on the CPU, and DeepSpeed's partitioned
        # activation checkpointing of every block.
        "zero3_offload": ["model.activation_checkpointing=full"],
    }
    for name, extra in runs.items():
        cmd = [
            DEEPSPEED,
            "--num_gpus",
            "2",
            "launcher/run.py",
            "--ds_config",
            f"ds_configs/{name}.json",
        ]
        run([*cmd, *overrides(*SAME, *extra, f"data.train={tiny_data}", f"out_dir={root / name}")])
        out[name] = [m for m in read_metrics(root / name) if "Loss/train" in m]
    return out


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"])
def test_same_loss_curve_as_zero0(curves: dict, name: str) -> None:
    reference = [m["Loss/train"] for m in curves["zero0"]]
    losses = [m["Loss/train"] for m in curves[name]]
    assert len(losses) == STEPS and reference[-1] < reference[0] - 0.3
    assert max(abs(a - b) for a, b in zip(losses, reference)) < TOLERANCE, (losses, reference)


def test_mfu_counts_the_whole_model_under_zero3(curves: dict) -> None:
    # FLOPs per token come from the unpartitioned model, so MFU stays comparable across stages.
    median = lambda name: sorted(m["Loss/mfu"] for m in curves[name])[STEPS // 2]  # noqa: E731
    assert median("zero3") > 0.2 * median("zero0")
    assert "Loss/hfu" in curves["zero3_offload"][-1] and "Loss/hfu" not in curves["zero0"][-1]
    assert curves["zero3_offload"][-1]["Loss/hfu"] > curves["zero3_offload"][-1]["Loss/mfu"]
