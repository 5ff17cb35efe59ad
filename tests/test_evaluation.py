"""Evaluation end to end: several named val sets and downstream tasks during a real 2-rank run,
a profiler trace of two of its steps, and `zerolaunch eval` giving the numbers the training loop
logged, at another world size and ZeRO stage, and from an exported model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import (
    DEEPSPEED,
    PYTHON,
    TINY,
    ZEROLAUNCH,
    corpus_documents,
    free_port,
    overrides,
    read_metrics,
    run,
)

STEPS = 30
MICRO = 8
BLOCK = 64


def _tasks(root: Path) -> dict[str, Path]:
    """Two task files from the training text: multiple choice (the text's own continuation
    against three strings of random characters) and last word (lines of the text)."""
    rng = random.Random(0)
    text = "\n".join(corpus_documents()[:4])  # training documents: the pattern is learnt
    alphabet = sorted(set(text) - {"\n"})
    rows, lines = [], []
    for start in range(1000, 200_000, 12_500):
        context, ending = text[start : start + 40], text[start + 40 : start + 56]
        if not ending.strip():  # indentation alone (which stdlib's source, by Python version)
            continue
        junk = ["".join(rng.choice(alphabet) for _ in ending) for _ in range(3)]
        label = rng.randrange(4)
        endings = junk[:label] + [ending] + junk[label:]
        rows.append({"context": context, "endings": endings, "label": label})
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 6 and len(line) < 60 and len(lines) < 12:
            lines.append({"text": " ".join(words)})
    files = {"mc": root / "mc.jsonl", "lw": root / "lw.jsonl"}
    files["mc"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    files["lw"].write_text("".join(json.dumps(r) + "\n" for r in lines))
    return files


def _train_items(tiny_data: Path, tasks: dict[str, Path], out: Path) -> list[str]:
    return [
        *TINY,
        f"data.train={tiny_data}",
        f"out_dir={out}",
        f"train.max_steps={STEPS}",
        f"eval.sets={{own: data.val, all: {tiny_data}}}",
        f"eval.tasks={{mc: {tasks['mc']}, lw: {tasks['lw']}}}",
        "eval.tasks_interval=15",
        "train.profile={start: 3, steps: 2}",
        "checkpoint.interval=10",
        "checkpoint.keep_last=0",
        "sample.max_new_tokens=0",
    ]


@pytest.fixture(scope="module")
def evaluated(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One 2-rank ZeRO-2 run with two val sets, two tasks and a profile of steps 3-4."""
    root = tmp_path_factory.mktemp("evaluation")
    tasks, out = _tasks(root), root / "run"
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "launcher/run.py",
           "--ds_config", "ds_configs/zero2.json"]  # fmt: skip
    result = run([*cmd, *overrides(*_train_items(tiny_data, tasks, out))], timeout=400)
    return {"out": out, "tasks": tasks, "stdout": result.stdout, "root": root}


def _at(metrics: list[dict], step: int) -> dict:
    return {k: v for m in metrics if m.get("step") == step for k, v in m.items()}


def test_named_val_sets_and_tasks_are_logged_and_the_model_beats_chance(evaluated: dict) -> None:
    metrics = read_metrics(evaluated["out"])
    for step in (10, 20, 30):
        record = _at(metrics, step)
        assert record["Loss/val"] == record["Loss/val/own"]  # the first set is the monitored one
        assert 0 < record["Loss/val/all"] != record["Loss/val/own"]  # another set of samples
    for step in (15, 30):  # eval.tasks_interval, and the last step
        record = _at(metrics, step)
        assert set(record) >= {"Eval/mc/acc", "Eval/mc/acc_norm", "Eval/lw/acc", "Eval/lw/ppl"}
    assert not any("Eval/mc/acc" in m for m in metrics if m["step"] not in (15, 30))
    last = _at(metrics, STEPS)
    assert last["Eval/mc/acc"] >= 0.75 and last["Eval/mc/acc_norm"] >= 0.75  # chance: 0.25
    assert 1 < last["Eval/lw/ppl"] < 97**8  # below a uniform guess of the last words' chars
    # Every record carries the global count of trained tokens (the tokens axis).
    for m in metrics:
        if "event" not in m:
            assert m["Training/tokens"] == m["step"] * MICRO * 2 * BLOCK


def test_profile_of_two_steps(evaluated: dict) -> None:
    out = evaluated["out"]
    line = next(x for x in evaluated["stdout"].splitlines() if x.startswith("profile of steps"))
    assert "steps 3-4" in line and "%" in line and "rank0.pt.trace.json" in line
    for rank in (0, 1):
        trace = json.loads((out / "profile" / f"rank{rank}.pt.trace.json").read_text())
        names = {e.get("name", "") for e in trace["traceEvents"]}
        assert {n for n in names if n.startswith("ProfilerStep#")} >= {
            "ProfilerStep#3",
            "ProfilerStep#4",
        }


def _eval(*args: str, ranks: int = 0) -> dict:
    """`zerolaunch eval` (stdout: the JSON alone), or 2 ranks under the deepspeed runner (which
    prints lines of its own); the JSON result."""
    if not ranks:
        return json.loads(run([ZEROLAUNCH, "eval", *args], timeout=300).stdout)
    cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()),
           "launcher/evaluate.py", *args]  # fmt: skip
    lines = run(cmd, timeout=300).stdout.splitlines()
    start, end = lines.index("{"), lines.index("}")
    return json.loads("\n".join(lines[start : end + 1]))


def test_eval_command_gives_the_training_loops_numbers(evaluated: dict) -> None:
    out = evaluated["out"]
    logged = _at(read_metrics(out), 30)
    one = _eval(str(out), "--tag", "global_step30")  # 1 process; the run's ZeRO-2 config
    names = ["Loss/val", "Loss/val/own", "Loss/val/all", "Eval/mc/acc", "Eval/mc/acc_norm",
             "Eval/lw/acc", "Eval/lw/ppl"]  # fmt: skip
    for name in names:
        assert one["metrics"][name] == pytest.approx(logged[name], rel=1e-5), name
    assert one["step"] == 30 and one["world_size"] == 1
    assert one["datasets"]["own"]["samples"] == 4 * MICRO * 2  # what training evaluated

    # Another world size, ZeRO stage and micro-batch size: the same numbers (step 20's tag).
    at20 = _at(read_metrics(out), 20)
    two = _eval(str(out), "--tag", "global_step20", "--ds_config", "ds_configs/zero3.json",
                "--micro-batch-size", "3", ranks=2)  # fmt: skip
    assert two["zero_stage"] == 3 and two["world_size"] == 2
    for name in ("Loss/val", "Loss/val/own", "Loss/val/all"):
        assert two["metrics"][name] == pytest.approx(at20[name], rel=1e-5), name


def test_eval_of_an_exported_model_on_given_data_and_tasks(
    evaluated: dict, tiny_data: Path
) -> None:
    out, exported = evaluated["out"], evaluated["root"] / "exported"
    run([PYTHON, "-m", "launcher.export", "--run", str(out), "--out", str(exported)])
    mc = evaluated["tasks"]["mc"]
    result_file = evaluated["root"] / "eval.json"
    args = ["--data", f"whole={tiny_data}", "--samples", "300", "--tasks", f"mc={mc}",
            "--json", str(result_file)]  # fmt: skip
    from_export = _eval(str(exported), *args)
    from_run = _eval(str(out), *args)
    assert json.loads(result_file.read_text())["checkpoint"] == str(
        out / "checkpoints" / "global_step30"
    )
    assert set(from_export["datasets"]) == {"whole"} and set(from_export["tasks"]) == {"mc"}
    whole = from_export["datasets"]["whole"]
    assert whole["loss"] == pytest.approx(from_run["datasets"]["whole"]["loss"], rel=1e-5)
    assert whole["samples"] == 300 and whole["tokens"] == 300 * BLOCK
    assert from_export["tasks"]["mc"]["acc"] == from_run["tasks"]["mc"]["acc"]


def test_bad_task_files_and_val_sets_stop_before_training(
    evaluated: dict, tiny_data: Path, tmp_path: Path
) -> None:
    mc = evaluated["tasks"]["mc"]
    rows = mc.read_text().splitlines()
    broken = tmp_path / "broken.jsonl"
    row = json.loads(rows[2])
    row["label"] = 7
    broken.write_text("\n".join([rows[0], rows[1], json.dumps(row)]) + "\n")
    out = tmp_path / "run"
    items = _train_items(tiny_data, evaluated["tasks"], out)
    items += [f"eval.tasks={{mc: {broken}}}"]
    result = run([PYTHON, "launcher/run.py", *overrides(*items)], check=False)
    assert result.returncode == 2, result.stderr
    assert str(broken) in result.stderr and "line 3" in result.stderr
    assert "label" in result.stderr
    assert not out.exists()  # found in pre-flight: nothing written

    # A val set tokenized otherwise (its own char vocabulary): exit 2 naming it.
    other = tmp_path / "text"
    other.mkdir()
    (other / "a.txt").write_text("only a few letters here " * 200)
    prefix = tmp_path / "other"
    run([PYTHON, "-m", "data_pipeline.prepare", "--input", str(other), "--tokenizer", "char",
         "--out", str(prefix), "--no-progress"])  # fmt: skip
    items = _train_items(tiny_data, evaluated["tasks"], out) + [f"eval.sets={{x: {prefix}}}"]
    result = run([PYTHON, "launcher/run.py", *overrides(*items)], check=False)
    assert (
        result.returncode == 2 and "eval.sets.x" in result.stderr and str(prefix) in result.stderr
    )
    assert not out.exists()
    bad = run([ZEROLAUNCH, "eval", str(evaluated["out"]), "--data", str(prefix)], check=False)
    assert bad.returncode == 2 and str(prefix) in bad.stderr
