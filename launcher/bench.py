"""Throughput of the real training step: tokens/s, MFU, step times and memory, on synthetic tokens.

    zerolaunch bench --ds_config ds_configs/zero0.json --set model.vocab_size=65
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

`--sampling SHAPE` times generation instead (launcher/evaluation/sampling_bench.py): tokens/s of
one process generating --new-tokens greedily after a random prompt, without and with the KV
cache, for a random-weight gpt2-124m or llama-124m (or the spec's model: `spec`):

    zerolaunch bench --sampling gpt2-124m
    zerolaunch bench --sampling llama-124m --new-tokens 300 --batch 4 --dtype bf16
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (deepspeed launcher/bench.py): import the project
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import argparse
import contextlib
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from launcher.config.arguments import add_spec_arguments, config_paths
from launcher.config.paths import DS_CONFIGS
from launcher.errors import UserError, run_cli

if TYPE_CHECKING:  # imported where used: --help and argument errors stay fast
    import torch

    from launcher.config.ds_config import EngineSettings
    from launcher.config.spec import RunSpec, TrainConfig
    from launcher.runtime.distributed import DistEnv
    from model.gpt import GPT, GPTConfig

DEFAULT_VOCAB = 50304
"""GPT-2's 50,257 tokens padded to a multiple of 64: the vocabulary when the spec leaves it null."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="zerolaunch bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_spec_arguments(p, DS_CONFIGS / "zero0.json")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument(
        "--reference", action="store_true", help="also time a plain-PyTorch step of the model"
    )
    p.add_argument(
        "--saves",
        type=Path,
        default=None,
        metavar="DIR",
        help="also time a checkpoint save in DIR: synchronous vs asynchronous (training time "
        "lost), and against the disk's own write speed",
    )
    p.add_argument(
        "--save-steps", type=int, default=10, help="steps timed around each save (default 10)"
    )
    _add_sampling_arguments(p)
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON to this file")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise UserError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps}, {args.warmup}")
    counts = {"--new-tokens": args.new_tokens, "--prompt-tokens": args.prompt_tokens,
              "--batch": args.batch, "--repeats": args.repeats}  # fmt: skip
    wrong = [f"{flag} {value}" for flag, value in counts.items() if value < 1]
    if wrong:
        raise UserError(f"{', '.join(wrong)}: each must be >= 1")
    return args


def _add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    from launcher.evaluation.sampling_bench import DTYPES, SHAPES

    p.add_argument(
        "--sampling",
        choices=list(SHAPES),
        default=None,
        help="time generation instead of training: tokens/s without and with the KV cache, "
        "for a random-weight model of this shape (spec: the spec's; --set model.* applies)",
    )
    p.add_argument(
        "--new-tokens", type=int, default=300, help="--sampling: tokens generated (default 300)"
    )
    p.add_argument(
        "--prompt-tokens", type=int, default=10, help="--sampling: prompt length (default 10)"
    )
    p.add_argument("--batch", type=int, default=1, help="--sampling: sequences at once (default 1)")
    p.add_argument(
        "--repeats", type=int, default=1, help="--sampling: timed pairs, median (default 1)"
    )
    p.add_argument(
        "--dtype", choices=DTYPES, default="fp32", help="--sampling: weights (default fp32)"
    )


@dataclass
class SyntheticBatches:
    """Random tokens already on the device: the loader's interface, none of its cost."""

    batches: list[tuple[torch.Tensor, torch.Tensor]]
    accum: int
    device: torch.device

    @classmethod
    def make(
        cls, vocab: int, micro: int, block: int, accum: int, device: torch.device, seed: int
    ) -> SyntheticBatches:
        import torch

        gen = torch.Generator().manual_seed(seed)
        batches = []
        for _ in range(2 * accum):  # a few distinct batches, reused round-robin
            tokens = torch.randint(0, vocab, (micro, block + 1), generator=gen)
            x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
            batches.append((x.to(device), y.to(device)))
        return cls(batches, accum, device)

    def train(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches[(step * self.accum + micro_step) % len(self.batches)]


def timed(
    steps: list[Callable[[int], Any]], n: int, warmup: int, device: torch.device
) -> list[list[float]]:
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


def reference_step(
    model: GPT, train: TrainConfig, batches: SyntheticBatches, precision: str
) -> Callable[[int], None]:
    """One optimizer step of plain PyTorch: what a nanoGPT-style loop does with this model
    (autocast in bf16; autocast and a gradient scaler in fp16; compiled when the engine is)."""
    import torch

    from launcher.training.schedule import lr_at
    from model.gpt import param_groups

    device = next(model.parameters()).device
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(
        param_groups(model, train.weight_decay),
        lr=lr_at(0, train),
        betas=(train.beta1, train.beta2),
        **fused,
    )
    if train.compile:  # the same compile setting as the engine's model
        model.compile()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step(i: int) -> None:
        for micro in range(train.grad_accum_steps):
            x, y = batches.train(i, micro)
            with autocast:
                _, loss = model(x, y)
            scaler.scale(loss / train.grad_accum_steps).backward()
        if train.grad_clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    return step


def _spec(spec_path: Path | None, overrides: list[str]) -> RunSpec:
    from dataclasses import replace

    from launcher.config.load import load_spec

    spec = load_spec(spec_path, overrides)
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
    if args.sampling is not None:
        return sampling_main(args)
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor", category=FutureWarning)
    from launcher.runtime.distributed import detect_env, device_type, exit_together
    from launcher.training.plan import engine_settings

    spec_path, ds_path = config_paths(args)
    spec = _spec(spec_path, args.overrides)
    env = detect_env()
    engine, _ = engine_settings(
        spec, spec_path, ds_path, env.world_size, device_type(), tuple(args.overrides)
    )
    result = run_benchmark(spec, engine, env, args)
    if env.is_main:
        _report(result, _headline(result), args)
    return exit_together(0)


def _report(result: dict, headline: str, args: argparse.Namespace) -> None:
    """The headline and the JSON object on stdout (only the JSON with --json), and --out."""
    text = json.dumps(result, indent=1)
    print(text if args.json else f"{headline}\n{text}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


def sampling_main(args: argparse.Namespace) -> int:
    """--sampling: generation without and with the KV cache, in this one process."""
    import torch

    from launcher.evaluation.sampling_bench import SHAPES, headline, measure_sampling
    from launcher.runtime.distributed import detect_env, select_device

    env = detect_env()
    if env.world_size > 1:
        raise UserError(
            "--sampling times one process: run zerolaunch bench --sampling on its own, not "
            "under deepspeed or torchrun"
        )
    spec_path, _ = config_paths(args)
    spec = _spec(spec_path, [*SHAPES[args.sampling], *args.overrides])
    device = select_device(env)
    shape = spec.name if args.sampling == "spec" else args.sampling
    result = {"shape": shape} | measure_sampling(
        spec.model,
        device,
        args.dtype,
        args.prompt_tokens,
        args.new_tokens,
        args.batch,
        args.repeats,
        spec.train.seed,
    )
    result |= {"device": _device_name(device), "threads": torch.get_num_threads()}
    result |= {"torch": torch.__version__}
    _report(result, headline(shape, result, result["device"]), args)
    return 0


def run_benchmark(
    spec: RunSpec, engine_cfg: EngineSettings, env: DistEnv, args: argparse.Namespace
) -> dict:
    """Time the engine's step (and the plain-PyTorch reference): the benchmark's JSON object."""
    import torch

    from launcher.monitoring import mfu
    from launcher.monitoring.metrics import peak_memory_gib
    from launcher.runtime.distributed import init_process_group, select_device
    from launcher.training.engine import build_engine
    from launcher.training.step import train_step
    from model.gpt import GPT, flops_per_token

    device = select_device(env)
    init_process_group()
    m, t = spec.model, spec.train
    batches = SyntheticBatches.make(
        m.vocab_size, t.micro_batch_size, m.block_size, t.grad_accum_steps, device, t.seed
    )
    torch.manual_seed(t.seed)
    with device:  # built in place: a 1.3B model initialises in a second on a GPU
        model = GPT(m)
    engine = build_engine(model, t, engine_cfg)
    steps = [lambda i: train_step(engine, batches, i, t.grad_accum_steps)]
    if args.reference:  # same initial weights, its own optimizer state
        torch.manual_seed(t.seed)
        with device:
            reference = GPT(m)
        steps.append(reference_step(reference, t, batches, engine_cfg.precision))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = timed(steps, args.steps, args.warmup, device)
    found = mfu.device_peak(device, engine_cfg.half, spec.monitor.peak_flops)
    peak, peak_source = found.flops, found.source
    figures = Figures(
        flops_per_token(m), t.micro_batch_size * t.grad_accum_steps * m.block_size, peak
    )
    result = figures.measured(times[0], env.world_size, m)
    result["peak_memory_gib"] = peak_memory_gib(device)
    result |= {"device": _device_name(device), "peak_source": peak_source}
    result |= _setup(spec, engine_cfg, env, args)
    if args.reference:
        result |= figures.against_reference(times[0], times[1])
    if args.saves is not None:
        from dataclasses import asdict

        from launcher.checkpoints.save_bench import measure_saves

        result["saves"] = measure_saves(engine, steps[0], args.saves, args.save_steps, asdict(m))
    engine.destroy()  # DeepSpeed's hooks would keep it (and the device memory) past this call
    return result


@dataclass(frozen=True)
class Figures:
    """Step times -> throughput figures for one model and device."""

    flops_per_token: int
    tokens_per_step: int
    """Tokens one rank processes per optimizer step."""
    peak: float
    """Peak FLOP/s of one device."""

    def summary(self, times: list[float]) -> dict:
        from launcher.monitoring import mfu

        median = statistics.median(times)
        per_device = self.tokens_per_step / median
        return {
            "tokens_per_sec_per_device": per_device,
            "step_ms_median": 1000 * median,
            "step_ms_p90": 1000 * sorted(times)[min(len(times) - 1, int(0.9 * len(times)))],
            "mfu": mfu.mfu(self.flops_per_token, per_device, self.peak),
        }

    def measured(self, times: list[float], world_size: int, model: GPTConfig) -> dict:
        from launcher.monitoring import mfu
        from model.gpt import count_params, recompute_fraction

        summary = self.summary(times)
        per_device = summary["tokens_per_sec_per_device"]
        recomputed = self.flops_per_token / 3 * recompute_fraction(model)
        return {
            "tokens_per_sec": per_device * world_size,
            **summary,
            "hfu": mfu.hfu(self.flops_per_token, recomputed, per_device, self.peak),
            "params": count_params(model),
            "flops_per_token": self.flops_per_token,
            "peak_flops": self.peak,
        }

    def against_reference(self, engine: list[float], reference: list[float]) -> dict:
        # Each engine step against the reference step right after it: drift cancels in pairs.
        pairs = sorted(r / e for e, r in zip(engine, reference))
        return {
            "reference": self.summary(reference),
            "vs_reference": statistics.median(pairs),
            "vs_reference_iqr": [pairs[len(pairs) // 4], pairs[(3 * len(pairs)) // 4]],
        }


def _setup(
    spec: RunSpec, engine_cfg: EngineSettings, env: DistEnv, args: argparse.Namespace
) -> dict:
    """What was measured: layout, precision, model shape, batch, versions."""
    import torch

    m, t = spec.model, spec.train
    return {
        "world_size": env.world_size,
        "zero_stage": engine_cfg.zero_stage,
        "precision": engine_cfg.precision,
        "bf16": engine_cfg.precision == "bf16",
        "model": {
            k: getattr(m, k)
            for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "dropout")
        },
        "activation_checkpointing": m.activation_checkpointing,
        "compile": t.compile,
        "micro_batch_size": t.micro_batch_size,
        "grad_accum_steps": t.grad_accum_steps,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads_per_rank": torch.get_num_threads(),
        "torch": torch.__version__,
        "deepspeed": _deepspeed_version(),
    }


def _device_name(device: torch.device) -> str:
    import torch

    from launcher.monitoring.mfu import cpu_name

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({platform.machine()})"


def _deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__


def _headline(r: dict) -> str:
    precision = "" if r["precision"] == "fp32" else f", {r['precision']}"
    line = (
        f"{r['world_size']} rank(s) on {r['device']}, ZeRO-{r['zero_stage']}{precision}: "
        f"{r['tokens_per_sec']:,.0f} tokens/s "
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
    if "saves" in r:
        s = r["saves"]
        line += (
            f"\ncheckpoint of {s['checkpoint_bytes'] / 2**30:.2f} GiB: synchronous save "
            f"{s['sync_save_s']:.2f} s ({s['sync_lost_s']:.2f} s of training lost), "
            f"{s['sync_save_bytes_per_s'] / 2**20:,.0f} MiB/s = {s['sync_vs_disk']:.2f}x the "
            f"disk's {s['disk_bytes_per_s'] / 2**20:,.0f} MiB/s; asynchronous: training waited "
            f"{s['async_copy_s']:.2f} s for the copy, {s['async_lost_s']:.2f} s lost in all = "
            f"{100 * (s['async_lost_vs_sync'] or 0):.0f}% of the synchronous loss"
        )
    return line


if __name__ == "__main__":
    run_cli(main)
