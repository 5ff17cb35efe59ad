"""Generation speed with and without the KV cache: `zerolaunch bench --sampling SHAPE`.

The same random-weight model generates the same greedy continuation of a random prompt twice per
repeat, without the cache (every step re-runs the whole text, as before the cache existed) and
with it (every step runs the new token only), alternating so that a machine speeding up or
slowing down weighs on both alike. Each generation lies between two device synchronisations.
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from model.gpt import GPT, GPTConfig

_GPT2 = ["model.positions=learned", "model.norm=layernorm", "model.mlp=gelu",
         "model.tie_embeddings=true", "model.bias=true", "model.n_kv_head=null"]  # fmt: skip
_LLAMA = ["model.positions=rope", "model.norm=rmsnorm", "model.mlp=swiglu",
          "model.tie_embeddings=false", "model.bias=false"]  # fmt: skip
_124M = ["model.n_layer=12", "model.n_head=12", "model.n_embd=768", "model.block_size=1024",
         "model.dropout=0.0", "model.intermediate_size=null"]  # fmt: skip
SHAPES = {
    # GPT-2 small: 124M parameters with GPT-2's vocabulary padded to 50304.
    "gpt2-124m": [*_124M, *_GPT2, "model.vocab_size=50304"],
    # The Llama family at the same size: 4 key/value heads (GQA), SwiGLU 2048 wide, Llama's
    # 32000-token vocabulary, untied: 124.7M parameters.
    "llama-124m": [*_124M, *_LLAMA, "model.n_kv_head=4", "model.vocab_size=32000"],
    "spec": [],  # the spec's own model section
}
"""Model shapes for --sampling, as spec overrides (--set model.* on the command line wins)."""

DTYPES = ("fp32", "bf16")


def measure_sampling(
    config: GPTConfig,
    device: torch.device,
    dtype: str = "fp32",
    prompt_tokens: int = 10,
    new_tokens: int = 300,
    batch: int = 1,
    repeats: int = 1,
    seed: int = 1337,
) -> dict:
    """Tokens/s generated without and with the KV cache; the benchmark's JSON figures."""
    import torch

    from model.gpt import GPT

    torch.manual_seed(seed)
    with device:  # random weights, built in place
        model = GPT(config).eval()
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, config.vocab_size, (batch, prompt_tokens), generator=generator)
    prompt = prompt.to(device)
    for use_cache in (False, True):  # warm-up: kernels, allocator, threads
        model.generate(prompt, 4, temperature=0, use_cache=use_cache)
    seconds: dict[bool, list[float]] = {False: [], True: []}
    outputs: dict[bool, torch.Tensor] = {}
    for _ in range(repeats):
        for use_cache in (False, True):
            elapsed, outputs[use_cache] = _timed_generate(model, prompt, new_tokens, use_cache)
            seconds[use_cache].append(elapsed)
    generated = batch * new_tokens
    before, after = (_figures(seconds[c], generated) for c in (False, True))
    return {
        "uncached": before,
        "cached": after,
        "speedup": before["seconds"] / after["seconds"],
        "same_tokens": bool(torch.equal(outputs[False], outputs[True])),
        "params": model.num_params(),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "batch": batch,
        "repeats": repeats,
        "dtype": dtype,
        "model": _shape(config),
    }


def _timed_generate(
    model: GPT, prompt: torch.Tensor, new_tokens: int, use_cache: bool
) -> tuple[float, torch.Tensor]:
    """Seconds of one greedy generation (between two device synchronisations), and its ids."""
    import torch

    cuda = prompt.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(prompt.device)
    start = time.perf_counter()
    out = model.generate(prompt, new_tokens, temperature=0, use_cache=use_cache)
    if cuda:
        torch.cuda.synchronize(prompt.device)
    return time.perf_counter() - start, out


def _figures(seconds: list[float], generated: int) -> dict:
    median = statistics.median(seconds)
    return {
        "seconds": median,
        "tokens_per_sec": generated / median,
        "ms_per_token": 1000 * median / generated,
        "samples_s": seconds,
    }


def _shape(config: GPTConfig) -> dict:
    fields = ("n_layer", "n_head", "kv_heads", "n_embd", "block_size", "vocab_size",
              "positions", "norm", "mlp", "ffn_size", "tie_embeddings", "bias")  # fmt: skip
    return {name: getattr(config, name) for name in fields}


def headline(name: str, r: dict, device: str) -> str:
    """One line for people: both speeds and the ratio."""
    before, after = r["uncached"], r["cached"]
    return (
        f"{name} ({r['params'] / 1e6:.1f}M parameters, {r['dtype']}, {device}): "
        f"{r['new_tokens']} new tokens after a {r['prompt_tokens']}-token prompt, batch "
        f"{r['batch']}: without the KV cache {before['tokens_per_sec']:,.1f} tokens/s "
        f"({before['seconds']:.2f} s), with it {after['tokens_per_sec']:,.1f} tokens/s "
        f"({after['seconds']:.2f} s): {r['speedup']:.2f}x; "
        f"the same tokens: {'yes' if r['same_tokens'] else 'NO'}"
    )
