"""Bad input stops `launcher/run.py` with exit code 2, one clear message, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import PYTHON, TINY, ZEROLAUNCH, overrides, run


def launch(*args: str, ds_config: str = "ds_configs/zero2.json"):
    return run([PYTHON, "launcher/run.py", "--ds_config", ds_config, *args], check=False)


def assert_user_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: ")
    for fragment in fragments:
        assert fragment in result.stderr


def test_unknown_keys_and_types_reported_together(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = launch(*overrides("train.lrr=1", "model.n_layer=two", f"out_dir={out}"))
    assert_user_error(
        result,
        "2 problems",
        "train.lrr: unknown key; did you mean 'train.lr'?",
        "model.n_layer: got 'two' (str), expected int",
    )
    assert not out.exists()


def test_missing_spec_and_ds_config(tmp_path: Path) -> None:
    assert_user_error(launch("--spec", str(tmp_path / "x.yaml")), "x.yaml does not exist")
    assert_user_error(launch(ds_config=str(tmp_path / "x.json")), "x.json does not exist")


def test_malformed_ds_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2\n')
    assert_user_error(launch(ds_config=str(bad)), "bad.json, line 2, column 1")


def test_ds_config_disagreeing_with_spec(tmp_path: Path, tiny_data: Path) -> None:
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {}}))
    result = launch(
        *overrides(f"data.train={tiny_data}", "train.micro_batch_size=8"), ds_config=str(ds)
    )
    # The value came from --set, and the message says so (not the spec file).
    assert_user_error(
        result,
        'ds.json sets "train_micro_batch_size_per_gpu": 4, but --set train.micro_batch_size=8 '
        "gives 8",
    )


def test_missing_dataset_names_the_prepare_command(tmp_path: Path) -> None:
    result = launch(*overrides(f"data.train={tmp_path / 'nodata'}", f"out_dir={tmp_path / 'r'}"))
    assert_user_error(result, "no prepared dataset at", "python -m data_pipeline.prepare")
    assert not (tmp_path / "r").exists()


def test_vocab_larger_than_model(tiny_data: Path, tmp_path: Path) -> None:
    result = launch(
        *overrides(f"data.train={tiny_data}", "model.vocab_size=16", f"out_dir={tmp_path / 'r'}")
    )
    assert_user_error(result, "model.vocab_size=16 is smaller than the tokenizer's vocabulary")


def test_fp16_on_cpu(tiny_data: Path, tmp_path: Path) -> None:
    ds = tmp_path / "fp16.json"
    ds.write_text(json.dumps({"fp16": {"enabled": True}}))
    result = launch(*overrides(f"data.train={tiny_data}"), ds_config=str(ds))
    assert_user_error(result, "enables fp16, which DeepSpeed supports only on GPUs")


@pytest.mark.integration
def test_existing_checkpoints_are_never_touched_by_a_bad_launch(
    tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    base = [
        *TINY,
        f"data.train={tiny_data}",
        f"out_dir={out}",
        "train.max_steps=10",
        "sample.max_new_tokens=0",
    ]
    run([PYTHON, "launcher/run.py", "--ds_config", "ds_configs/zero2.json", *overrides(*base)])
    snapshot = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    assert any(p.name.endswith("optim_states.pt") for p in snapshot)
    # Another model shape against these checkpoints: refused, listing what differs.
    other = launch(*overrides(*base, "model.n_embd=32", "train.max_steps=20"))
    assert_user_error(
        other, "written for another model shape", "model.n_embd: checkpoint 64, now 32"
    )
    # Starting over on top of them: refused.
    fresh = launch(*overrides(*base, "checkpoint.resume=none"))
    assert_user_error(fresh, "already holds checkpoints", "checkpoint.resume=auto")
    # An explicit resume path that is not a checkpoint: refused.
    nowhere = launch(*overrides(*base, f"checkpoint.resume={tmp_path}"))
    assert_user_error(nowhere, "no checkpoint there")
    after = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    assert after == snapshot
    shutil.rmtree(out)


def test_prompt_outside_the_vocabulary_fails_before_training(
    tiny_data: Path, tmp_path: Path
) -> None:
    result = launch(
        *overrides(f"data.train={tiny_data}", "sample.prompt=naïve ☃", f"out_dir={tmp_path / 'r'}")
    )
    assert_user_error(result, "sample.prompt=", "not in the tokenizer's vocabulary")
    assert not (tmp_path / "r").exists()


def test_misspelled_deepspeed_keys_are_listed_with_every_other_problem(tmp_path: Path) -> None:
    ds = tmp_path / "typo.json"
    ds.write_text(
        json.dumps({"zero_optimization": {"stage": 2, "overlap_com": True}, "bf16": {"enabld": 1}})
    )
    data = tmp_path / "nodata"
    result = run(
        [ZEROLAUNCH, "check", "--ds_config", str(ds), *overrides(f"data.train={data}")],
        check=False,
    )
    assert_user_error(result, "error: 3 problems:\n")
    lines = result.stderr.splitlines()
    overlap = '"overlap_com" is not a key of the "zero_optimization" section'
    assert f'- {ds}: {overlap}; did you mean "overlap_comm"?' in lines
    assert f'- {ds}: "enabld" is not a key of the "bf16" section; did you mean "enabled"?' in lines
    assert any(line.startswith(f"- data: no prepared dataset at {data}") for line in lines)


def test_the_zerolaunch_command_refuses_what_it_cannot_run(tmp_path: Path) -> None:
    bare = run([ZEROLAUNCH], check=False)
    assert bare.returncode == 2 and "commands:" in bare.stderr and "train" in bare.stderr
    assert "commands:" in run([ZEROLAUNCH, "--help"]).stdout
    typo = run([ZEROLAUNCH, "trian"], check=False)
    assert typo.returncode == 2 and "unknown command 'trian'" in typo.stderr
    both = run(
        [ZEROLAUNCH, "check", "--deepspeed", "ds_configs/zero3.json", "--ds_config", "x.json"],
        check=False,
    )
    assert_user_error(both, "name two different DeepSpeed configs")


def test_a_directory_where_a_file_is_expected(tmp_path: Path) -> None:
    assert_user_error(launch("--spec", str(tmp_path)), f"run spec {tmp_path} is a directory")
    assert_user_error(
        launch(ds_config=str(tmp_path)), f"DeepSpeed config {tmp_path} is a directory"
    )


def test_a_dataset_file_names_its_prefix_and_a_folder_lists_its_datasets(tiny_data: Path) -> None:
    check = [ZEROLAUNCH, "check", "--set", "sample.max_new_tokens=0"]
    for suffix in (".bin", ".idx", ".json"):  # the prefix was meant
        result = run([*check, "--set", f"data.train={tiny_data}{suffix}"])
        assert "data: stdlib x1" in result.stdout
    folder = run([*check, "--set", f"data.train={tiny_data.parent}"], check=False)
    assert_user_error(
        folder, f"{tiny_data.parent} is a directory", f"the datasets in it: {tiny_data}"
    )


def test_suggestions_know_where_keys_live() -> None:
    result = launch(*overrides("optimiser.lr=1", "train.n_layer=2", "train.batch_size=4"))
    assert_user_error(
        result,
        "optimiser: unknown key; the optimizer's settings are train.lr, train.beta1",
        "train.n_layer: unknown key; did you mean 'model.n_layer'? (n_layer lives in 'model')",
        "train.batch_size: unknown key; did you mean 'train.micro_batch_size' (per rank)?",
    )


def test_a_rendezvous_port_in_use_says_how_to_choose_another(
    tiny_data: Path, tmp_path: Path
) -> None:
    import socket

    out = tmp_path / "r"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(
            [PYTHON, "launcher/run.py", *overrides(f"data.train={tiny_data}", f"out_dir={out}")],
            check=False,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
    assert_user_error(
        result, f"rank 0 cannot listen on 127.0.0.1:{port}: the port is in use", "--master_port"
    )
    assert not out.exists()  # nothing written before the process group was up
