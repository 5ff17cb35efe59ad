"""Run spec loading: strict, typed, every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.config.load import SpecError, load_spec
from launcher.config.paths import DEFAULT_SPEC
from launcher.config.spec import RunSpec

SPECS = sorted((Path(__file__).parent.parent / "launcher" / "specs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_every_shipped_spec_loads(path: Path) -> None:
    spec = load_spec(path)
    assert isinstance(spec, RunSpec)


def test_default_spec_is_the_demo() -> None:
    spec = load_spec()
    assert spec.name == "shakespeare_char"
    assert spec.run_dir == Path("runs/shakespeare_char")
    assert spec.sample.prompt == "What is an LLM?"
    assert DEFAULT_SPEC in SPECS


def test_unknown_key_names_path_and_closest_key(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, "train:\n  lrr: 0.1\n"))
    assert "train.lrr: unknown key; did you mean 'train.lr'?" in str(e.value)


def test_unknown_section_is_reported(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"trian: unknown key; did you mean 'train'\?"):
        load_spec(write(tmp_path, "trian:\n  lr: 0.1\n"))


def test_wrong_type_names_key_value_and_expected_type(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, "train:\n  max_steps: lots\n"))
    assert "train.max_steps: got 'lots' (str), expected int" in str(e.value)


def test_float_written_without_a_dot_is_accepted(tmp_path: Path) -> None:
    # PyYAML reads `1e-5` as a string (YAML 1.1 wants a dot); users write it anyway.
    spec = load_spec(write(tmp_path, "train:\n  lr: 1e-3\n  min_lr: 1e-5\n"))
    assert spec.train.lr == pytest.approx(1e-3) and isinstance(spec.train.lr, float)
    assert spec.train.min_lr == pytest.approx(1e-5)


def test_int_accepted_for_float_but_not_float_for_int(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, "train:\n  grad_clip: 1\n"))
    assert spec.train.grad_clip == 1.0
    with pytest.raises(SpecError, match=r"train.micro_batch_size: got 8.5 \(float\), expected int"):
        load_spec(write(tmp_path, "train:\n  micro_batch_size: 8.5\n"))


def test_bool_is_not_an_int(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="model.n_layer: got True"):
        load_spec(write(tmp_path, "model:\n  n_layer: true\n"))


def test_all_problems_reported_together(tmp_path: Path) -> None:
    text = "train:\n  lrr: 1\n  max_steps: x\nmodel:\n  n_embd: big\nsampel: {}\n"
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, text))
    assert len(e.value.problems) == 4
    message = str(e.value)
    for key in ("train.lrr", "train.max_steps", "model.n_embd", "sampel"):
        assert key in message


def test_value_checks(tmp_path: Path) -> None:
    text = "model:\n  n_embd: 100\n  n_head: 3\ntrain:\n  lr: 1e-4\n  min_lr: 1e-3\n"
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, text))
    assert "model.n_head: 3 does not divide n_embd=100" in str(e.value)
    assert "train.min_lr: 0.001 is above train.lr=0.0001" in str(e.value)


def test_set_overrides_with_yaml_types() -> None:
    spec = load_spec(
        None,
        [
            "train.max_steps=7",
            "train.lr=3e-4",
            "model.vocab_size=null",
            "out_dir=/tmp/x",
            "sample.prompt=Hello there",
        ],
    )
    assert spec.train.max_steps == 7
    assert spec.train.lr == pytest.approx(3e-4)
    assert spec.model.vocab_size is None
    assert spec.run_dir == Path("/tmp/x")
    assert spec.sample.prompt == "Hello there"


def test_set_unknown_key_and_bad_form() -> None:
    with pytest.raises(
        SpecError, match=r"train.max_step: unknown key; did you mean 'train.max_steps'"
    ):
        load_spec(None, ["train.max_step=7"])
    with pytest.raises(SpecError, match="expected KEY.PATH=VALUE"):
        load_spec(None, ["train.max_steps"])


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(Exception, match="not valid YAML"):
        load_spec(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(Exception, match="expected a mapping"):
        load_spec(write(tmp_path, "- a list\n"))


def test_the_reference_documents_every_spec_key() -> None:
    import dataclasses

    reference = (Path(__file__).parent.parent / "docs" / "run-spec.md").read_text()

    def keys(section: object, prefix: str) -> list[str]:
        found = []
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                found += keys(value, f"{prefix}{f.name}.")
            else:
                found.append(f"{prefix}{f.name}")
        return found

    every = keys(RunSpec(), "")
    assert "monitor.wandb.mode" in every and len(every) > 40
    missing = [k for k in every if f"`{k}`" not in reference]
    assert not missing, missing
