"""A GPT-2-architecture decoder in plain PyTorch (no DeepSpeed, no launcher imports)."""

from model.gpt import (
    GPT,
    GPTConfig,
    count_params,
    flops_per_token,
    param_groups,
    recompute_fraction,
)

__all__ = [
    "GPT",
    "GPTConfig",
    "count_params",
    "flops_per_token",
    "param_groups",
    "recompute_fraction",
]
