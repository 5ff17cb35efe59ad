"""The training loop: a DeepSpeed engine over the GPT, fed from memory-mapped indexed datasets,
evaluating, logging, checkpointing, and stopping cleanly on a signal or a time limit."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

from launcher.checkpoints import store
from launcher.checkpoints.contract import CheckpointMeta
from launcher.checkpoints.universal import tensor_parallel_info
from launcher.config.load import spec_to_dict
from launcher.config.spec import EvalConfig
from launcher.errors import EXIT_DIVERGED, EXIT_REQUEUE, EXIT_USER_ERROR
from launcher.evaluation.sampling import whole_logits
from launcher.evaluation.tasks import score
from launcher.evaluation.val_loss import evaluate
from launcher.monitoring import mfu
from launcher.monitoring.metrics import (
    Reporter,
    Throughput,
    data_metrics,
    task_metrics,
    val_set_metrics,
)
from launcher.monitoring.overfit import OverfitDetector
from launcher.monitoring.sinks import MetricsLog, Sinks, WandbSink, file_sinks, wandb_settings
from launcher.monitoring.timing import StepTimer
from launcher.runtime.stopping import TIME_LIMIT, Deadline, Stopper
from launcher.runtime.topology import ParallelGroups
from launcher.training import sequence_parallel
from launcher.training.build import build_measured
from launcher.training.divergence import Diverged, DivergenceWatch, advice, decode
from launcher.training.engine import (
    build_engine,
    repair_universal_load,
    set_lr,
)
from launcher.training.memory import ModelBuild, describe_build, engine_state_bytes
from launcher.training.pipeline import (
    pipeline_logits,
    pipeline_step,
    pipeline_val_loss,
)
from launcher.training.plan import RunPlan
from launcher.training.profile import StepProfiler
from launcher.training.schedule import lr_at
from launcher.training.step import Batches, train_step
from model.gpt import count_params, flops_per_token, recompute_fraction


@dataclass
class TrainState:
    """Where training stands: what a checkpoint records of progress."""

    step: int = 0
    """Optimizer steps completed."""
    consumed_samples: int = 0
    """Global training samples read so far: the data position."""
    saved_step: int = 0
    """Step of the newest checkpoint (the resumed one at first)."""
    start_step: int = 0
    """The step this launch started from."""
    stopped: str | None = None
    """Why the run stopped before max_steps on a signal or time limit (None: it did not)."""
    error: str | None = None
    """Why the run failed (divergence, a time limit too short to make progress), if it did."""
    exit_code: int = 0
    """What the process exits with: 0, EXIT_REQUEUE, EXIT_DIVERGED or EXIT_USER_ERROR."""


@dataclass
class Session:
    """The live parts of one training launch."""

    plan: RunPlan
    device: torch.device
    engine: Any
    batches: Batches
    val_batches: dict[str, Batches]
    """One rank's batches of each val set (empty: no evaluation)."""
    reporter: Reporter
    stopper: Stopper
    watch: DivergenceWatch
    profiler: StepProfiler
    groups: ParallelGroups | None = None
    """The layout's process groups (None without model parallelism)."""
    writer: Any = None
    """The engine's AsyncWriter when checkpoints are written asynchronously."""
    pending: store.Pending | None = None
    """A save whose tag is not complete yet (asynchronous: being written)."""
    pending_since: int = 0
    """The stopper's poll count when `pending` started."""


def train(plan: RunPlan, device: torch.device, started_at: float) -> tuple[Any, TrainState]:
    """Train to spec.train.max_steps (or an early stop, a signal, a time limit); returns the
    engine and where training ended. `started_at` is the process start on perf_counter's clock."""
    spec, env = plan.spec, plan.env
    groups = ParallelGroups(plan.layout, env.rank) if plan.layout.model_parallel > 1 else None
    model, build = build_measured(plan, groups, device)  # the same weights whatever the layout
    if env.is_main:
        print(describe_build(build, plan.spec.model), flush=True)
    # A pipeline engine builds its own groups (pipe x data x model, the same ranks as ours).
    mpu = groups if plan.layout.pipeline == 1 else None
    engine = build_engine(model, spec.train, plan.engine, spec.checkpoint.async_save, mpu)
    # Distinct dropout masks per data-parallel rank; the tensor-parallel ranks of a replica
    # share theirs (their activations outside the split matrices are one and the same).
    torch.manual_seed(spec.train.seed + 1000 * plan.coords["data"])
    state = _resume(plan, engine)
    batches, val_batches = _batches(plan, device)
    reporter = _reporter(plan, device, started_at, state.step)
    watch = DivergenceWatch(device, watch_grad_norm=plan.engine.precision != "fp16")
    stopper = _stopper(plan, device, started_at)
    profiler = StepProfiler(spec.train.profile, spec.run_dir, env.rank, device, state.step)
    session = Session(
        plan, device, engine, batches, val_batches, reporter, stopper, watch, profiler, groups
    )
    if spec.checkpoint.async_save:
        session.writer = engine.checkpoint_engine
    try:
        _loop(session, state)
        _drain(session)  # the run ends once its last save is complete
    except Diverged as e:
        _drain(session)  # a save started before holds a state checked finite: it completes
        latest = store.read_pointer(store.checkpoint_dir(spec.run_dir), store.LATEST)
        state.error = advice(e, reporter.last_finite, latest, spec.train.grad_clip)
        state.exit_code = EXIT_DIVERGED
    finally:
        summary = profiler.close()
        if summary is not None:
            print(summary, flush=True)
        reporter.finish()
    write_memory_report(engine, plan, build)
    return engine, state


def _resume(plan: RunPlan, engine: Any) -> TrainState:
    resume, t = plan.resume, plan.spec.train
    if resume is None:
        return TrainState()
    store.load(engine, resume.tag_dir, resume.universal)
    if resume.universal:
        repair_universal_load(engine, t)
    step = resume.meta.step
    state = TrainState(step, resume.meta.consumed_samples, saved_step=step, start_step=step)
    if resume.universal:  # no per-rank RNG to restore at a new world size
        torch.manual_seed(t.seed + 1000 * plan.coords["data"] + state.step)
    if plan.env.is_main:
        print(f"resumed from {resume.tag_dir} at step {state.step}", flush=True)
        if state.step >= t.max_steps:
            print(
                f"step {state.step} >= train.max_steps={t.max_steps}: nothing to train; "
                "raise train.max_steps to train further",
                flush=True,
            )
    return state


def _reporter(plan: RunPlan, device: torch.device, started_at: float, step: int) -> Reporter:
    spec, env = plan.spec, plan.env
    saved = plan.resume.meta.monitor if plan.resume else {}
    detector = OverfitDetector.resume(spec.eval, saved)
    peak, sinks = mfu.Peak(0.0, "", measured=False), None
    if env.is_main:  # a CPU peak is measured: once, by rank 0
        peak = mfu.device_peak(device, plan.engine.half, spec.monitor.peak_flops)
        print(f"MFU against {peak.flops / 1e12:,.3f} TFLOP/s per device: {peak.source}", flush=True)
        sinks = _sinks(plan, step)
    throughput = Throughput(
        tokens_per_step=plan.engine.train_batch_size * spec.model.block_size,
        block_size=spec.model.block_size,
        world_size=env.world_size,
        flops_per_token=flops_per_token(spec.model),
        peak_flops=peak.flops,
        recompute_fraction=recompute_fraction(spec.model),
        remeasure_peak=(lambda: peak.remeasured(device, plan.engine.half).flops)
        if peak.measured
        else None,
    )
    # A pipeline interleaves forward and backward across micro-batches: timed whole.
    timer = StepTimer(device, spec.monitor.detailed_timing and plan.layout.pipeline == 1)
    return Reporter(throughput, timer, detector, sinks, started_at)


def _sinks(plan: RunPlan, resume_step: int) -> Sinks:
    """metrics.jsonl, wandb, and the TensorBoard and CSV files the spec or the DeepSpeed JSON's
    `tensorboard` / `csv_monitor` sections turn on; its `wandb` section names the run's project,
    group and team (engine.py keeps the three sections from DeepSpeed)."""
    spec, ds_config = plan.spec, plan.engine.ds_config
    log = MetricsLog(spec.run_dir / "metrics.jsonl", resume_step)
    # Steps logged past the checkpoint (a crash): wandb rewinds the run to it, else goes on.
    rewind_to = resume_step if resume_step > 0 and log.dropped else None
    config = {"spec": spec_to_dict(spec), "ds_config": ds_config}
    settings = wandb_settings(spec.monitor.wandb, ds_config.get("wandb"))
    wandb = WandbSink(settings, spec.name, spec.run_dir, plan.run_id, config, rewind_to)
    files = file_sinks(spec.monitor, ds_config, spec.run_dir, resume_step)
    return Sinks(log, wandb, files)


def _stopper(plan: RunPlan, device: torch.device, started_at: float) -> Stopper:
    main = plan.env.is_main  # rank 0 alone asks Slurm and watches the stop file
    deadline = Deadline.after(
        plan.spec.train.time_limit_s,
        started_wall=time.time() - (time.perf_counter() - started_at),
        slurm_job_id=os.environ.get("SLURM_JOB_ID") if main else None,
    )
    return Stopper(
        device,
        deadline,
        checkpoint_bytes=checkpoint_bytes(plan),
        stop_file=os.environ.get("ZEROLAUNCH_STOP_FILE") if main else None,
    )


def checkpoint_bytes(plan: RunPlan) -> int:
    """About what a checkpoint of this run takes on disk, before one has been saved: the
    parameters (written once per tensor-parallel rank, or a shard per rank at ZeRO-3) and every
    rank's optimizer partition (offloaded states included)."""
    est, world = plan.memory, plan.env.world_size
    # Written once per tensor-parallel rank (each its share), or by every rank at ZeRO-3.
    params = est.params * (world if plan.engine.zero_stage >= 3 else plan.layout.tensor)
    return int(params + (est.optimizer + est.cpu) * world)


def _batches(plan: RunPlan, device: torch.device) -> tuple[Batches, dict[str, Batches]]:
    """Index the samples the whole run will read (local rank 0 builds, the others wait)."""
    spec, env, engine = plan.spec, plan.env, plan.engine
    builder = env.local_rank == 0
    plan.data.train.prepare(spec.train.max_steps * engine.train_batch_size, is_builder=builder)
    dp_size, dp_rank = plan.layout.data, plan.coords["data"]
    layout = (engine.micro_batch_size, engine.grad_accum_steps, dp_size, dp_rank, device,
              plan.layout.sequence, plan.coords["sequence"])  # fmt: skip
    batches = Batches(plan.data.train, *layout)
    if not spec.eval.interval:
        return batches, {}
    val_batches = {}
    for name, samples in plan.data.val_sets.items():
        samples.prepare(spec.eval.batches * engine.micro_batch_size * dp_size, builder)
        val_batches[name] = Batches(samples, *layout)
    return batches, val_batches


def _loop(s: Session, state: TrainState) -> None:
    spec, t = s.plan.spec, s.plan.spec.train
    if state.step < t.max_steps and not s.stopper.room_to_start():
        _stop(s, state, TIME_LIMIT)
        return
    while state.step < t.max_steps:
        # Every rank, every step boundary: the same answer everywhere.
        reason = s.stopper.poll(s.watch.encoded, busy=s.writer is not None and s.writer.busy())
        if s.pending is not None and s.stopper.polls >= s.pending_since + 2 and not s.stopper.busy:
            _complete(s)  # every rank's writer had drained at the last boundary: same on all
        if s.stopper.diverged:
            raise Diverged(decode(s.stopper.diverged), "the loss or gradient norm is not finite")
        if reason is not None:
            _stop(s, state, reason)
            return
        set_lr(s.engine, lr_at(state.step, t))
        s.profiler.step_started(state.step + 1)
        s.reporter.step_started()
        if s.plan.layout.pipeline > 1:
            loss = pipeline_step(
                s.engine, s.batches, state.step, t.grad_accum_steps, s.reporter.timer
            )
        else:
            loss = train_step(
                s.engine,
                s.batches,
                state.step,
                t.grad_accum_steps,
                s.reporter.timer,
                sequence_parallel.backward_scale(s.plan.layout.sequence, s.plan.engine.zero_stage),
            )
        s.reporter.step_done(loss)
        state.step += 1
        s.profiler.step_done(state.step)
        s.watch.observe(state.step, loss.mean, s.engine.get_global_grad_norm())
        state.consumed_samples += s.plan.engine.train_batch_size
        last = state.step == t.max_steps
        record = _record(s, state, last)
        s.reporter.write(state.step, record)
        if not math.isfinite(record.get("Loss/val", 0.0)):  # the same value on every rank
            raise Diverged(state.step, f"the val loss is {record['Loss/val']}")
        stop = spec.eval.early_stop and s.reporter.detector.fired_at == state.step
        interval = spec.checkpoint.interval
        if (interval and state.step % interval == 0) or last or stop:
            _save(s, state)
        if stop:
            _drain(s)
            if s.plan.env.is_main:
                print(
                    f"early stop at step {state.step} (eval.early_stop): checkpoint saved",
                    flush=True,
                )
            return


def _record(s: Session, state: TrainState, last: bool) -> dict:
    """The metrics of this step: train metrics at log steps, val at evaluation steps,
    downstream tasks at task steps; every record carries the tokens trained so far."""
    spec, step = s.plan.spec, state.step
    record: dict[str, float] = {}
    if step % spec.train.log_interval == 0 or last:
        record |= s.reporter.train_record(step, lr_at(step - 1, spec.train))
        record |= data_metrics(s.plan.data.train, state.consumed_samples)
    if s.val_batches and (step % spec.eval.interval == 0 or last):
        record |= _val_record(s, step)
    if s.plan.data.tasks and (last or _every(step, tasks_interval(spec.eval))):
        record |= _task_record(s)
    if record:
        record["Training/tokens"] = state.consumed_samples * spec.model.block_size
    return record


def _every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


def tasks_interval(e: EvalConfig) -> int:
    """Steps between downstream-task evaluations: eval.tasks_interval, else eval.interval."""
    return e.tasks_interval if e.tasks_interval is not None else e.interval


def _val_record(s: Session, step: int) -> dict:
    """Each val set's loss (Loss/val/<name> when eval.sets names them); the monitored one as
    Loss/val, which the overfitting detector and `best` follow."""
    spec, data = s.plan.spec, s.plan.data
    val_loss = pipeline_val_loss if s.plan.layout.pipeline > 1 else evaluate
    losses = {name: val_loss(s.engine, b, spec.eval.batches) for name, b in s.val_batches.items()}
    record = s.reporter.val_record(step, losses[data.monitor])
    if spec.eval.sets:
        record |= val_set_metrics(losses)
    return record


def _task_record(s: Session) -> dict:
    """Every downstream task scored by every data-parallel replica's share of its examples (the
    tensor-parallel ranks of a replica score the same ones together): Eval/<task>/<metric>."""
    plan, engine = s.plan, s.engine
    share = (plan.coords["data"], plan.layout.data, s.groups.groups["data"] if s.groups else None)
    if plan.layout.pipeline > 1:  # every stage of a replica runs its share's forwards together
        return _scores(s, lambda x: pipeline_logits(engine, x), share)
    forward = lambda x: engine(x)[0]  # noqa: E731 - logits of every position
    engine.eval()
    with whole_logits(engine.module), sequence_parallel.whole_sequences(engine.module):
        record = _scores(s, forward, share)
    engine.train()
    return record


def _scores(s: Session, forward: Any, share: tuple) -> dict:
    record = {}
    for task in s.plan.data.tasks:
        scores = score(task, forward, s.plan.engine.micro_batch_size, s.device, *share)
        record |= task_metrics(task.name, scores)
    return record


def _stop(s: Session, state: TrainState, reason: str) -> None:
    """A signal or the time limit: save (unless this step is saved) and say how to go on. A
    time limit that left no room for a single step is an error: a requeue would loop."""
    plan, progress = s.plan, state.step > state.start_step
    if reason == TIME_LIMIT and not progress:
        state.error, state.exit_code = s.stopper.too_short(s.reporter.started_at), EXIT_USER_ERROR
        return
    saved_now = state.step > state.saved_step
    if saved_now:
        _save(s, state)
    _drain(s)  # "saved" is said once the tag is complete
    state.stopped, state.exit_code = reason, EXIT_REQUEUE
    if not plan.env.is_main:
        return
    tag = store.checkpoint_dir(plan.spec.run_dir) / store.tag_for(state.step)
    if state.step == 0 or store.verify(tag) is not None:
        kept = "no step was trained, so there is no checkpoint; the same command starts again"
    else:
        kept = f"checkpoint {tag.name} {'saved' if saved_now else 'kept'}; the same command "
        kept += "resumes from it"
    print(
        f"stopping at step {state.step} of {plan.spec.train.max_steps}: {reason}; {kept} "
        f"(exit code {EXIT_REQUEUE})",
        flush=True,
    )


def _save(s: Session, state: TrainState) -> None:
    """Every rank: refuse a non-finite state (Diverged), then write the tag."""
    s.watch.check_now(s.engine.module, state.step)
    _drain(s)  # one save at a time
    started = time.perf_counter()
    plan = s.plan
    losses = s.reporter.losses
    meta = CheckpointMeta(
        step=state.step,
        consumed_samples=state.consumed_samples,
        run_id=plan.run_id,
        model=asdict(plan.spec.model),
        zero_stage=plan.engine.zero_stage,
        world_size=plan.env.world_size,
        precision=plan.engine.precision,
        train_loss=losses.get("train_loss"),
        val_loss=losses.get("val_loss"),
        val_step=losses.get("val_step"),
        monitor=s.reporter.detector.state(),
        tokenizer=plan.data.tokenizer_identity,
        parallel=_parallel(plan),
    )
    expected = store.last_checkpoint_bytes(plan.spec.run_dir) or checkpoint_bytes(plan)
    keep = plan.spec.checkpoint.keep_last
    # How each parameter is (or would be) split: a later universal conversion can then resume
    # the tag at any tensor-parallel size.
    info = tensor_parallel_info(plan.spec.model, pipelined=plan.layout.pipeline > 1)
    s.pending = store.save(s.engine, plan.spec.run_dir, meta, keep, expected, s.writer, info)
    s.pending.call_s, s.pending_since = time.perf_counter() - started, s.stopper.polls
    state.saved_step = state.step
    if s.writer is None:
        _complete(s)


def _parallel(plan: RunPlan) -> dict[str, int]:
    """The layout a checkpoint records (with it, how its parameters are split for
    ds_to_universal: tags without it predate both)."""
    layout = plan.layout
    return {"tensor": layout.tensor, "pipeline": layout.pipeline, "sequence": layout.sequence}


def _complete(s: Session) -> None:
    """Every rank: finish the pending save (waiting for this rank's writer, if asynchronous).
    The time-limit check learns what a save costs when waited for: the call, the writing (the
    writer thread's own time, not the steps that ran beside it) and the completion."""
    started = time.perf_counter()
    store.finish(s.pending, s.writer)
    written = s.writer.written_s if s.writer is not None else 0.0
    s.stopper.saved(s.pending.call_s + written + time.perf_counter() - started)
    s.pending = None


def _drain(s: Session) -> None:
    """Complete a pending asynchronous save now (before the next one, a stop, the end)."""
    if s.pending is not None:
        _complete(s)


def write_memory_report(engine: Any, plan: RunPlan, build: ModelBuild) -> None:
    """out_dir/memory.json: what each rank's engine holds, beside the pre-flight estimate, and
    how building each rank's model went."""
    if not engine.optimizer or not getattr(engine.optimizer, "state", True):
        return
    mine = (engine_state_bytes(engine), asdict(build))
    per_rank: list[Any] = [None] * plan.env.world_size
    dist.all_gather_object(per_rank, mine)
    if plan.env.is_main:
        est = plan.memory
        report = {
            "world_size": plan.env.world_size,
            "zero_stage": plan.engine.zero_stage,
            "model_build_per_rank": [b for _, b in per_rank],
            "whole_model_fp32_bytes": 4 * count_params(plan.spec.model),
            "measured_bytes_per_rank": [held for held, _ in per_rank],
            "estimated_bytes_per_rank": {
                "params": est.params,
                "grads": est.grads,
                "step_grads": est.step_grads,
                "optimizer": est.optimizer,
                "cpu": est.cpu,
            },
        }
        (plan.spec.run_dir / "memory.json").write_text(json.dumps(report, indent=1))
