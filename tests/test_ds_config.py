"""DeepSpeed JSON: loading errors, merging with the spec, conflicts, precision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.config import TrainConfig
from launcher.ds_config import DSConfigError, load_ds_config, merge_ds_config, zero_stage

DS_CONFIGS = sorted((Path(__file__).parent.parent / "ds_configs").glob("*.json"))
TRAIN = TrainConfig(micro_batch_size=4, grad_accum_steps=3, grad_clip=0.5)


def merge(config: dict, dp_size: int = 2, device: str = "cpu", bf16: bool = False) -> dict:
    return merge_ds_config(
        config,
        TRAIN,
        dp_size,
        spec_path="spec.yaml",
        ds_path="ds.json",
        device_type=device,
        bf16_supported=bf16,
    )


@pytest.mark.parametrize("path", DS_CONFIGS, ids=[p.name for p in DS_CONFIGS])
def test_every_shipped_config_loads_and_merges(path: Path) -> None:
    merged = merge(load_ds_config(path))
    assert merged["train_batch_size"] == 4 * 3 * 2
    assert merged["bf16"]["enabled"] is False  # "auto" resolves to off on CPU
    assert zero_stage(merged) == int(path.stem.removeprefix("zero")[0])


def test_zero2_config_is_shipped() -> None:
    assert "zero2.json" in [p.name for p in DS_CONFIGS]


def test_launcher_fills_batch_fields() -> None:
    merged = merge({"zero_optimization": {"stage": 2}}, dp_size=8)
    assert merged["train_micro_batch_size_per_gpu"] == 4
    assert merged["gradient_accumulation_steps"] == 3
    assert merged["train_batch_size"] == 96
    assert merged["gradient_clipping"] == 0.5


def test_agreeing_and_auto_values_are_fine() -> None:
    merged = merge({"train_batch_size": 24, "gradient_accumulation_steps": "auto"})
    assert merged["gradient_accumulation_steps"] == 3


def test_conflict_names_both_files_and_values() -> None:
    with pytest.raises(DSConfigError) as e:
        merge({"train_batch_size": 64, "gradient_clipping": 1.0})
    message = str(e.value)
    assert 'ds.json sets "train_batch_size": 64, but spec.yaml gives 24' in message
    assert 'ds.json sets "gradient_clipping": 1.0, but spec.yaml gives 0.5' in message


def test_optimizer_section_belongs_to_the_spec() -> None:
    with pytest.raises(DSConfigError, match='has an "optimizer" section, but the run spec owns it'):
        merge({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})


def test_fp16_on_cpu_is_refused() -> None:
    with pytest.raises(DSConfigError, match="enables fp16, which DeepSpeed supports only on GPUs"):
        merge({"fp16": {"enabled": True}})
    assert merge({"fp16": {"enabled": True}}, device="cuda")["fp16"]["enabled"] is True


def test_bf16_auto_follows_the_device() -> None:
    assert merge({"bf16": {"enabled": "auto"}}, device="cuda", bf16=True)["bf16"]["enabled"]
    assert not merge({"bf16": {"enabled": "auto"}})["bf16"]["enabled"]
    assert merge({"bf16": {"enabled": True}})["bf16"]["enabled"] is True  # as written


def test_malformed_json_gives_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{\n  "zero_optimization": {"stage": 2,}\n}\n')
    with pytest.raises(DSConfigError, match=r"bad.json, line 2, column 36"):
        load_ds_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DSConfigError, match="does not exist"):
        load_ds_config(tmp_path / "nope.json")


def test_input_config_is_not_mutated() -> None:
    config = {"bf16": {"enabled": "auto"}}
    merge(config)
    assert config == {"bf16": {"enabled": "auto"}}
    assert json.dumps(config)


def test_zero_section_is_validated() -> None:
    with pytest.raises(DSConfigError, match='"zero_optimization.stage" is 4; use 0, 1, 2 or 3'):
        merge({"zero_optimization": {"stage": 4}})
    with pytest.raises(DSConfigError, match='"offload_param" needs ZeRO stage 3'):
        merge({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}})
    with pytest.raises(DSConfigError, match="offload_optimizer.device\" is 'gpu'"):
        merge({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}})
