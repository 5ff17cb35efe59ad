"""Evaluate a checkpoint: loss and perplexity on prepared datasets, downstream-task scores.

    zerolaunch eval runs/NAME                       # newest tag, on the run's val sets and tasks
    zerolaunch eval runs/NAME --tag global_step2000 --data wiki=data/wikitext_val \\
        --tasks hellaswag=data/hellaswag.jsonl --json runs/NAME/eval_2000.json
    zerolaunch eval exported/NAME --data data/val   # a directory written by zerolaunch export
    deepspeed --num_gpus 8 launcher/evaluate.py runs/NAME --ds_config ds_configs/zero3.json
    torchrun --nproc_per_node 8 -m launcher eval runs/NAME

Any number of ranks and any ZeRO stage: the examples are dealt out over the ranks and the sums
reduced, so the numbers do not depend on either. Without --data and --tasks the run's own val
sets (as many samples as its training evaluations read) and eval.tasks are evaluated: the very
numbers its training logged for that step. The JSON result goes to stdout (and --json).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the project, not siblings of this file
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import argparse
import json
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

from launcher.errors import UserError, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="zerolaunch eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", type=Path, help="run directory (runs/NAME) or an exported model")
    p.add_argument("--tag", default=None, help="checkpoint tag of a run (default: latest)")
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="[NAME=]PREFIX",
        help="a prepared dataset, read whole unless --samples (repeatable; default: the run's "
        "val sets)",
    )
    p.add_argument(
        "--tasks",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="a downstream-task file (repeatable; default: the run's eval.tasks); formats in "
        "docs/evaluation.md",
    )
    p.add_argument("--samples", type=int, default=None, help="samples per dataset (the first)")
    p.add_argument("--tasks-limit", type=int, default=None, help="examples per task (the first)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="sequences per forward")
    p.add_argument(
        "--ds_config",
        "--ds-config",
        dest="ds_config",
        type=Path,
        default=None,
        help="DeepSpeed JSON for the ZeRO stage and precision (default: the run's "
        "ds_config.json; ds_configs/zero0.json for an exported model)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


@dataclass
class EvalPlan:
    """What to evaluate, checked before any process group starts."""

    source: str
    """The tag directory or exported model the weights come from."""
    model: Any
    """The model's GPTConfig."""
    run_dir: Path | None
    tokenizer: Any
    sets: dict[str, tuple[Any, int, str]] = field(default_factory=dict)
    """name -> (samples, how many to read, where from)."""
    tasks: list = field(default_factory=list)
    ds_config: dict = field(default_factory=dict)
    micro_batch_size: int = 8
    step: int | None = None
    monitor: str | None = None
    """The run's monitored val set (its Loss/val), when the run's own sets are evaluated."""


def _named(item: str, flag: str) -> tuple[str, str]:
    """NAME=VALUE, or a bare VALUE named after its last path component."""
    name, sep, value = item.partition("=")
    if not sep:
        return Path(item).name, item
    if not name or not value:
        raise UserError(f"{flag} {item!r}: expected NAME=PATH (or a bare PATH)")
    return name, value


def _source(args: argparse.Namespace) -> tuple[Any, Any, Path | None, str, Any]:
    """(model config, tokenizer, run dir or None, weights source, tag meta or None); no
    weights are read yet."""
    from data_pipeline.tokenizers import load_tokenizer
    from launcher.checkpoints import hf, store
    from launcher.checkpoints.hf_layout import read_config
    from launcher.checkpoints.models import is_export
    from model.gpt import GPTConfig

    path = args.path
    if is_export(path):
        if args.tag is not None:
            raise UserError(f"{path} is an exported model; --tag applies to run directories")
        description = json.loads((path / hf.TOKENIZER_FILE).read_text())
        return GPTConfig(**read_config(path)), load_tokenizer(description, path), None, path, None
    tag_dir = store.resolve_tag(path, args.tag)
    spec = store.read_run_spec(path)
    tokenizer = load_tokenizer(json.loads((path / "tokenizer.json").read_text()), path)
    return spec.model, tokenizer, path, tag_dir, store.read_meta(tag_dir)


def plan_eval(args: argparse.Namespace, world_size: int, is_builder: bool) -> EvalPlan:
    """Every input checked: the weights' source, datasets (tokenized as the model was), task
    files, the DeepSpeed JSON. UserError (exit 2) before anything starts."""
    from launcher.checkpoints import store
    from launcher.config.ds_config import load_ds_config
    from launcher.config.paths import DEFAULT_DS_CONFIG, find_config

    for flag, value in (("--samples", args.samples), ("--tasks-limit", args.tasks_limit),
                        ("--micro-batch-size", args.micro_batch_size)):  # fmt: skip
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    model, tokenizer, run_dir, source, meta = _source(args)
    spec = store.read_run_spec(run_dir) if run_dir is not None else None
    micro = args.micro_batch_size or (spec.train.micro_batch_size if spec else 8)
    plan = EvalPlan(str(source), model, run_dir, tokenizer, micro_batch_size=micro)
    plan.step = meta.step if meta is not None else None
    if args.data or args.tasks:
        _given_inputs(plan, args, spec, is_builder)
    elif spec is None:
        raise UserError(f"{args.path} is an exported model: give --data PREFIX and/or --tasks")
    else:
        _run_inputs(plan, spec, meta, args, is_builder)
    ds_path = args.ds_config
    if ds_path is None and run_dir is not None and (run_dir / "ds_config.json").exists():
        ds_path = run_dir / "ds_config.json"
    ds_path = find_config(ds_path) if ds_path is not None else DEFAULT_DS_CONFIG
    plan.ds_config = eval_ds_config(load_ds_config(ds_path), micro, world_size)
    return plan


def _run_inputs(plan: EvalPlan, spec: Any, meta: Any, args: argparse.Namespace, builder) -> None:
    """The run's own val sets (as many samples as its evaluations read: eval.batches x
    micro-batch x the data-parallel ranks that trained the tag) and eval.tasks."""
    from launcher.training.plan import open_data

    limit = args.tasks_limit or spec.eval.tasks_limit
    interval = spec.eval.interval or 1  # a run that never evaluated: its val sets all the same
    spec = replace(spec, eval=replace(spec.eval, tasks_limit=limit, interval=interval))
    data = open_data(spec, is_builder=builder)
    trained = spec.eval.batches * spec.train.micro_batch_size * meta.data_parallel
    n = args.samples or trained
    for name, samples in data.val_sets.items():
        plan.sets[name] = (samples, n, f"{name} (the run's val set)")
    plan.tasks, plan.monitor = data.tasks, data.monitor


def _given_inputs(plan: EvalPlan, args: argparse.Namespace, spec: Any, builder: bool) -> None:
    """--data and --tasks: each checked against the model's tokenizer; every problem at once."""
    from data_pipeline.foreign import declared_tokenizer, has_text
    from data_pipeline.loader import DataError, dataset_prefix
    from launcher.evaluation.tasks import load_tasks
    from launcher.training.plan import open_whole

    problems: list[str] = []
    declared_name = spec.data.tokenizer if spec is not None else None
    declared = declared_tokenizer(declared_name) if declared_name else None
    for item in args.data:
        name, prefix = _named(item, "--data")
        made_elsewhere = not Path(f"{dataset_prefix(prefix)}.json").exists()
        declared_here = (declared or plan.tokenizer) if made_elsewhere else None
        try:
            samples = open_whole(prefix, plan.tokenizer, declared_here, "the model",
                                 plan.model.block_size, 1337, None, builder)  # fmt: skip
        except (DataError, UserError) as e:
            problems.append(f"--data {item}: {e}")
            continue
        epoch = sum(s.samples_per_epoch for s in samples.sources)
        plan.sets[name] = (samples, min(args.samples or epoch, epoch), str(prefix))
    tasks = dict(_named(item, "--tasks") for item in args.tasks)
    if tasks and not has_text(plan.tokenizer):
        problems.append("--tasks: the model's tokenizer has no text (vocab:SIZE) to encode with")
    elif tasks:
        try:
            plan.tasks = load_tasks(tasks, plan.tokenizer, plan.model.block_size, args.tasks_limit)
        except UserError as e:
            problems += e.problems
    if problems:
        raise UserError("\n".join(problems), problems)


def eval_ds_config(config: dict, micro_batch_size: int, world_size: int) -> dict:
    """The DeepSpeed JSON for an engine without an optimizer: its precision, and ZeRO-3 (which
    partitions the parameters) kept; ZeRO-1/2 shard only optimizer states and gradients, which
    evaluation has none of, so they run as stage 0."""
    zero = dict(config.get("zero_optimization") or {})
    stage = int(zero.get("stage", 0))
    kept = {k: config[k] for k in ("bf16", "fp16", "bfloat16") if k in config}
    zero = zero if stage == 3 else {"stage": 0}
    zero.pop("offload_optimizer", None)
    return {
        **kept,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch_size * world_size,
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,
    }


def _engine(plan: EvalPlan) -> Any:
    """The model with the checkpoint's weights (made by every rank whole, in fp32, a tensor at a
    time), wrapped by DeepSpeed (which partitions them at ZeRO-3 and casts them to the JSON's
    precision)."""
    import contextlib

    import deepspeed

    from launcher.checkpoints import hf, store
    from model.gpt import GPT

    if plan.run_dir is not None:
        state = store.load_weights(Path(plan.source), lazy=True)
    else:
        state = hf.load_state(Path(plan.source), plan.model, lazy=True)
    model = GPT.from_state(plan.model, state)
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON result
        engine, _, _, _ = deepspeed.initialize(model=model, config=plan.ds_config)
    engine.eval()
    return engine


def evaluate(plan: EvalPlan, engine: Any, device: Any, rank: int, world_size: int) -> dict:
    """Every set's loss and every task's scores, the same on every rank."""
    from launcher.evaluation.tasks import score
    from launcher.evaluation.val_loss import dataset_loss
    from launcher.monitoring.metrics import task_metrics, val_set_metrics

    forward = lambda x: engine(x)[0]  # noqa: E731 - logits of every position
    micro, result = plan.micro_batch_size, {"datasets": {}, "tasks": {}, "metrics": {}}
    for name, (samples, n, where) in plan.sets.items():
        loss, tokens = dataset_loss(forward, samples, n, micro, device, rank, world_size)
        ppl = math.exp(min(loss, 50.0))
        result["datasets"][name] = {
            "loss": loss, "perplexity": ppl, "samples": n, "tokens": tokens, "from": where
        }  # fmt: skip
        result["metrics"] |= val_set_metrics({name: loss})
        if name == plan.monitor:
            result["metrics"] |= {"Loss/val": loss, "Loss/perplexity_val": ppl}
    for task in plan.tasks:
        scores = score(task, forward, micro, device, rank, world_size)
        result["tasks"][task.name] = {**scores, "file": str(task.path)}
        result["metrics"] |= task_metrics(task.name, scores)
    return result


def _result_stream() -> Any:
    """Stdout for the JSON result alone: everything else anything prints (DeepSpeed's logging,
    extension builds, at the file-descriptor level too) goes to stderr from here on."""
    import os

    sys.stdout.flush()
    result = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = _result_stream()
    from launcher.runtime.distributed import detect_env

    env = detect_env()
    plan = plan_eval(args, env.world_size, is_builder=env.local_rank == 0)
    # --- nothing above started a process group or read the weights ---
    import torch

    from launcher.runtime.distributed import exit_together, init_process_group, select_device

    started = time.perf_counter()
    device = select_device(env)
    init_process_group()
    for samples, n, _ in plan.sets.values():
        samples.prepare(n, is_builder=env.local_rank == 0)
    engine = _engine(plan)
    with torch.no_grad():
        result = evaluate(plan, engine, device, env.rank, env.world_size)
    if env.is_main:
        result = {
            "checkpoint": plan.source,
            "step": plan.step,
            "world_size": env.world_size,
            "zero_stage": engine.zero_optimization_stage(),
            "precision": "bf16"
            if engine.bfloat16_enabled()
            else "fp16"
            if engine.fp16_enabled()
            else "fp32",  # fmt: skip
            "seconds": round(time.perf_counter() - started, 2),
            **result,
        }
        text = json.dumps(result, indent=1)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(text + "\n")
        print(_summary(result), file=sys.stderr, flush=True)
        print(text, file=out, flush=True)
    return exit_together(0)


def _summary(result: dict) -> str:
    """One line per set and task, for people (stderr)."""
    lines = [
        f"{result['checkpoint']} on {result['world_size']} rank(s), ZeRO {result['zero_stage']}"
    ]
    for name, d in result["datasets"].items():
        lines.append(f"  {name}: loss {d['loss']:.4f}, perplexity {d['perplexity']:.2f} "
                     f"({d['samples']} samples, {d['tokens']:,} tokens)")  # fmt: skip
    for name, t in result["tasks"].items():
        scores = ", ".join(f"{k} {v:.4g}" for k, v in t.items() if k not in ("n", "file"))
        lines.append(f"  {name}: {scores} ({t.get('n', '?')} examples)")
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)
