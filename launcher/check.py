"""Pre-flight check: will this run start, and does it fit? Nothing is launched.

    zerolaunch check --ds_config ds_configs/zero2.json --world-size 64 --device-memory 80GB
        [--spec my.yaml] [--set model.n_layer=48 ...] [--device cuda]

Runs every check a launch runs (spec, DeepSpeed config and batch arithmetic at this world size,
precision on the device, dataset, tokenizer, checkpoint to resume) and prints a per-device
memory estimate for each ZeRO stage, marking the configured one. All problems are listed
together with exit code 2. The model is built on the meta device: a 70B check takes seconds.
"""

from __future__ import annotations

import argparse
import re

from launcher.config.arguments import add_spec_arguments, config_paths
from launcher.config.paths import DEFAULT_DS_CONFIG
from launcher.errors import UserError, run_cli
from launcher.runtime.distributed import DistEnv, device_type
from launcher.training.memory import GIB, deepspeed_estimate, estimate
from launcher.training.plan import RunPlan, prepare_run
from model.gpt import GPTConfig, count_params, flops_per_token


def parse_memory(text: str) -> float:
    """'80GB' (1e9), '80GiB' (2**30), '80' (GiB) -> bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*(GiB|GB|TB|TiB|MB|MiB)?\s*", text, re.IGNORECASE)
    if not match:
        raise UserError(f"--device-memory {text!r}: expected a size such as 80GB or 141GiB")
    unit = (match.group(2) or "GiB").lower()
    scale = {"gb": 1e9, "gib": GIB, "tb": 1e12, "tib": 2**40, "mb": 1e6, "mib": 2**20}[unit]
    return float(match.group(1)) * scale


def _gib(n: float) -> str:
    return f"{n / GIB:,.2f}"


def stage_table(plan: RunPlan, device_memory: float | None) -> list[str]:
    """One row per ZeRO stage (offload as configured applies to the configured stage)."""
    configured = plan.engine.zero_stage
    checkpointing = plan.spec.model.activation_checkpointing != "none"
    header = (
        f"{'ZeRO':<7}{'params':>9}{'grads':>9}{'grads32':>9}{'optim':>9}{'acts':>9}"
        f"{'acts ckpt':>10}{'buffers':>9}{'total':>9}{'host':>9}  GiB per device"
    )
    rows = [header]
    for stage in range(4):
        layout = plan.layout
        sizes = (layout.tensor, layout.sequence, layout.pipeline)
        est = estimate(plan.spec.model, plan.engine.at_stage(stage), *sizes)
        total = est.total(checkpointing)
        mark = "<- configured" if stage == configured else ""
        if device_memory is not None:
            mark = ("fits " if total <= device_memory else "DOES NOT FIT ") + mark
        rows.append(
            f"{stage:<7}{_gib(est.params):>9}{_gib(est.grads):>9}{_gib(est.step_grads):>9}"
            f"{_gib(est.optimizer):>9}{_gib(est.activations):>9}"
            f"{_gib(est.activations_checkpointed):>10}{_gib(est.buffers):>9}{_gib(total):>9}"
            f"{_gib(est.cpu):>9}  {mark.rstrip()}"
        )
    return rows


def cross_check(plan: RunPlan) -> str:
    """DeepSpeed's own model-states estimate for the configured stage beside ours."""
    if plan.layout.tensor > 1 or plan.layout.pipeline > 1:
        return "DeepSpeed's model-states estimates know neither tensor nor pipeline parallelism"
    found = deepspeed_estimate(plan.spec.model, plan.engine, plan.env.local_world_size)
    if found is None:
        return f"DeepSpeed has no model-states estimate for ZeRO-{plan.engine.zero_stage}"
    name, device, host = found
    ours = plan.memory  # the configured stage's estimate, for this layout
    note = "" if plan.engine.half else " (DeepSpeed's formula assumes 16-bit training)"
    return (
        f"model states per device: ours {_gib(ours.model_states)} GiB (host {_gib(ours.cpu)} per "
        f"rank); DeepSpeed's {name}: {_gib(device)} GiB (host {_gib(host)} per node, with its "
        f"1.5x buffer factor){note}"
    )


def shape_line(m: GPTConfig) -> str:
    """The block's choices, with what each one's size is (what the memory estimate reads)."""
    heads = f"{m.n_head} heads of {m.head_dim}"
    if m.kv_heads != m.n_head:
        heads += f", {m.kv_heads} key/value heads"
    positions = f"rope (theta {m.rope_theta:g})" if m.positions == "rope" else "learned positions"
    return (
        f"blocks: {heads} | {positions} | {m.norm} (eps {m.norm_eps:g}) | {m.mlp} MLP "
        f"{m.ffn_size} wide | {'tied' if m.tie_embeddings else 'untied'} embeddings | "
        f"{'biases' if m.bias else 'no biases'}"
    )


def report(plan: RunPlan, device_memory: float | None) -> str:
    m, engine = plan.spec.model, plan.engine
    tokens = engine.train_batch_size * m.block_size
    flops = flops_per_token(m) * tokens
    lines = [
        plan.summary(),
        shape_line(m),
        f"parameters: {count_params(m):,} | tokens/step: {tokens:,} | FLOPs/step: {flops:.3e} | "
        f"precision: {engine.precision} | activation checkpointing: {m.activation_checkpointing}",
        *stage_table(plan, device_memory),
        "total = params + grads + optim + the larger of activations (checkpointed ones if the "
        "spec checkpoints) and grads32 (the fp32 gradient partition of the optimizer step, "
        "16-bit training; alive only after backward) + communication buffers; host = offloaded "
        "states in CPU memory per rank",
        cross_check(plan),
        startup_line(plan),
    ]
    return "\n".join(lines)


def startup_line(plan: RunPlan) -> str:
    """What a node's host memory holds while its ranks build the model (memory.py)."""
    if plan.reads_whole_init_weights:
        what = (
            "the whole init weights in fp32: a tensor- or pipeline-parallel tag is put together "
            "before each rank cuts its part"
        )
    else:
        what = "one whole module in fp32 at most: each makes only its own parameters, on its device"
    return (
        f"start-up host memory per node: {_gib(plan.startup_host_memory)} GiB "
        f"({plan.env.local_world_size} rank(s) x {what})"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="zerolaunch check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_spec_arguments(p, DEFAULT_DS_CONFIG)
    p.add_argument("--world-size", type=int, default=1, help="data-parallel ranks (default 1)")
    p.add_argument("--device-memory", default=None, help="per-device memory, e.g. 80GB")
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="what the run will use (default: this machine's)",
    )
    args = p.parse_args(argv)
    if args.world_size < 1:
        raise UserError("--world-size must be at least 1")
    device_memory = parse_memory(args.device_memory) if args.device_memory else None
    env = DistEnv(
        rank=0, local_rank=0, world_size=args.world_size, local_world_size=min(args.world_size, 8)
    )
    plan = prepare_run(
        *config_paths(args), args.overrides, env=env, device=args.device or device_type()
    )
    for warning in plan.warnings:
        print(f"warning: {warning}")
    print(report(plan, device_memory))
    return 0


if __name__ == "__main__":
    run_cli(main)
