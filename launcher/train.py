"""The training loop: a DeepSpeed engine over the GPT, fed from memory-mapped indexed datasets."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data_pipeline.gpt_dataset import BlendedSamples
from launcher import checkpoint
from launcher.config import RunSpec, spec_to_dict
from launcher.distributed import DistEnv
from launcher.ds_config import zero_stage
from launcher.preflight import DataPlan, Resume
from launcher.schedule import global_batch_size, lr_at, rank_sample_indices
from model.gpt import GPT, flops_per_token, param_groups


@dataclass
class TrainState:
    """Everything about progress that a checkpoint must carry besides the engine's tensors."""

    step: int = 0
    """Optimizer steps completed."""
    consumed_samples: int = 0
    """Global training samples read so far: the data position."""


@dataclass
class Batches:
    """One rank's batches: global sample indices -> tokens, the same for any number of ranks."""

    samples: BlendedSamples
    micro_batch_size: int
    grad_accum_steps: int
    dp_size: int
    dp_rank: int
    device: torch.device

    def train(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = rank_sample_indices(
            step,
            micro_step,
            self.micro_batch_size,
            self.grad_accum_steps,
            self.dp_size,
            self.dp_rank,
        )
        return self._load(idx)

    def val(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        # The same val samples at every evaluation, so the curve compares like with like.
        idx = rank_sample_indices(batch, 0, self.micro_batch_size, 1, self.dp_size, self.dp_rank)
        return self._load(idx)

    def _load(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        window = torch.from_numpy(self.samples.batch(idx))
        x, y = window[:, :-1].contiguous(), window[:, 1:].contiguous()
        if self.device.type == "cuda":
            return (
                x.pin_memory().to(self.device, non_blocking=True),
                y.pin_memory().to(self.device, non_blocking=True),
            )
        return x, y


def build_engine(model: GPT, spec: RunSpec, ds_config: dict, device: torch.device) -> Any:
    """Wrap the model in a DeepSpeed engine with the spec's AdamW."""
    import deepspeed

    t = spec.train
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(
        param_groups(model, t.weight_decay), lr=lr_at(0, t), betas=(t.beta1, t.beta2), **fused
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def set_lr(engine: Any, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def all_reduce_mean(value: torch.Tensor) -> float:
    value = value.detach().float().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value.item() / dist.get_world_size()


@torch.no_grad()
def evaluate(engine: Any, batches: Batches, n_batches: int) -> float:
    """Mean val loss over n_batches micro-batches on every rank (all ranks take part: ZeRO-3)."""
    engine.eval()
    total = torch.zeros((), device=batches.device)
    for b in range(n_batches):
        x, y = batches.val(b)
        _, loss = engine(x, y)
        total += loss.float()
    engine.train()
    return all_reduce_mean(total / n_batches)


class MetricsLog:
    """Rank 0's log: one printed line and one `metrics.jsonl` record per log step."""

    def __init__(self, path: Path, resume_step: int, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        self.last_val: float | None = None  # printed on every line once known
        if enabled:
            self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        """Drop records past the resumed step (a crash after the last checkpoint leaves some)."""
        kept = []
        if step > 0 and self.path.exists():
            records = [json.loads(line) for line in self.path.read_text().splitlines() if line]
            kept = [r for r in records if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.last_val = next((r["val_loss"] for r in reversed(kept) if "val_loss" in r), None)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        parts = [f"step {record['step']:>6}"]
        if "loss" in record:
            parts.append(f"loss {record['loss']:.4f}")
        self.last_val = record.get("val_loss", self.last_val)
        if self.last_val is not None:
            parts.append(f"val {self.last_val:.4f}")
        if "lr" in record:
            parts.append(f"lr {record['lr']:.2e}")
        if "tokens_per_sec" in record:
            parts.append(f"{record['tokens_per_sec']:,.0f} tok/s")
            parts.append(f"{record['ms_per_step']:.1f} ms/step")
        print(" | ".join(parts), flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(engine: Any, batches: Batches, step: int, accum: int) -> torch.Tensor:
    """One optimizer step (accum micro-batches); returns this rank's mean loss, on device."""
    total = torch.zeros((), device=batches.device)
    for micro in range(accum):
        x, y = batches.train(step, micro)
        _, loss = engine(x, y)
        engine.backward(loss)
        engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        total += loss.detach().float()
    return total / accum


@dataclass
class RunContext:
    """Runtime values the loop needs beside the spec: nothing here lives in the config."""

    env: DistEnv
    device: torch.device
    ds_config: dict
    data: DataPlan
    resume: Resume | None
    run_id: str


def _checkpoint_meta(spec: RunSpec, state: TrainState, ctx: RunContext, losses: dict) -> dict:
    return {
        "step": state.step,
        "consumed_samples": state.consumed_samples,
        "run_id": ctx.run_id,
        "model": asdict(spec.model),
        "zero_stage": zero_stage(ctx.ds_config),
        "world_size": ctx.env.world_size,
        "bf16": bool(ctx.ds_config.get("bf16", {}).get("enabled")),
        **losses,
    }


def train(spec: RunSpec, ctx: RunContext) -> tuple[GPT, Any]:
    """Train to spec.train.max_steps, evaluating, logging and checkpointing on the way."""
    t, env = spec.train, ctx.env
    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = GPT(spec.model)
    engine = build_engine(model, spec, ctx.ds_config, ctx.device)
    torch.manual_seed(t.seed + 1000 * env.rank)  # distinct dropout masks per rank
    state = TrainState()
    if ctx.resume is not None:
        client = checkpoint.load(engine, ctx.resume.tag_dir, ctx.resume.universal)
        state = TrainState(client["step"], client["consumed_samples"])
        if ctx.resume.universal:  # no per-rank RNG to restore at a new world size
            torch.manual_seed(t.seed + 1000 * env.rank + state.step)
        if env.is_main:
            print(f"resumed from {ctx.resume.tag_dir} at step {state.step}", flush=True)
            if state.step >= t.max_steps:
                print(
                    f"step {state.step} >= train.max_steps={t.max_steps}: nothing to train; "
                    "raise train.max_steps to train further",
                    flush=True,
                )
    batches, val_batches = _batches(spec, ctx)
    log = MetricsLog(spec.run_dir / "metrics.jsonl", state.step, env.is_main)
    _loop(engine, spec, ctx, state, batches, val_batches, log)
    return model, engine


def _batches(spec: RunSpec, ctx: RunContext) -> tuple[Batches, Batches | None]:
    """Index the samples the whole run will read (local rank 0 builds, the others wait)."""
    t, env = spec.train, ctx.env
    samples_per_step = global_batch_size(t.micro_batch_size, t.grad_accum_steps, env.world_size)
    builder = env.local_rank == 0
    ctx.data.train.prepare(t.max_steps * samples_per_step, is_builder=builder)
    layout = (t.micro_batch_size, t.grad_accum_steps, env.world_size, env.rank, ctx.device)
    batches = Batches(ctx.data.train, *layout)
    if ctx.data.val is None or not spec.eval.interval:
        return batches, None
    ctx.data.val.prepare(spec.eval.batches * t.micro_batch_size * env.world_size, builder)
    return batches, Batches(ctx.data.val, *layout)


def data_progress(samples: BlendedSamples, consumed_samples: int) -> dict[str, float]:
    """Epoch (single source) and per-source tokens and epochs, for the metrics log."""
    progress = samples.progress(consumed_samples)
    record = {}
    for name, p in progress.items():
        record[f"data/{name}/tokens"] = p["tokens"]
        record[f"data/{name}/epoch"] = p["epoch"]
    if len(progress) == 1:
        record["epoch"] = next(iter(progress.values()))["epoch"]
    return record


class Window:
    """Loss and wall time between two log lines; eval and checkpoint time stays out of it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        _sync(self.device)
        self.loss, self.steps = torch.zeros((), device=self.device), 0
        self.start, self.excluded = time.perf_counter(), 0.0

    def exclude(self, seconds: float) -> None:
        self.excluded += seconds

    def elapsed(self) -> float:
        _sync(self.device)
        return time.perf_counter() - self.start - self.excluded


def _loop(
    engine: Any,
    spec: RunSpec,
    ctx: RunContext,
    state: TrainState,
    batches: Batches,
    val_batches: Batches | None,
    log: MetricsLog,
) -> None:
    t = spec.train
    samples_per_step = global_batch_size(t.micro_batch_size, t.grad_accum_steps, ctx.env.world_size)
    window, losses = Window(ctx.device), {}
    while state.step < t.max_steps:
        set_lr(engine, lr_at(state.step, t))
        window.loss += train_step(engine, batches, state.step, t.grad_accum_steps)
        window.steps += 1
        state.step += 1
        state.consumed_samples += samples_per_step
        last = state.step == t.max_steps
        record: dict[str, float] = {}
        if val_batches and (state.step % spec.eval.interval == 0 or last):
            started = time.perf_counter()
            losses["val_step"] = state.step
            record["val_loss"] = losses["val_loss"] = evaluate(
                engine, val_batches, spec.eval.batches
            )
            window.exclude(time.perf_counter() - started)
        if state.step % t.log_interval == 0 or last:
            elapsed = window.elapsed()
            losses["train_loss"] = all_reduce_mean(window.loss / window.steps)
            tokens = window.steps * samples_per_step * spec.model.block_size
            record |= {
                "loss": losses["train_loss"],
                "lr": lr_at(state.step - 1, t),
                "tokens_per_sec": tokens / elapsed,
                "ms_per_step": 1000 * elapsed / window.steps,
                "consumed_samples": state.consumed_samples,
                **data_progress(ctx.data.train, state.consumed_samples),
            }
        if record:
            log.write({"step": state.step, **record})
        if (spec.checkpoint.interval and state.step % spec.checkpoint.interval == 0) or last:
            started = time.perf_counter()
            client = {
                "step": state.step,
                "consumed_samples": state.consumed_samples,
                "run_id": ctx.run_id,
                "spec": spec_to_dict(spec),
            }
            checkpoint.save(
                engine,
                spec.run_dir,
                _checkpoint_meta(spec, state, ctx, losses),
                client,
                spec.checkpoint.keep_last,
            )
            window.exclude(time.perf_counter() - started)
        if "loss" in record:
            window.reset()


def model_flops_per_token(model: GPT) -> int:
    return flops_per_token(model.config, model.num_params(non_embedding=True))
