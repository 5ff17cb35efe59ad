"""Tensor, sequence and pipeline parallelism through the launcher: 4 gloo ranks as 2 tensor x 2
data, 2 sequence x 2 data, 2 tensor x 2 sequence, 2 pipeline x 2 data and 2 tensor x 2 pipeline
parallel train the same losses as 1 rank; tensor ranks hold half the parameters each, pipeline
stages their layers'; checkpoints resume bit for bit (and at another layout through the
universal format) and export the same model; layouts that cannot run are refused before
anything starts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DEEPSPEED, PYTHON, TINY, ZEROLAUNCH, free_port, overrides, read_metrics, run

ITEMS = [*TINY, "model.n_head=4", "train.max_steps=10", "train.log_interval=1", "eval.interval=5",
         "checkpoint.interval=5", "checkpoint.keep_last=0", "sample.max_new_tokens=20",
         "monitor.wandb.mode=disabled"]  # fmt: skip
GLOBAL_BATCH = 8  # sequences per step in every layout
PIPELINED = ["parallel.pipeline=2", "train.grad_accum_steps=2", "eval.batches=8"]


def _train(out: Path, ranks: int, config: str, *items: str) -> str:
    """A run of ITEMS on `ranks` ranks; its stdout."""
    args = ["launcher/run.py", "--ds_config", config, *overrides(*ITEMS, f"out_dir={out}", *items)]
    if ranks == 1:
        return run([PYTHON, *args]).stdout
    port = str(free_port())
    return run(
        [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", port, *args], timeout=400
    ).stdout


def _losses(out: Path, name: str = "Loss/train") -> dict[int, float]:
    return {m["step"]: m[name] for m in read_metrics(out) if name in m}


def _tasks(root: Path) -> str:
    """A multiple-choice and a last-word task file; the eval.tasks item naming them."""
    mc = [{"context": "First Citizen: Before we proceed any further, hear me",
           "endings": [" speak.", " run.", " eat."], "label": 0},
          {"context": "You are all resolved rather to die than to", "endings": [" famish?",
           " dance?"], "label": 0}]  # fmt: skip
    lw = [{"text": "Let us kill him, and we'll have corn at our own price"},
          {"text": "You are all resolved rather to die than to famish"}]  # fmt: skip
    for name, rows in (("mc", mc), ("lw", lw)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"eval.tasks={{mc: {root / 'mc.jsonl'}, lw: {root / 'lw.jsonl'}}}"


def _scores(out: Path) -> dict:
    return {(m["step"], k): v for m in read_metrics(out) for k, v in m.items() if "Eval/" in k}


@pytest.fixture(scope="module")
def runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same model and data: 1 rank at ZeRO-0; on 4 ranks, 2 tensor x 2 data parallel at
    ZeRO-1, 2 sequence x 2 data parallel at ZeRO-2 and at ZeRO-3 (its parameters partitioned
    over the sequence x data ranks), 2 tensor x 2 sequence parallel at ZeRO-1,
    2 pipeline x 2 data parallel at ZeRO-1 (2 micro-batches of 2 per step), 2 tensor x 2
    pipeline parallel at ZeRO-1 (2 of 4). Pipelined runs evaluate 8 micro-batches: the same 32
    val sequences as the others' 4 x 8."""
    root = tmp_path_factory.mktemp("parallel")
    data = f"data.train={tiny_data}"
    micro = f"train.micro_batch_size={GLOBAL_BATCH}"
    tasks = _tasks(root)
    one = _train(root / "one", 1, "ds_configs/zero0.json", data, micro, tasks)
    tp = _train(root / "tp", 4, "ds_configs/zero1.json", data, "train.micro_batch_size=4",
                "parallel.tensor=2")  # fmt: skip
    sp = _train(root / "sp", 4, "ds_configs/zero2.json", data, "train.micro_batch_size=4",
                "parallel.sequence=2")  # fmt: skip
    tpsp = _train(root / "tpsp", 4, "ds_configs/zero1.json", data, micro, "parallel.tensor=2",
                  "parallel.sequence=2", "sample.max_new_tokens=0")  # fmt: skip
    pp = _train(root / "pp", 4, "ds_configs/zero1.json", data, *PIPELINED,
                "train.micro_batch_size=2")  # fmt: skip
    tpp = _train(root / "tpp", 4, "ds_configs/zero1.json", data, *PIPELINED,
                 "train.micro_batch_size=4", "parallel.tensor=2", tasks)  # fmt: skip
    sp3 = _train(root / "sp3", 4, "ds_configs/zero3.json", data, "train.micro_batch_size=4",
                 "parallel.sequence=2")  # fmt: skip
    stdout = {"one": one, "tp": tp, "sp": sp, "sp3": sp3, "tpsp": tpsp, "pp": pp, "tpp": tpp}
    return {"root": root, "stdout": stdout, "data": data} | {name: root / name for name in stdout}


@pytest.mark.parametrize(
    ("name", "layout"),
    [("tp", "2 tensor x 2 data parallel"), ("sp", "2 sequence x 2 data parallel"),
     ("sp3", "2 sequence x 2 data parallel"),
     ("tpsp", "2 tensor x 2 sequence x 1 data parallel"),
     ("pp", "2 pipeline x 2 data parallel"), ("tpp", "2 tensor x 2 pipeline x 1 data parallel")],
)  # fmt: skip
def test_every_layout_trains_the_one_rank_losses(runs: dict, name: str, layout: str) -> None:
    """4 gloo ranks, fp32, dropout 0: the losses of the 1-rank ZeRO-0 run of the same model
    and data (the global batch is 8 sequences everywhere)."""
    assert layout in runs["stdout"][name]
    one, split = _losses(runs["one"]), _losses(runs[name])
    assert sorted(split) == list(range(1, 11))
    assert max(abs(one[s] - split[s]) for s in one) < 1e-4, (one, split)
    val = _losses(runs[name], "Loss/val")
    assert _losses(runs["one"], "Loss/val") == pytest.approx(val, abs=1e-4)
    if name != "tpsp":  # the same text (every rank of a replica draws the same tokens; in a
        # pipeline the stages run each token's forward and the last stage's logits are shared)
        sample = lambda out: out.split("--- sample ---")[1].split("-----")[0]  # noqa: E731
        assert sample(runs["stdout"]["one"]) == sample(runs["stdout"][name])
    if name == "tpp":  # downstream tasks scored through the stages, on whole logits
        one, split = _scores(runs["one"]), _scores(runs["tpp"])
        assert sorted(one) == sorted(split) and len(one) == 8, (one, split)
        assert all(split[k] == pytest.approx(v, rel=1e-4) for k, v in one.items()), (one, split)


def test_the_memory_each_rank_holds_is_the_estimate(runs: dict) -> None:
    whole = json.loads((runs["one"] / "memory.json").read_text())["measured_bytes_per_rank"][0]
    report = json.loads((runs["tp"] / "memory.json").read_text())
    for held in report["measured_bytes_per_rank"]:
        # 1/2 of every split matrix, all of the norms and the position table.
        assert 0.5 < held["params"] / whole["params"] < 0.56
        assert held["params"] == report["estimated_bytes_per_rank"]["params"]
    # Sequence parallelism: whole weights; ZeRO-2 shards over the 2 sequence x 2 data ranks.
    report = json.loads((runs["sp"] / "memory.json").read_text())
    for held in report["measured_bytes_per_rank"]:
        assert held["params"] == whole["params"] and held["optimizer"] == whole["optimizer"] * 3 / 8
        for key in ("params", "grads", "optimizer"):
            assert held[key] == report["estimated_bytes_per_rank"][key], key
    # Pipeline stages: each its block and its end of the model (the first the embeddings, the
    # last the final norm and a copy of the tied embedding); the estimate is the busiest's.
    for name, share in (("pp", (0.5, 0.56)), ("tpp", (0.25, 0.3))):
        report = json.loads((runs[name] / "memory.json").read_text())
        held = [r["params"] for r in report["measured_bytes_per_rank"]]
        assert max(held) == report["estimated_bytes_per_rank"]["params"], name
        assert all(share[0] < h / whole["params"] < share[1] for h in held), (name, held)


def _assert_continues(resumed: Path, whole: Path, tolerance: float = 0.0) -> None:
    """Steps 6-10 of a run resumed from step 5: the uninterrupted run's (within tolerance)."""
    again, before = _losses(resumed), _losses(whole)
    assert sorted(again) == list(range(6, 11))
    assert max(abs(again[s] - before[s]) for s in again) <= tolerance, (again, before)


def _copy_tag(runs: dict, dest: Path, tag: str = "global_step5", source: str = "tp") -> Path:
    (dest / "checkpoints").mkdir(parents=True)
    shutil.copytree(runs[source] / "checkpoints" / tag, dest / "checkpoints" / tag)
    return dest


def test_a_pipelined_checkpoint_resumes_bit_for_bit_at_its_layout(
    runs: dict, tmp_path: Path
) -> None:
    """DeepSpeed writes each layer's weights once per stage (layer_NN-model_00), optimizer
    states per rank; the same layout continues bit for bit."""
    resumed = _copy_tag(runs, tmp_path / "resumed", source="pp")
    files = {p.name for p in (resumed / "checkpoints" / "global_step5").iterdir()}
    assert {"layer_00-model_00-model_states.pt", "layer_04-model_00-model_states.pt"} <= files
    items = [runs["data"], *PIPELINED, "train.micro_batch_size=2", "sample.max_new_tokens=0"]
    _train(resumed, 4, "ds_configs/zero1.json", *items)
    _assert_continues(resumed, runs["pp"])


def test_a_tensor_and_pipeline_parallel_checkpoint_resumes_without_either(
    runs: dict, tmp_path: Path
) -> None:
    """2 tensor x 2 pipeline -> 2 data-parallel ranks (the issue's TP2 x PP2 -> TP1 x PP1):
    the converter joins the tensor pieces of every stage's parameters (named by their pipeline
    layer: 3.block.attn.c_attn.weight is transformer.h.1.attn.c_attn.weight, and the universal
    copy answers to both), keeps the first stage's tied embedding; the loss goes on as in the
    unchanged run. A ZeRO-0 checkpoint has no ZeRO shards to convert: refused up front."""
    resumed = _copy_tag(runs, tmp_path / "other", source="tpp")
    out = _train(resumed, 2, "ds_configs/zero1.json", runs["data"], "train.micro_batch_size=4",
                 "sample.max_new_tokens=0")  # fmt: skip
    assert "2 tensor parallel, 2 pipeline parallel: loading it in DeepSpeed's universal" in out
    _assert_continues(resumed, runs["tpp"], 1e-5)
    zero0 = _copy_tag(runs, tmp_path / "zero0", source="one")
    refused = run([PYTHON, "launcher/run.py", "--ds_config", "ds_configs/zero1.json",
                   *overrides(*ITEMS, runs["data"], f"out_dir={zero0}")], check=False)  # fmt: skip
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "a stage-0 checkpoint keeps its optimizer states whole" in refused.stderr
    # At stage 0 its whole states load as they are on any number of data-parallel ranks.
    out = _train(zero0, 2, "ds_configs/zero0.json", runs["data"], "train.micro_batch_size=4",
                 "sample.max_new_tokens=0")  # fmt: skip
    assert "universal" not in out
    _assert_continues(zero0, runs["one"], 1e-5)


def test_a_zero3_sequence_parallel_checkpoint_resumes_on_fewer_ranks(
    runs: dict, tmp_path: Path
) -> None:
    """SP2 x DP2 at ZeRO-3 -> 2 data-parallel ranks at ZeRO-3 (universal format). DeepSpeed's
    loader hands every group the first one's weight decay and one shared Adam step counter;
    repaired, the loss goes on as in the unchanged run (before: 0.012 off within 4 steps)."""
    resumed = _copy_tag(runs, tmp_path / "fewer", source="sp3")
    out = _train(resumed, 2, "ds_configs/zero3.json", runs["data"], "train.micro_batch_size=4",
                 "sample.max_new_tokens=0")  # fmt: skip
    assert "loading it in DeepSpeed's universal format" in out
    _assert_continues(resumed, runs["sp3"], 1e-5)


def test_a_tensor_parallel_checkpoint_resumes_bit_for_bit_at_its_layout(
    runs: dict, tmp_path: Path
) -> None:
    resumed = _copy_tag(runs, tmp_path / "resumed")
    files = sorted(p.name for p in (resumed / "checkpoints" / "global_step5").iterdir())
    assert (
        "mp_rank_01_model_states.pt" in files
        and "zero_pp_rank_1_mp_rank_01_optim_states.pt" in files
    )
    _train(resumed, 4, "ds_configs/zero1.json", runs["data"], "train.micro_batch_size=4",
           "parallel.tensor=2", "sample.max_new_tokens=0")  # fmt: skip
    _assert_continues(resumed, runs["tp"])


def test_it_resumes_at_another_layout_through_the_universal_format(
    runs: dict, tmp_path: Path
) -> None:
    """2 tensor x 2 data parallel -> 2 data-parallel ranks without tensor parallelism (ZeRO-2):
    DeepSpeed's converter joins each parameter's pieces as the saved split says; the loss goes
    on as in the unchanged run."""
    resumed = _copy_tag(runs, tmp_path / "other")
    out = _train(resumed, 2, "ds_configs/zero2.json", runs["data"], "train.micro_batch_size=4",
                 "sample.max_new_tokens=0")  # fmt: skip
    assert "2 tensor parallel: loading it in DeepSpeed's universal format" in out
    _assert_continues(resumed, runs["tp"], 1e-5)
    # No conversion crosses the ZeRO-3 boundary: refused before anything starts.
    tag = resumed / "checkpoints" / "global_step5"
    refused = run([PYTHON, "launcher/run.py", "--ds_config", "ds_configs/zero3.json",
                   *overrides(*ITEMS, runs["data"], f"out_dir={resumed}", "train.max_steps=12",
                              f"checkpoint.resume={tag}")], check=False)  # fmt: skip
    assert refused.returncode == 2 and "ZeRO-3 boundary" in refused.stderr, refused.stderr[-2000:]


def test_export_of_a_tensor_or_pipeline_parallel_run_is_the_whole_model(runs: dict) -> None:
    exported = {}
    for name in ("one", "tp", "tpp"):
        out = runs["root"] / f"export_{name}"
        run([PYTHON, "-m", "launcher.export", "--run", str(runs[name]), "--out", str(out)])
        from safetensors.torch import load_file

        exported[name] = load_file(out / "model.safetensors")
    for name in ("tp", "tpp"):  # tensor shards, and pipeline layer files, put together
        assert exported["one"].keys() == exported[name].keys()
        for key, tensor in exported["one"].items():
            assert exported[name][key].shape == tensor.shape
            torch.testing.assert_close(exported[name][key], tensor, atol=1e-4, rtol=0)
    # zerolaunch eval reads the merged weights (and the ZeRO-3 shards of the sequence x data
    # ranks): the val loss the split loop logged.
    for name in ("tp", "tpp", "sp3"):
        cmd = [ZEROLAUNCH, "eval", str(runs[name]), "--tag", "global_step10"]
        result = json.loads(run(cmd).stdout)
        assert result["metrics"]["Loss/val"] == pytest.approx(
            _losses(runs[name], "Loss/val")[10], rel=1e-5
        )


def test_layouts_that_cannot_run_are_refused_together(runs: dict) -> None:
    cmd = [ZEROLAUNCH, "check", "--world-size", "6", "--ds_config", "ds_configs/zero3.json",
           *overrides(runs["data"], "parallel.tensor=4", "parallel.pipeline=4", "model.n_head=6",
                      "model.n_embd=96", "model.n_layer=2")]  # fmt: skip
    result = run(cmd, check=False)
    assert result.returncode == 2
    for expected in (
        "parallel.pipeline=4 exceeds model.n_layer=2",
        "does not divide the 6 rank(s)",
        "model.n_head=6 is not divisible by parallel.tensor=4",
        "parallel.tensor=4 with ZeRO stage 3",
        "parallel.pipeline=4 with ZeRO stage 3",
    ):
        assert expected in result.stderr, result.stderr
    cmd = [ZEROLAUNCH, "check", "--world-size", "8", "--ds_config", "ds_configs/zero2.json",
           *overrides(runs["data"], "parallel.pipeline=2", "parallel.sequence=2")]  # fmt: skip
    result = run(cmd, check=False)
    assert result.returncode == 2
    for expected in (
        "parallel.pipeline=2 with parallel.sequence=2",
        "parallel.pipeline=2 with ZeRO stage 2",
    ):
        assert expected in result.stderr, result.stderr
    fits = run([ZEROLAUNCH, "check", "--world-size", "8",
                *overrides(runs["data"], "parallel.tensor=2")])  # fmt: skip
    assert "2 tensor x 4 data parallel" in fits.stdout
    assert "rank(s) x one whole module in fp32 at most" in fits.stdout
    # A tensor-parallel tag as init weights is put together whole on every rank first.
    tag = runs["tp"] / "checkpoints" / "global_step10"
    init = f"checkpoint.init_from={tag}"
    whole = run([ZEROLAUNCH, "check", "--world-size", "8",
                 *overrides(*ITEMS, runs["data"], "parallel.tensor=2", init)])  # fmt: skip
    assert "rank(s) x the whole init weights in fp32: a tensor- or pipeline-parallel tag" in (
        whole.stdout
    )
