"""Throughput of the real training step: tokens/s, MFU, step times and memory, on synthetic tokens.

    python -m launcher.bench --ds_config ds_configs/zero0.json --set model.vocab_size=65
    deepspeed --num_gpus 2 launcher/bench.py --ds_config ds_configs/zero2.json --reference
    python -m launcher.bench --spec my.yaml --steps 50 --warmup 10 --json --out bench.json

The step is run.py's: the same model, engine, optimizer and options from the same spec and
DeepSpeed JSON, fed random tokens so that no dataset is needed. Every step is timed between two
device synchronisations; the figures are the median (and 90th percentile) after the warm-up.
`--reference` also times a plain-PyTorch step of the same model (torch AdamW, fused on GPUs,
the same clip, accumulation and precision, no DeepSpeed) in the same process, so the engine's
overhead is measured on the same machine at the same moment: the two alternate step by step,
and `vs_reference` is the median over pairs of (reference step time / engine step time).
Peak memory is the process's (both models when --reference). Prints one JSON object.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (deepspeed launcher/bench.py): import the project
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

from launcher.errors import UserError, run_cli  # noqa: E402
from launcher.run import add_spec_arguments, exit_together  # noqa: E402

DEFAULT_VOCAB = 50304
"""GPT-2's 50,257 tokens padded to a multiple of 64: the vocabulary when the spec leaves it null."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m launcher.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_spec_arguments(p, "ds_configs/zero0.json")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument(
        "--reference", action="store_true", help="also time a plain-PyTorch step of the model"
    )
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON to this file")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise UserError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps}, {args.warmup}")
    return args


@dataclass
class SyntheticBatches:
    """Random tokens already on the device: the loader's interface, none of its cost."""

    batches: list[tuple[Any, Any]]
    accum: int
    device: Any

    @classmethod
    def make(cls, vocab: int, micro: int, block: int, accum: int, device: Any, seed: int):
        import torch

        gen = torch.Generator().manual_seed(seed)
        batches = []
        for _ in range(2 * accum):  # a few distinct batches, reused round-robin
            tokens = torch.randint(0, vocab, (micro, block + 1), generator=gen)
            x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
            batches.append((x.to(device), y.to(device)))
        return cls(batches, accum, device)

    def train(self, step: int, micro_step: int) -> tuple[Any, Any]:
        return self.batches[(step * self.accum + micro_step) % len(self.batches)]


def timed(steps: list[Callable[[int], None]], n: int, warmup: int, device: Any) -> list[list]:
    """Seconds per step of each step function, after `warmup` untimed steps of each.

    With several functions the steps alternate (a, b, a, b, ...), so a machine that slows down
    or speeds up during the benchmark (turbo, a noisy neighbour) weighs on all of them alike.
    Every timed step lies between two device synchronisations.
    """
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(warmup):
        for step in steps:
            step(i)
    times: list[list[float]] = [[] for _ in steps]
    for i in range(warmup, warmup + n):
        for step, out in zip(steps, times):
            sync()
            start = time.perf_counter()
            step(i)
            sync()
            out.append(time.perf_counter() - start)
    return times


def summarise(times: list[float], tokens_per_step: int, flops: float, peak: float) -> dict:
    from launcher import mfu

    median = statistics.median(times)
    per_device = tokens_per_step / median
    return {
        "tokens_per_sec_per_device": per_device,
        "step_ms_median": 1000 * median,
        "step_ms_p90": 1000 * sorted(times)[min(len(times) - 1, int(0.9 * len(times)))],
        "mfu": mfu.mfu(flops, per_device, peak),
    }


def reference_step(model: Any, spec: Any, batches: SyntheticBatches, bf16: bool) -> Callable:
    """One optimizer step of plain PyTorch: what a nanoGPT-style loop does with this model."""
    import torch

    from launcher.schedule import lr_at
    from model.gpt import param_groups

    t, device = spec.train, next(model.parameters()).device
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(
        param_groups(model, t.weight_decay), lr=lr_at(0, t), betas=(t.beta1, t.beta2), **fused
    )
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    )

    def step(i: int) -> None:
        for micro in range(t.grad_accum_steps):
            x, y = batches.train(i, micro)
            with autocast:
                _, loss = model(x, y)
            (loss / t.grad_accum_steps).backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _spec(args: argparse.Namespace):
    from dataclasses import replace

    from launcher.config import load_spec

    spec = load_spec(args.spec, args.overrides)
    if spec.model.vocab_size is None:
        print(
            f"note: model.vocab_size is null (the dataset's, for training); the benchmark uses "
            f"{DEFAULT_VOCAB}: set --set model.vocab_size=N for another",
            file=sys.stderr,
        )
        spec = replace(spec, model=replace(spec.model, vocab_size=DEFAULT_VOCAB))
    return spec


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor", category=FutureWarning)
    from launcher.distributed import detect_env, device_type
    from launcher.preflight import engine_config

    spec = _spec(args)
    env = detect_env()
    ds_config = engine_config(spec, args.spec, args.ds_config, env.world_size, device_type())
    result = run_benchmark(spec, ds_config, env, args)
    if env.is_main:
        text = json.dumps(result, indent=1)
        print(text if args.json else f"{_headline(result)}\n{text}", flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text + "\n")
    return exit_together(0)


def run_benchmark(spec: Any, ds_config: dict, env: Any, args: argparse.Namespace) -> dict:
    import torch

    from launcher import mfu
    from launcher.distributed import init_process_group, select_device
    from launcher.ds_config import zero_stage
    from launcher.monitor import StepTimer
    from launcher.reporter import peak_memory_gib
    from launcher.train import build_engine, model_flops_per_token, train_step
    from model.gpt import GPT, recompute_fraction

    device = select_device(env)
    init_process_group()
    m, t = spec.model, spec.train
    bf16 = bool(ds_config.get("bf16", {}).get("enabled"))
    torch.manual_seed(t.seed)
    model = GPT(m)
    flops = model_flops_per_token(model)
    params = model.num_params(non_embedding=False)
    peak, peak_source = mfu.device_peak(device, bf16, spec.monitor.peak_flops)
    batches = SyntheticBatches.make(
        m.vocab_size, t.micro_batch_size, m.block_size, t.grad_accum_steps, device, t.seed
    )
    tokens_per_step = t.micro_batch_size * t.grad_accum_steps * m.block_size  # per device
    engine = build_engine(model, spec, ds_config, device)
    timer = StepTimer(device, detailed=False)

    def engine_step(i: int) -> None:
        train_step(engine, batches, i, t.grad_accum_steps, timer, [])
        timer.steps.clear()

    steps = [engine_step]
    if args.reference:  # same initial weights, its own optimizer state
        torch.manual_seed(t.seed)
        steps.append(reference_step(GPT(m).to(device), spec, batches, bf16))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = timed(steps, args.steps, args.warmup, device)
    measured = summarise(times[0], tokens_per_step, flops, peak)
    recompute = recompute_fraction(m)
    per_device = measured["tokens_per_sec_per_device"]
    result = {
        "tokens_per_sec": per_device * env.world_size,
        **measured,
        "hfu": mfu.hfu(flops, flops / 3 * recompute, per_device, peak),
        "peak_memory_gib": peak_memory_gib(device),
        "params": params,
        "flops_per_token": flops,
        "device": _device_name(device),
        "peak_flops": peak,
        "peak_source": peak_source,
        "world_size": env.world_size,
        "zero_stage": zero_stage(ds_config),
        "bf16": bf16,
        "model": {
            k: getattr(m, k)
            for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "dropout")
        },
        "activation_checkpointing": m.activation_checkpointing,
        "micro_batch_size": t.micro_batch_size,
        "grad_accum_steps": t.grad_accum_steps,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads_per_rank": torch.get_num_threads(),
        "torch": torch.__version__,
        "deepspeed": _deepspeed_version(),
    }
    if args.reference:
        result["reference"] = summarise(times[1], tokens_per_step, flops, peak)
        # Each engine step against the reference step right after it: drift cancels in pairs.
        pairs = sorted(r / e for e, r in zip(times[0], times[1]))
        result["vs_reference"] = statistics.median(pairs)
        result["vs_reference_iqr"] = [pairs[len(pairs) // 4], pairs[(3 * len(pairs)) // 4]]
    return result


def _device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from launcher.mfu import _cpu_name

    return f"{_cpu_name()} ({platform.machine()})"


def _deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__


def _headline(r: dict) -> str:
    line = (
        f"{r['world_size']} rank(s) on {r['device']}, ZeRO-{r['zero_stage']}"
        f"{', bf16' if r['bf16'] else ''}: {r['tokens_per_sec']:,.0f} tokens/s "
        f"({r['tokens_per_sec_per_device']:,.0f} per device), step {r['step_ms_median']:.1f} ms "
        f"median / {r['step_ms_p90']:.1f} ms p90, MFU {r['mfu']:.1f}% of "
        f"{r['peak_flops'] / 1e12:,.3f} TFLOP/s"
    )
    if "reference" in r:
        ref = r["reference"]
        line += (
            f"; plain PyTorch {ref['tokens_per_sec_per_device']:,.0f} tokens/s per device, "
            f"MFU {ref['mfu']:.1f}%: engine/reference = {r['vs_reference']:.3f} "
            f"(paired steps, IQR {r['vs_reference_iqr'][0]:.3f}-{r['vs_reference_iqr'][1]:.3f})"
        )
    return line


if __name__ == "__main__":
    run_cli(main)
