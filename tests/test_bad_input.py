"""Bad input, generated: spec keys and `--set` values, DeepSpeed JSONs, damaged dataset and
checkpoint files, thrown at pre-flight. Every case must end as a clean start or one UserError
(exit 2) whose message names the key or the file, and no existing file may change.

The cases come from a seeded generator (ZEROLAUNCH_BAD_INPUT_SEED picks another seed, _CASES
more cases), so a failure names a reproducible case; a handful also go through the real command
line for the exit code and the absence of a traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import pytest
from conftest import PYTHON, REPO, overrides, run

from launcher.checkpoints.contract import CheckpointMeta
from launcher.config.spec import RunSpec
from launcher.errors import UserError
from launcher.runtime.distributed import DistEnv
from launcher.training.plan import prepare_run

SEED = int(os.environ.get("ZEROLAUNCH_BAD_INPUT_SEED", "20261127"))
CASES = int(os.environ.get("ZEROLAUNCH_BAD_INPUT_CASES", "40"))
ONE_RANK = DistEnv(0, 0, 1, 1)
BAD_VALUES = ["abc", "", "[1, 2]", "{a: 1}", "true", "-1", "0", "1e30", "-1e-30", ".nan", "null",
              "'7'", "[]", "2.5", "99999999999999999999"]  # fmt: skip


def tree_hash(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def leaf_keys() -> list[str]:
    import dataclasses

    def walk(section: object, prefix: str) -> list[str]:
        keys = []
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            path = f"{prefix}{f.name}"
            keys += walk(value, f"{path}.") if dataclasses.is_dataclass(value) else [path]
        return keys

    return walk(RunSpec(), "")


def typo(word: str, rng: random.Random) -> str:
    i = rng.randrange(len(word))
    return rng.choice([word[:i] + word[i + 1 :], word[:i] + "x" + word[i:], word + "s"])


def attempt(spec_items: list[str], ds: Path, names: list[str]) -> str | None:
    """prepare_run on one case: None for a clean start, else the UserError's message (which
    must name one of `names`); any other exception fails the test with the case."""
    try:
        prepare_run(None, ds, spec_items, env=ONE_RANK, device="cpu")
    except UserError as e:
        message = str(e)
        assert any(n in message for n in names), (spec_items, ds, message)
        return message
    return None


@pytest.fixture
def world(tiny_data: Path, tmp_path: Path):
    """A copy of the prepared dataset and an out_dir, hashed before every case."""
    data = tmp_path / "data"
    data.mkdir()
    for suffix in (".bin", ".idx", ".json"):
        shutil.copyfile(f"{tiny_data}{suffix}", data / f"stdlib{suffix}")
    base = [f"data.train={data / 'stdlib'}", f"out_dir={tmp_path / 'run'}"]
    return tmp_path, data / "stdlib", base


def test_generated_spec_keys_and_set_values(world) -> None:
    root, _, base = world
    rng = random.Random(SEED)
    keys = [k for k in leaf_keys() if k not in ("data.train", "out_dir")]
    before = tree_hash(root)
    refused = 0
    for _ in range(CASES):
        key = rng.choice(keys)
        if rng.random() < 0.3:  # a misspelled key, at any depth
            parts = key.split(".")
            j = rng.randrange(len(parts))
            parts[j] = typo(parts[j], rng)
            case = f"{'.'.join(parts)}=1"
            names = [".".join(parts[: j + 1])]
        else:  # a value of the wrong type or range
            case = f"{key}={rng.choice(BAD_VALUES)}"
            names = [key, "sample.prompt", "model.vocab_size", "train.", "data"]
        refused += attempt([*base, case], REPO / "ds_configs" / "zero0.json", names) is not None
    assert tree_hash(root) == before
    assert refused > CASES // 2  # the generator does make bad input


def test_generated_deepspeed_configs(world) -> None:
    root, _, base = world
    rng = random.Random(SEED + 1)
    shipped = [json.loads(p.read_text()) for p in sorted((REPO / "ds_configs").glob("*.json"))]
    before = tree_hash(root)
    for i in range(CASES):
        config = json.loads(json.dumps(rng.choice(shipped)))
        ds = root / f"case{i}.json"
        text = _mutate_ds(config, rng)
        ds.write_text(text)
        attempt(base, ds, [str(ds)])
        ds.unlink()
    assert tree_hash(root) == before


def _mutate_ds(config: dict, rng: random.Random) -> str:
    kind = rng.randrange(6)
    sections = [k for k, v in config.items() if isinstance(v, dict)]
    if kind == 0 and sections:  # an unknown key in a section DeepSpeed validates
        config[rng.choice(sections)][typo(rng.choice(["stage", "enabled", "device"]), rng)] = 1
    elif kind == 1:  # a value of the wrong type where DeepSpeed or the launcher reads it
        zero = config.setdefault("zero_optimization", {})
        zero[rng.choice(["stage", "reduce_bucket_size", "overlap_comm"])] = rng.choice(
            ["x", -3, [1], {"a": 1}, 1.5, None]
        )
    elif kind == 2 and sections:  # a section that is not an object
        config[rng.choice(sections)] = rng.choice([1, "on", [1, 2], None])
    elif kind == 3:  # a near-miss of a top-level key
        config[typo(rng.choice(["zero_optimization", "gradient_clipping", "bf16"]), rng)] = {}
    elif kind == 4:  # the batch arithmetic disagreeing with the spec
        config[rng.choice(["train_batch_size", "gradient_accumulation_steps"])] = rng.choice(
            [3, "x", 0, -8]
        )
    else:  # not JSON at all, or not an object
        return rng.choice(["", "{", "[1, 2]", '{"zero_optimization": {"stage": 2,}}', "null"])
    return json.dumps(config)


def test_generated_damage_to_dataset_files(world) -> None:
    root, prefix, base = world
    rng = random.Random(SEED + 2)
    pristine = {s: Path(f"{prefix}{s}").read_bytes() for s in (".bin", ".idx", ".json")}
    for _ in range(CASES):
        suffix = rng.choice(list(pristine))
        damaged = _damage(pristine[suffix], rng)
        path = Path(f"{prefix}{suffix}")
        path.write_bytes(damaged)
        before = tree_hash(root)
        # A changed byte inside the char vocabulary is still a valid file: the prompt check
        # is then what notices that the tokenizer no longer knows its characters.
        attempt(base, REPO / "ds_configs" / "zero0.json", [str(prefix), "sample.prompt"])
        assert tree_hash(root) == before
        path.write_bytes(pristine[suffix])


def _damage(data: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:  # truncated
        return data[: rng.randrange(len(data))]
    if kind == 1:  # a few bytes changed anywhere (header, sizes, pointers, document index)
        raw = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw)
    if kind == 2:  # bytes appended
        return data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return b""  # emptied


def test_generated_damage_to_checkpoint_metadata(world) -> None:
    root, _, base = world
    rng = random.Random(SEED + 3)
    tag = root / "run" / "checkpoints" / "global_step10"
    tag.mkdir(parents=True)
    (tag / "shard.pt").write_bytes(b"x" * 64)
    good = CheckpointMeta(10, 160, "abc", _model(base), 0, 1, "fp32", manifest={"shard.pt": 64})
    for _ in range(CASES):
        data = json.loads(good.to_json())
        field = rng.choice(list(data))
        data[field] = rng.choice(["x", -1, None, [1], {"a": 1}, 1.5, 10**30])
        text = json.dumps(data) if rng.random() < 0.8 else json.dumps(data)[: rng.randrange(40)]
        (tag / "zerolaunch.json").write_text(text)
        before = tree_hash(root)
        for resume in ("auto", str(tag)):
            attempt([*base, f"checkpoint.resume={resume}"], REPO / "ds_configs" / "zero0.json",
                    [str(tag), "checkpoint", "resume"])  # fmt: skip
        assert tree_hash(root) == before


def _model(base: list[str]) -> dict:
    import dataclasses

    plan = prepare_run(None, REPO / "ds_configs" / "zero0.json", base, env=ONE_RANK, device="cpu")
    return dataclasses.asdict(plan.spec.model)


@pytest.mark.parametrize("case", range(4))
def test_bad_input_through_the_command_line(world, case: int) -> None:
    """A few generated cases end to end: exit 2, `error:` first, no traceback, nothing touched."""
    root, _, base = world
    rng = random.Random(SEED + 10 + case)
    key = rng.choice([k for k in leaf_keys() if k not in ("data.train", "out_dir")])
    items = [*base, f"{key}={rng.choice(['abc', '[1, 2]', '{a: 1}'])}"]
    before = tree_hash(root)
    result = run([PYTHON, "launcher/run.py", *overrides(*items)], check=False)
    assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert tree_hash(root) == before
