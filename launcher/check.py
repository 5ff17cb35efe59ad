"""Pre-flight check: will this run start, and does it fit? Nothing is launched.

    python -m launcher check --ds_config ds_configs/zero2.json --world-size 64 --device-memory 80GB
        [--spec my.yaml] [--set model.n_layer=48 ...] [--device cuda]

Runs every check a launch runs (spec, DeepSpeed config and batch arithmetic at this world size,
precision on the device, dataset, tokenizer, checkpoint to resume) and prints a per-device
memory estimate for each ZeRO stage, marking the configured one. All problems are listed
together with exit code 2. The model is built on the meta device: a 70B check takes seconds.
"""

from __future__ import annotations

import argparse
import copy
import re
from pathlib import Path

from launcher.distributed import DistEnv, device_type
from launcher.ds_config import zero_stage
from launcher.errors import UserError, run_cli
from launcher.memory import GIB, count_params, estimate
from launcher.preflight import RunPlan, prepare_run
from launcher.schedule import tokens_per_step
from launcher.train import config_flops_per_token


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
    config, world = plan.spec.model, plan.env.world_size
    configured = zero_stage(plan.ds_config)
    checkpointing = config.activation_checkpointing != "none"
    header = (
        f"{'ZeRO':<7}{'params':>9}{'grads':>9}{'optim':>9}{'acts':>9}{'acts ckpt':>10}"
        f"{'buffers':>9}{'total':>9}{'host':>9}  GiB per device"
    )
    rows = [header]
    for stage in range(4):
        ds = copy.deepcopy(plan.ds_config)
        zero = ds.setdefault("zero_optimization", {})
        if stage != configured:
            zero.pop("offload_optimizer", None)
            zero.pop("offload_param", None)
        zero["stage"] = stage
        est = estimate(config, ds, world, stage)
        total = est.total(checkpointing)
        mark = "<- configured" if stage == configured else ""
        if device_memory is not None:
            mark = ("fits " if total <= device_memory else "DOES NOT FIT ") + mark
        rows.append(
            f"{stage:<7}{_gib(est.params):>9}{_gib(est.grads):>9}{_gib(est.optimizer):>9}"
            f"{_gib(est.activations):>9}{_gib(est.activations_checkpointed):>10}"
            f"{_gib(est.buffers):>9}{_gib(total):>9}{_gib(est.cpu):>9}  {mark}"
        )
    return rows


def report(plan: RunPlan, device_memory: float | None) -> str:
    m, t = plan.spec.model, plan.spec.train
    params = count_params(m)
    tokens = tokens_per_step(t, plan.env.world_size, m.block_size)
    flops = config_flops_per_token(m) * tokens
    precision = (
        "bf16/fp16"
        if any(plan.ds_config.get(k, {}).get("enabled") is True for k in ("bf16", "fp16"))
        else "fp32"
    )
    lines = [
        plan.summary(),
        f"parameters: {params:,} | tokens/step: {tokens:,} | FLOPs/step: {flops:.3e} | "
        f"precision: {precision} | activation checkpointing: {m.activation_checkpointing}",
        *stage_table(plan, device_memory),
        "total = params + grads + optim + activations (checkpointed ones if the spec checkpoints)"
        " + communication buffers; host = offloaded states in CPU memory per rank",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m launcher check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--spec", type=Path, default=None)
    p.add_argument("--ds_config", "--ds-config", type=Path, default=Path("ds_configs/zero2.json"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
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
        args.spec, args.ds_config, args.overrides, env=env, device=args.device or device_type()
    )
    print(report(plan, device_memory))
    return 0


if __name__ == "__main__":
    run_cli(main)
