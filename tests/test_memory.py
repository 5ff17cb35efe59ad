"""The activation estimate: Korthikanti et al.'s 34 s b h for GPT-2, each term generalised to
the Llama options, checked against the tensors autograd really keeps for backward."""

from __future__ import annotations

import pytest
import torch

from launcher.training.memory import activation_bytes, layer_activation_bytes
from model.gpt import GPT, GPTConfig

GPT2 = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)
LLAMA = dict(
    n_layer=22,
    n_head=32,
    n_kv_head=4,
    n_embd=2048,
    intermediate_size=5632,
    block_size=2048,
    vocab_size=32000,
    positions="rope",
    norm="rmsnorm",
    mlp="swiglu",
    tie_embeddings=False,
    bias=False,
)


@pytest.mark.parametrize("dtype_bytes", [2, 4])
def test_gpt2_shape_keeps_korthikantis_34_sbh(dtype_bytes: int) -> None:
    config = GPTConfig(**GPT2)
    s, b, h, layers, vocab = 1024, 8, 768, 12, 50304
    logits = 8 * s * b * vocab
    per_layer = 34 * s * b * h * dtype_bytes / 2  # the formula before the Llama options
    full, checkpointed = activation_bytes(config, b, dtype_bytes)
    assert full == layers * per_layer + logits
    assert checkpointed == layers * s * b * h * dtype_bytes + per_layer + logits


def test_llama_shape_term_by_term() -> None:
    """TinyLlama in bf16, per token: attention 9h + 6kv (q, k, v, their rotated copies, the
    norm's output, the attention output, a mask), MLP 3h + 8f (four f-wide tensors), two
    RMSNorms 2 x 6h (fp32 input, normalised output)."""
    config = GPTConfig(**LLAMA)
    h, kv, f = 2048, 4 * 64, 5632
    tokens = 2048 * 8
    assert layer_activation_bytes(config, tokens, 2) == tokens * (24 * h + 6 * kv + 8 * f)
    gpt2_like = GPTConfig(**{**LLAMA, "n_kv_head": None, "positions": "learned", "mlp": "gelu",
                             "norm": "layernorm", "intermediate_size": 4 * h})  # fmt: skip
    assert layer_activation_bytes(gpt2_like, tokens, 2) == 34 * tokens * h


def saved_bytes(model: GPT, idx: torch.Tensor) -> int:
    """Bytes of the distinct storages (parameters aside) autograd keeps for backward: a view
    keeps its whole storage alive, so each storage counts once, whole."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)
    return sum(kept.values())


def measured_per_layer(shape: dict, micro_batch: int, dtype: torch.dtype) -> float:
    """What one more block keeps: a 3-block model's saved bytes less a 1-block one's, over 2."""
    kept = []
    for layers in (1, 3):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**{**shape, "n_layer": layers})).to(dtype)
        idx = torch.randint(0, shape["vocab_size"], (micro_batch, shape["block_size"]))
        kept.append(saved_bytes(model, idx))
    return (kept[1] - kept[0]) / 2


SMALL = dict(n_head=4, n_embd=128, block_size=256, vocab_size=64, dropout=0.0)
SMALL_LLAMA = dict(SMALL, n_kv_head=1, positions="rope", norm="rmsnorm", mlp="swiglu",
                   tie_embeddings=False, bias=False)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", [SMALL, SMALL_LLAMA], ids=["gpt2", "llama"])
def test_per_layer_estimate_matches_what_autograd_keeps(shape: dict, dtype: torch.dtype) -> None:
    micro_batch, dtype_bytes = 4, torch.finfo(dtype).bits // 8
    measured = measured_per_layer(shape, micro_batch, dtype)
    config = GPTConfig(**shape)
    tokens = shape["block_size"] * micro_batch
    # At dropout 0 no mask is kept: the estimate's two (dtype_bytes / 2 per element) go.
    masks = 2 * tokens * shape["n_embd"] * dtype_bytes / 2
    estimated = layer_activation_bytes(config, tokens, dtype_bytes) - masks
    # What the estimate leaves out: per-token statistics and the rope tables (~1% here).
    assert 0.98 * measured <= estimated <= measured, (estimated, measured)
