"""A GPT-2-architecture decoder in plain PyTorch (no DeepSpeed, no launcher imports)."""

from model.gpt import GPT, GPTConfig, flops_per_token, param_groups

__all__ = ["GPT", "GPTConfig", "flops_per_token", "param_groups"]
