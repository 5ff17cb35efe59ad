"""DeepSpeed JSON: loading errors, merging with the spec, DeepSpeed's own schema, precision,
and the one typed EngineSettings the rest of the launcher reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.config.ds_config import DSConfigError, EngineSettings, load_ds_config, resolve_engine
from launcher.config.spec import TrainConfig

DS_CONFIGS = sorted((Path(__file__).parent.parent / "ds_configs").glob("*.json"))
TRAIN = TrainConfig(micro_batch_size=4, grad_accum_steps=3, grad_clip=0.5)


def resolve(
    config: dict, dp_size: int = 2, device: str = "cpu", bf16: bool = False
) -> EngineSettings:
    settings, _ = resolve_engine(
        config,
        TRAIN,
        dp_size,
        paths=("spec.yaml", "ds.json"),
        device_type=device,
        bf16_supported=bf16,
    )
    return settings


def problems(config: dict, **kwargs) -> list[str]:
    with pytest.raises(DSConfigError) as e:
        resolve(config, **kwargs)
    return e.value.problems


@pytest.mark.parametrize("path", DS_CONFIGS, ids=[p.name for p in DS_CONFIGS])
def test_every_shipped_config_loads_and_resolves(path: Path) -> None:
    settings = resolve(load_ds_config(path))
    assert settings.train_batch_size == settings.ds_config["train_batch_size"] == 4 * 3 * 2
    assert settings.precision == "fp32"  # "auto" resolves to off on CPU
    assert settings.ds_config["bf16"]["enabled"] is False
    assert settings.zero_stage == int(path.stem.removeprefix("zero")[0])
    offload = "offload" in path.stem
    assert (settings.offload_optimizer == "cpu") == offload


def test_zero2_config_is_shipped() -> None:
    assert "zero2.json" in [p.name for p in DS_CONFIGS]


def test_engine_settings_are_typed_and_carry_deepspeeds_defaults() -> None:
    settings = resolve(
        {
            "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}},
            "bf16": {"enabled": "auto"},
            "activation_checkpointing": {"partition_activations": True},
        },
        device="cuda",
        bf16=True,
    )
    assert (settings.zero_stage, settings.precision, settings.half) == (3, "bf16", True)
    assert (settings.offload_param, settings.offload_optimizer) == ("cpu", "none")
    assert settings.activation_checkpointing.partition_activations is True
    assert settings.reduce_bucket_size == 500_000_000  # DeepSpeed's default, not ours
    assert settings.prefetch_bucket_size == 50_000_000
    other = settings.at_stage(1)
    assert (other.zero_stage, other.offload_param, other.precision) == (1, "none", "bf16")
    universal = settings.loading_universal()
    assert universal.ds_config["checkpoint"]["load_universal"] is True
    assert "checkpoint" not in settings.ds_config  # the original is not changed


def test_launcher_fills_batch_fields() -> None:
    merged = resolve({"zero_optimization": {"stage": 2}}, dp_size=8).ds_config
    assert merged["train_micro_batch_size_per_gpu"] == 4
    assert merged["gradient_accumulation_steps"] == 3
    assert merged["train_batch_size"] == 96
    assert merged["gradient_clipping"] == 0.5


def test_agreeing_and_auto_values_are_fine() -> None:
    merged = resolve({"train_batch_size": 24, "gradient_accumulation_steps": "auto"}).ds_config
    assert merged["gradient_accumulation_steps"] == 3


def test_conflict_names_both_files_and_values() -> None:
    found = problems({"train_batch_size": 64, "gradient_clipping": 1.0})
    assert found == [
        'ds.json sets "train_batch_size": 64, but train.micro_batch_size=4 in spec.yaml x '
        "train.grad_accum_steps=3 in spec.yaml x 2 data-parallel rank(s) gives 24; remove "
        '"train_batch_size" from ds.json (the launcher fills it) or make the two agree',
        'ds.json sets "gradient_clipping": 1.0, but train.grad_clip=0.5 in spec.yaml gives 0.5; '
        'remove "gradient_clipping" from ds.json (the launcher fills it) or make the two agree',
    ]


def test_a_conflict_names_the_set_override_a_value_came_from() -> None:
    with pytest.raises(DSConfigError) as e:
        resolve_engine(
            {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 64},
            TRAIN,
            2,
            paths=("spec.yaml", "ds.json"),
            device_type="cpu",
            bf16_supported=False,
            overridden=frozenset({"train.micro_batch_size"}),
        )
    micro, total = e.value.problems
    assert "but --set train.micro_batch_size=4 gives 4" in micro
    assert "--set train.micro_batch_size=4 x train.grad_accum_steps=3 in spec.yaml" in total


def test_optimizer_section_belongs_to_the_spec() -> None:
    (found,) = problems({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    assert 'has an "optimizer" section, but the run spec owns it' in found


def test_fp16_on_cpu_is_refused() -> None:
    with pytest.raises(DSConfigError, match="enables fp16, which DeepSpeed supports only on GPUs"):
        resolve({"fp16": {"enabled": True}})
    settings = resolve({"fp16": {"enabled": True}}, device="cuda")
    assert (settings.precision, settings.half) == ("fp16", True)


def test_bf16_auto_follows_the_device() -> None:
    assert resolve({"bf16": {"enabled": "auto"}}, device="cuda", bf16=True).precision == "bf16"
    assert resolve({"bf16": {"enabled": "auto"}}).precision == "fp32"
    assert resolve({"bf16": {"enabled": True}}).precision == "bf16"  # as written


def test_defaults_that_stall_the_gpu_every_step_are_off_unless_the_json_sets_them() -> None:
    """bf16's per-tensor overflow check and DeepSpeed's synchronised throughput timer."""
    quiet = resolve({"bf16": {"enabled": True}}).ds_config
    assert quiet["bf16"]["check_grad_overflow"] is False
    assert quiet["timers"]["throughput"] == {"synchronized": False}
    assert "check_grad_overflow" not in resolve({}).ds_config.get("bf16", {})  # fp32: no such step
    given = {"bf16": {"enabled": True, "check_grad_overflow": True},
             "timers": {"throughput": {"enabled": True, "synchronized": True}}}  # fmt: skip
    kept = resolve(given).ds_config
    assert kept["bf16"]["check_grad_overflow"] is True
    assert kept["timers"]["throughput"] == {"enabled": True, "synchronized": True}


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
    resolve(config)
    assert config == {"bf16": {"enabled": "auto"}}
    assert json.dumps(config)


def test_zero_section_is_validated() -> None:
    assert problems({"zero_optimization": {"stage": 4}}) == [
        'ds.json: "zero_optimization.stage" is 4; expected 0, 1, 2 or 3'
    ]
    assert problems({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}) == [
        'ds.json: "offload_param" needs ZeRO stage 3 (this file has 2)'
    ]
    (found,) = problems({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}})
    assert "\"zero_optimization.offload_optimizer.device\" is 'gpu'" in found
    assert "expected 'none', 'cpu' or 'nvme'" in found


def test_misspelled_keys_are_found_by_deepspeeds_own_models() -> None:
    found = problems(
        {
            "zero_optimisation": {"stage": 2},
            "zero_optimization": {"stage": 2, "overlap_com": True},
            "bf16": {"enabld": True},
            "activation_checkpointing": {"partition_activation": True},
        }
    )
    assert found == [
        'ds.json: unknown top-level key "zero_optimisation" (DeepSpeed would ignore it); '
        'did you mean "zero_optimization"?',
        'ds.json: "overlap_com" is not a key of the "zero_optimization" section; '
        'did you mean "overlap_comm"?',
        'ds.json: "enabld" is not a key of the "bf16" section; did you mean "enabled"?',
        'ds.json: "partition_activation" is not a key of the "activation_checkpointing" '
        'section; did you mean "partition_activations"?',
    ]
    (nested,) = problems({"zero_optimization": {"stage": 3, "offload_param": {"devce": "cpu"}}})
    assert '"devce" is not a key of the "zero_optimization.offload_param" section' in nested
    assert 'did you mean "device"?' in nested


def test_the_stage_is_read_as_deepspeed_reads_it_and_booleans_are_refused() -> None:
    assert resolve({"zero_optimization": {"stage": "3"}}).zero_stage == 3
    (found,) = problems({"zero_optimization": {"stage": True}})
    assert '"zero_optimization.stage" is True; expected 0, 1, 2 or 3' in found


def test_activation_checkpointing_values_are_typed() -> None:
    found = problems(
        {"activation_checkpointing": {"partition_activations": "yes", "number_checkpoints": 2.5}}
    )
    assert found == [
        "ds.json: \"activation_checkpointing.partition_activations\" is 'yes'; expected true or "
        "false",
        'ds.json: "activation_checkpointing.number_checkpoints" is 2.5; expected an integer or '
        "null",
    ]


def test_unknown_top_level_keys_far_from_any_known_one_are_only_noted() -> None:
    settings, notes = resolve_engine(
        {"my_site_tag": "a"},
        TRAIN,
        1,
        paths=("spec.yaml", "ds.json"),
        device_type="cpu",
        bf16_supported=False,
    )
    assert settings.zero_stage == 0
    assert notes == [
        'ds.json: DeepSpeed does not read the top-level key "my_site_tag"; it has no effect'
    ]
