"""The GPU rows of docs/benchmarks.md in one process: `python tests/gpu/bench_rows.py OUT`.

Each row is `zerolaunch bench` (the same run_benchmark) with the row's model and config; the rows
share one process and one process group to save start-up time, and free the device between
them. Writes OUT/bench.json (every row's full JSON, with its command) and OUT/profile.txt (where
the time of the 124M ZeRO-1 step and of the 1.3B ZeRO-3 step goes, from the torch profiler).
ZEROLAUNCH_GPU_DRY=1 runs tiny rows on the CPU to check the plumbing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from launcher.bench import SyntheticBatches, run_benchmark  # noqa: E402
from launcher.config.load import load_spec  # noqa: E402
from launcher.runtime.distributed import detect_env  # noqa: E402
from launcher.training.plan import engine_settings  # noqa: E402

DRY = os.environ.get("ZEROLAUNCH_GPU_DRY") == "1"
# (layers, heads, width, micro-batch) of each model.
SHAPES = {"124m": (12, 12, 768, 16), "350m": (24, 16, 1024, 8), "1.3b": (24, 16, 2048, 8),
          "tiny": (2, 2, 64, 4)}  # fmt: skip
GPT2 = {
    name: [f"model.n_layer={n}", f"model.n_head={h}", f"model.n_embd={w}",
           f"train.micro_batch_size={b}"]
    for name, (n, h, w, b) in SHAPES.items()
}  # fmt: skip
# The Llama family on GPT-2's sizes: rotary, RMSNorm, SwiGLU, 3 query heads per kv head, untied.
LLAMA = ["model.positions=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.bias=false",
         "model.tie_embeddings=false"]  # fmt: skip
GPT2["llama-124m"] = [*GPT2["124m"], *LLAMA, "model.n_kv_head=4"]
GPT2["tiny-llama"] = [*GPT2["tiny"], *LLAMA, "model.n_kv_head=1"]
COMMON = ["model.block_size=1024", "model.vocab_size=50304", "model.dropout=0.0"]
if DRY:
    COMMON = ["model.block_size=64", "model.vocab_size=128", "model.dropout=0.0"]
# (row name, model, DeepSpeed config, extra overrides, --reference, warm-up steps, timed steps,
# steps around each checkpoint save for --saves, 0: none), most wanted first. DeepSpeed's ZeRO-3
# patches torch.nn.functional.linear for the rest of the process: its rows run after the profile
# of the 124M step; the checkpoint-save row (a 1.7 GB checkpoint, sync vs async) runs last, as
# the one to lose if time runs out.
ROWS = [
    ("gpt2-124m_zero1_bf16", "124m", "zero1.json", [], True, 5, 20, 0),
    # The lever measured: DeepSpeed's own defaults (bf16's per-tensor overflow check, the
    # synchronised throughput timer), which the launcher turns off (config/ds_config.py).
    ("gpt2-124m_zero1_bf16_deepspeed_defaults", "124m", "zero1.json+ds_defaults", [], True, 5,
     20, 0),
    ("gpt2-350m_zero1_bf16", "350m", "zero1.json", [], True, 5, 15, 0),
    ("gpt2-124m_zero1_bf16_compile", "124m", "zero1.json", ["train.compile=true"], True, 8, 20,
     0),
    ("llama-124m_zero1_bf16", "llama-124m", "zero1.json", [], False, 5, 15, 0),
    # One data-parallel rank: does skipping ZeRO-1's per-tensor bookkeeping close the gap to
    # plain PyTorch (0.884x at ZeRO-1 on the H200)?
    ("gpt2-124m_zero0_bf16", "124m", "zero0.json", [], True, 5, 20, 0),
    ("1.3b_zero3_ac_bf16", "1.3b", "zero3.json", ["model.activation_checkpointing=full"],
     False, 4, 12, 0),
    ("1.3b_zero3_ac_bf16_mb16", "1.3b", "zero3.json",
     ["model.activation_checkpointing=full", "train.micro_batch_size=16"], False, 3, 8, 0),
    ("gpt2-124m_zero1_bf16_saves", "124m", "zero1.json", [], False, 3, 5, 30),
]  # fmt: skip
# Generation without and with the KV cache (zerolaunch bench --sampling SHAPE --dtype bf16): 300
# tokens after a 10-token prompt, batch 1, random weights; run with the profile, before ZeRO-3.
SAMPLING_ROWS = [
    ("gpt2-124m_sampling_bf16", "gpt2-124m"),
    ("llama-124m_sampling_bf16", "llama-124m"),
]


# "BASE+VARIANT": BASE from ds_configs/ with these keys set (written to a temporary file).
DS_VARIANTS = {
    "ds_defaults": {"bf16": {"check_grad_overflow": True},
                    "timers": {"throughput": {"synchronized": True}}},
}  # fmt: skip


def ds_file(ds: str) -> Path:
    base, _, variant = ds.partition("+")
    if not variant:
        return REPO / "ds_configs" / base
    config = json.loads((REPO / "ds_configs" / base).read_text())
    for section, values in DS_VARIANTS[variant].items():
        config.setdefault(section, {}).update(values)
    path = Path(tempfile.gettempdir()) / f"{base[:-5]}_{variant}.json"
    path.write_text(json.dumps(config))
    return path


def command(
    model: str, ds: str, extra: list[str], reference: bool, warmup: int, steps: int, saves: int
):
    sets = " ".join(f"--set {item}" for item in [*GPT2[model], *COMMON, *extra])
    flags = f"--steps {steps} --warmup {warmup}" + (" --reference" if reference else "")
    flags += f" --saves /tmp --save-steps {saves}" if saves else ""
    base, _, variant = ds.partition("+")
    changed = f" (with {json.dumps(DS_VARIANTS[variant])})" if variant else ""
    return f"zerolaunch bench --ds_config ds_configs/{base}{changed} {sets} {flags}"


def run_row(
    name: str, model: str, ds: str, extra, reference: bool, warmup: int, steps: int, saves: int
):
    items = [*GPT2[_dry(model) if DRY else model], *COMMON, *extra]
    spec = load_spec(None, items)
    env = detect_env()
    ds_path = ds_file(ds)
    engine, _ = engine_settings(spec, None, ds_path, env.world_size, "cpu" if DRY else "cuda")
    args = argparse.Namespace(
        steps=steps,
        warmup=warmup,
        reference=reference,
        saves=Path(tempfile.gettempdir()) if saves else None,
        save_steps=3 if DRY else saves,
    )
    started = time.perf_counter()
    result = run_benchmark(spec, engine, env, args)
    result["wall_s"] = time.perf_counter() - started
    result["command"] = command(model, ds, extra, reference, warmup, steps, saves)
    return result


def _dry(model: str) -> str:
    return "tiny-llama" if model.startswith("llama") else "tiny"


def profile_step(out: Path, model_name: str = "124m", ds: str = "zero1.json",
                 extra: tuple[str, ...] = ()) -> None:  # fmt: skip
    """Where the time of one step goes (the top kernels and operators), added to `out`."""
    from torch.profiler import ProfilerActivity, profile

    from launcher.training.engine import build_engine
    from launcher.training.step import train_step
    from model.gpt import GPT

    spec = load_spec(None, [*GPT2["tiny" if DRY else model_name], *COMMON, *extra])
    settings, _ = engine_settings(spec, None, REPO / "ds_configs" / ds, 1,
                                  "cpu" if DRY else "cuda")  # fmt: skip
    device = torch.device("cpu") if DRY else torch.device("cuda", torch.cuda.current_device())
    with device:
        model = GPT(spec.model)
    engine = build_engine(model, spec.train, settings)
    m, t = spec.model, spec.train
    batches = SyntheticBatches.make(m.vocab_size, t.micro_batch_size, m.block_size, 1, device, 0)
    sync = torch.cuda.synchronize if not DRY else (lambda: None)
    for i in range(3):
        train_step(engine, batches, i, 1)
    sync()
    started = time.perf_counter()
    for i in range(3, 8):  # unprofiled, the loop's way: no synchronisation between steps
        train_step(engine, batches, i, 1)
    sync()
    step_ms = (time.perf_counter() - started) / 5 * 1e3
    activities = [ProfilerActivity.CPU] + ([] if DRY else [ProfilerActivity.CUDA])
    with profile(activities=activities) as prof:
        for i in range(8, 11):
            train_step(engine, batches, i, 1)
        sync()
    events = prof.key_averages()
    kernels_ms = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    # Kernel time per step against the step: what is left is the GPU waiting for the host
    # (launches, DeepSpeed's per-tensor ZeRO bookkeeping: ~7 ms of CPU per step at GPT-2 124M's
    # 148 tensors, measured on a CPU); the second table shows where the host's time goes.
    head = (f"=== {model_name} {ds} {' '.join(extra)}\n"
            f"step {step_ms:.1f} ms (5 steps, no sync between); GPU kernels "
            f"{kernels_ms / 3e3:.1f} ms per step (profiled steps)\n")  # fmt: skip
    tables = [events.table(sort_by="self_cpu_time_total", row_limit=25)]
    if not DRY:
        tables.insert(0, events.table(sort_by="self_device_time_total", row_limit=25))
    with out.open("a") as f:
        f.write(head + "\n".join(tables) + "\n")
    engine.destroy()
    del engine
    free()


def sampling_row(shape: str) -> dict:
    from launcher.evaluation.sampling_bench import SHAPES, measure_sampling

    tiny = ["model.n_layer=2", "model.n_head=4", "model.n_embd=64", "model.block_size=64"]
    spec = load_spec(None, [*SHAPES[shape], *(tiny if DRY else [])])
    device = torch.device("cpu") if DRY else torch.device("cuda", torch.cuda.current_device())
    started = time.perf_counter()
    result = measure_sampling(spec.model, device, "fp32" if DRY else "bf16",
                              new_tokens=20 if DRY else 300)  # fmt: skip
    result["wall_s"] = time.perf_counter() - started
    result["command"] = f"zerolaunch bench --sampling {shape} --dtype bf16"
    return result


def profiled(out: Path, model_name: str, ds: str, extra: tuple[str, ...]) -> None:
    """profile_step into OUT/profile.txt; a failure is written there, not raised."""
    try:
        profile_step(out / "profile.txt", model_name, ds, extra)
    except Exception as e:  # noqa: BLE001
        with (out / "profile.txt").open("a") as f:
            f.write(f"profile of {model_name} failed: {type(e).__name__}: {e}\n")
    free()


def attempt(name: str, row: Callable[[], dict], results: list[dict], out: Path) -> None:
    """One row into results and OUT/bench.json; a row that fails is recorded, not raised."""
    print(f"--- {name}", flush=True)
    try:
        result = row()
    except Exception as e:  # noqa: BLE001 - one broken row must not cost the others
        result = {"error": f"{type(e).__name__}: {e}"}
        print(f"{name} failed: {result['error']}", flush=True)
    results.append({"name": name, **result})
    (out / "bench.json").write_text(json.dumps(results, indent=1))
    free()


def summary(r: dict) -> str:
    if "error" in r:
        return f"{r['name']:<32} ERROR {r['error']}"
    if "speedup" in r:
        before, after = r["uncached"]["tokens_per_sec"], r["cached"]["tokens_per_sec"]
        return (f"{r['name']:<32} {before:>8,.1f} -> {after:,.1f} tok/s generated with the KV "
                f"cache ({r['speedup']:.2f}x), same tokens: {r['same_tokens']}")  # fmt: skip
    ref = f"  vs plain PyTorch {r['vs_reference']:.3f}" if "vs_reference" in r else ""
    return (
        f"{r['name']:<32} {r['tokens_per_sec_per_device']:>10,.0f} tok/s/device  "
        f"MFU {r['mfu']:5.1f}%  HFU {r['hfu']:5.1f}%  {r['peak_memory_gib']:6.1f} GiB{ref}"
    )


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else REPO / "runs" / "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    results = []
    (out / "profile.txt").unlink(missing_ok=True)
    zero3 = [i for i, row in enumerate(ROWS) if row[2].startswith("zero3")]
    for i, row in enumerate(ROWS):
        if i == zero3[0]:  # before the ZeRO-3 rows (see ROWS)
            profiled(out, "124m", "zero1.json", ())
            for name, shape in SAMPLING_ROWS:
                attempt(name, lambda shape=shape: sampling_row(shape), results, out)
        attempt(row[0], lambda row=row: run_row(*row), results, out)
        if i == zero3[-1]:
            profiled(out, "1.3b", "zero3.json", ("model.activation_checkpointing=full",))
    for r in results:
        print(summary(r))
    # As zerolaunch bench leaves: without interpreter teardown (the second GPU run printed every
    # row, then had not exited when its timeout came).
    from launcher.runtime.distributed import exit_together

    return exit_together(0) if torch.distributed.is_initialized() else 0


if __name__ == "__main__":
    sys.exit(main())
