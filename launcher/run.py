"""Train a GPT from a YAML run spec and a DeepSpeed JSON config (`zerolaunch train`).

    deepspeed launcher/run.py --ds_config ds_configs/zero2.json
    deepspeed --num_gpus 8 launcher/run.py --spec my.yaml --ds_config ds_configs/zero2.json \\
        --set train.max_steps=5000 --set model.n_layer=12
    torchrun --nproc_per_node 2 launcher/run.py --ds_config ds_configs/zero2.json
    zerolaunch train --ds_config ds_configs/zero2.json            # one process
    srun python launcher/run.py --ds_config ds_configs/zero2.json   # or: sbatch slurm/train.sbatch

Everything is checked before any process group starts or any file is written: a bad spec,
DeepSpeed config, dataset or checkpoint stops the run with exit code 2 and one clear message.
SIGUSR1 or SIGTERM (or train.time_limit running out) makes every rank save at the next step
boundary and exit with code 75; running the same command again resumes.
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
import os
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from launcher.config.arguments import add_spec_arguments, config_paths
from launcher.config.paths import DEFAULT_DS_CONFIG
from launcher.errors import EXIT_REQUEUE, EXIT_USER_ERROR, UserError, run_cli

if TYPE_CHECKING:
    import torch

    from launcher.checkpoints.store import SaveError
    from launcher.training.loop import TrainState
    from launcher.training.plan import RunPlan


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="zerolaunch train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_spec_arguments(p, DEFAULT_DS_CONFIG)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = _process_start()
    args = parse_args(argv)
    from launcher.runtime.stopping import install_signal_handlers

    install_signal_handlers()  # USR1/TERM from here on: save at the next step boundary, exit 75
    # DeepSpeed's ZeRO calls a torch collective that torch marks deprecated, once per step.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor", category=FutureWarning)
    from launcher.training.plan import prepare_run

    paths = config_paths(args)
    plan = prepare_run(*paths, args.overrides)
    # --- nothing above touched a process group or wrote a file ---
    from launcher.checkpoints.store import SaveError
    from launcher.runtime.distributed import exit_together
    from launcher.training.loop import train

    plan, device, release = _start(
        plan, lambda damaged: prepare_run(*paths, args.overrides, damaged=damaged)
    )
    try:
        engine, state = train(plan, device, started)
        code = _finish(plan, engine, state, device, started)
    except SaveError as e:  # no checkpoint could be written: every rank stops now, exit 2
        return _stop_on(e, plan.env.is_main, release)
    return exit_together(code, before_exit=release)


def _stop_on(error: SaveError, is_main: bool, release: Callable[[], None]) -> int:
    """All ranks found it before writing: they leave together. One rank failed mid-save: the
    others are in a collective it will never join, so it leaves alone (the launcher ends them)."""
    from launcher.runtime.distributed import exit_together

    if is_main or not error.together:
        print(f"error: {error}", file=sys.stderr, flush=True)
    if error.together:
        return exit_together(EXIT_USER_ERROR, before_exit=release)
    release()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_USER_ERROR)


def _start(
    plan: RunPlan, replan: Callable[[dict[Path, str]], RunPlan]
) -> tuple[RunPlan, torch.device, Callable[[], None]]:
    """Process group, the run directory's lock, the resumed tag's contents, device, run files,
    universal conversion: everything before training. Returns the plan (another tag if the
    chosen one was damaged), the device and what gives the lock back."""
    import torch

    from launcher.checkpoints.universal import convert_to_universal
    from launcher.runtime.distributed import init_process_group, rank_map, select_device
    from launcher.training.plan import write_run_files

    env = plan.env
    device = select_device(env)
    init_process_group()  # before any file: a taken port leaves the run directory untouched
    release = _lock(plan)  # before any file: another live run's directory stays untouched
    plan = _intact(plan, replan)
    if env.is_main:
        for warning in plan.warnings:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        write_run_files(plan)
    ranks = rank_map(env, device)
    if plan.layout.model_parallel > 1:  # and where it sits in the layout
        ranks = [r | {"parallel": plan.layout.coords(r["rank"])} for r in ranks]
    if env.is_main:  # where each rank runs: out_dir/ranks.json
        (plan.spec.run_dir / "ranks.json").write_text(json.dumps(ranks, indent=1))
    if plan.resume is not None and plan.resume.universal:
        if env.is_main:  # once, cached beside the tag; the other ranks wait at the barrier
            convert_to_universal(plan.resume.tag_dir)
        torch.distributed.barrier()
    if env.is_main:
        print(plan.summary(), flush=True)
    return plan, device, release


def _intact(plan: RunPlan, replan: Callable[[dict[Path, str]], RunPlan]) -> RunPlan:
    """Every rank checks its share of the resumed tag's content hashes. A damaged tag is
    skipped for the previous one (resume: auto, with a warning) or refused (a tag's path):
    the same outcome on every rank, since every rank knows every problem."""
    from launcher.checkpoints.store import verify_contents

    damaged: dict[Path, str] = {}
    while plan.resume is not None:
        problem = verify_contents(plan.resume.tag_dir)
        if problem is None:
            return plan
        damaged[plan.resume.tag_dir] = problem
        plan = replan(damaged)
    if plan.init_from is not None:  # a tag given by path: refused when damaged
        problem = verify_contents(plan.init_from)
        if problem is not None:
            raise UserError(
                f"checkpoint.init_from={plan.init_from}: the checkpoint is damaged: {problem}"
            )
    return plan


def _lock(plan: RunPlan) -> Callable[[], None]:
    """Rank 0 takes out_dir's lock; every rank learns whether it could (RunLockError on all)."""
    import torch

    from launcher.runtime.run_lock import RunLock, RunLockError

    outcome: list[str | None] = [None, None]  # [refusal, warning]
    lock = None
    if plan.env.is_main:
        try:
            lock = RunLock(plan.spec.run_dir)
            outcome[1] = lock.acquire()
        except RunLockError as e:
            outcome[0] = str(e)
        except Exception as e:  # noqa: BLE001 - a filesystem that refuses: every rank must hear
            outcome[0] = (
                f"cannot take the lock of {plan.spec.run_dir} ({type(e).__name__}: {e}); "
                "out_dir must be a writable directory"
            )
    torch.distributed.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise RunLockError(outcome[0])
    if outcome[1] is not None and lock is not None:
        print(f"warning: {outcome[1]}", file=sys.stderr, flush=True)
    return lock.release if lock is not None else lambda: None


def _finish(
    plan: RunPlan, engine: Any, state: TrainState, device: torch.device, started: float
) -> int:
    """The closing line and the sample; the exit code every rank leaves with."""
    from model.gpt import flops_per_token

    spec = plan.spec
    if state.error is not None:  # every rank knows: divergence, or no room for one step
        if plan.env.is_main:
            print(f"error: {state.error}", file=sys.stderr, flush=True)
        return state.exit_code
    if state.stopped is not None:
        return EXIT_REQUEUE
    if plan.env.is_main:
        print(
            f"finished at step {state.step} in {time.perf_counter() - started:.1f}s "
            f"({flops_per_token(spec.model) / 1e6:.1f} MFLOPs/token); "
            f"checkpoints in {spec.run_dir / 'checkpoints'}",
            flush=True,
        )
    if spec.sample.max_new_tokens > 0:
        # Every rank generates in lockstep: under ZeRO-3 each forward gathers shards from all,
        # through a pipeline each runs the stages.
        text = _sample(plan, engine, device)
        if plan.env.is_main:
            print(f"\n--- sample ---\n{text}\n--------------", flush=True)
    return 0


def _sample(plan: RunPlan, engine: Any, device: torch.device) -> str:
    from launcher.evaluation.sampling import generate_text
    from launcher.training.pipeline import PipelinedModel
    from launcher.training.sequence_parallel import whole_sequences

    spec = plan.spec
    if plan.layout.pipeline > 1:  # no rank holds the whole model: the stages run each token
        model = PipelinedModel(engine, spec.model)
        return generate_text(model, plan.data.tokenizer, spec.sample, spec.train.seed, device)
    with whole_sequences(engine.module):  # each sequence rank samples whole sequences
        return generate_text(
            engine.module, plan.data.tokenizer, spec.sample, seed=spec.train.seed, device=device
        )


def _process_start() -> float:
    """The process's start on the time.perf_counter() clock (imports included)."""
    import psutil

    return time.perf_counter() - (time.time() - psutil.Process().create_time())


if __name__ == "__main__":
    run_cli(main)
