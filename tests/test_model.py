"""The GPT: GPT-2 and Llama-style shapes and parameter counts, shape problems, causality, FLOPs,
weight-decay groups, activation checkpointing, and the KV cache of generation."""

from __future__ import annotations

import pytest
import torch

from model.gpt import (
    GPT,
    GPTConfig,
    KVCache,
    count_params,
    flops_per_token,
    param_groups,
    shape_problems,
)

GPT2_124M = GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257)


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(
        GPTConfig(
            **{"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "vocab_size": 50, **kw}
        )
    )


def test_gpt2_124m_parameter_count() -> None:
    with torch.device("meta"):
        model = GPT(GPT2_124M)
    assert model.num_params() == 124_439_808  # GPT-2 small, tied embeddings
    assert model.num_params(non_embedding=True) == 124_439_808 - 1024 * 768
    assert count_params(GPT2_124M) == 124_439_808  # the same, without building real tensors
    assert count_params(GPT2_124M, non_embedding=True) == 124_439_808 - 1024 * 768


def test_gpt2_124m_flops_per_token() -> None:
    n = 124_439_808 - 1024 * 768
    # 6N + 12 * L * H * Q * T with L=12, H=12, Q=64, T=1024
    assert flops_per_token(GPT2_124M) == 6 * n + 12 * 12 * 12 * 64 * 1024 == 855_166_464


def test_shapes_and_loss() -> None:
    model = tiny()
    idx = torch.randint(0, 50, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 50)
    assert loss.shape == () and 3.0 < loss.item() < 5.0  # about ln(50) at initialisation
    _, none = model(idx)
    assert none is None


def test_changing_a_future_token_never_changes_an_earlier_logit() -> None:
    model = tiny().eval()
    idx = torch.randint(0, 50, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 50
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_embeddings_tied_and_residual_projections_scaled() -> None:
    model = tiny(n_layer=8, n_embd=64, n_head=4)
    assert model.lm_head.weight is model.transformer.wte.weight
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert std == pytest.approx(0.02 / (2 * 8) ** 0.5, rel=0.1)


def test_weight_decay_groups() -> None:
    model = tiny()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(n.endswith("weight") and ("c_" in n) for n in decayed)
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.ln_f.weight",
    } <= skipped
    assert all(not n.endswith("bias") for n in decayed)
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == model.num_params()


def test_generate_extends_and_is_seeded() -> None:
    model = tiny().eval()
    start = torch.zeros((1, 1), dtype=torch.long)
    a = model.generate(start, 30, generator=torch.Generator().manual_seed(1))
    b = model.generate(start, 30, generator=torch.Generator().manual_seed(1))
    assert a.shape == (1, 31) and torch.equal(a, b)
    greedy = model.generate(start, 5, temperature=0)
    assert greedy.shape == (1, 6)


def test_too_long_sequence_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="exceeds block_size=16"):
        tiny()(torch.zeros((1, 17), dtype=torch.long))


def _saved_bytes_and_grads(model: GPT, idx: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    """Bytes of tensors autograd keeps for backward, and the gradients."""
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(idx, idx)
    loss.backward()
    return saved, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("policy", ["full", "every_n"])
def test_activation_checkpointing_same_gradients_less_saved_memory(policy: str) -> None:
    config = GPTConfig(n_layer=6, n_head=4, n_embd=128, block_size=64, vocab_size=96)
    torch.manual_seed(0)
    plain = GPT(config)
    checkpointed = GPT(GPTConfig(**{**config.__dict__, "activation_checkpointing": policy}))
    checkpointed.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 96, (4, 64), generator=torch.Generator().manual_seed(1))
    base_bytes, base_grads = _saved_bytes_and_grads(plain, idx)
    ckpt_bytes, ckpt_grads = _saved_bytes_and_grads(checkpointed, idx)
    for a, b in zip(base_grads, ckpt_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if policy == "full":
        assert base_bytes >= 3 * ckpt_bytes, (base_bytes, ckpt_bytes)
    else:  # every 2nd block: roughly half the block activations kept
        assert ckpt_bytes < 0.75 * base_bytes


def test_recompute_fraction() -> None:
    from model.gpt import recompute_fraction

    assert recompute_fraction(GPTConfig(n_layer=12, activation_checkpointing="full")) == 1.0
    every = GPTConfig(n_layer=12, activation_checkpointing="every_n", activation_checkpointing_n=3)
    assert recompute_fraction(every) == 4 / 12
    assert recompute_fraction(GPTConfig(n_layer=12)) == 0.0


# ------------------------------------------------------------------ the Llama-style options

LLAMA = {
    "positions": "rope",
    "norm": "rmsnorm",
    "mlp": "swiglu",
    "tie_embeddings": False,
    "bias": False,
}
"""The Llama family's choices, the shape left to each test."""
LLAMA_GQA = {**LLAMA, "n_head": 4, "n_kv_head": 2, "intermediate_size": 48}
"""For tiny(): 4 query heads over 2 key/value heads of 8 dimensions (rope needs them even)."""


def hand_count(c: GPTConfig, vocab: int) -> int:
    """Parameters written out layer by layer, independently of the model's code."""
    C, d = c.n_embd, c.n_embd // c.n_head
    F = c.intermediate_size or 4 * C  # the swiglu shapes here give their width
    kv = c.n_head if c.n_kv_head is None else c.n_kv_head
    b = 1 if c.bias else 0
    norm = C * (2 if c.norm == "layernorm" and c.bias else 1)
    attn = C * (c.n_head + 2 * kv) * d + b * (c.n_head + 2 * kv) * d + C * C + b * C
    gates = 2 if c.mlp == "swiglu" else 1
    mlp = C * gates * F + b * gates * F + F * C + b * C
    embeddings = vocab * C + (c.block_size * C if c.positions == "learned" else 0)
    head = 0 if c.tie_embeddings else vocab * C
    return c.n_layer * (2 * norm + attn + mlp) + norm + embeddings + head


@pytest.mark.parametrize(
    "shape",
    [
        {},  # GPT-2
        {"n_kv_head": 2},  # grouped-query attention, GPT-2 otherwise
        {"n_kv_head": 1, "bias": False},  # multi-query, no biases
        {"tie_embeddings": False},  # GPT-2 with its own output head
        {**LLAMA, "n_kv_head": 2, "intermediate_size": 80},
        {**LLAMA, "n_kv_head": 1, "intermediate_size": 80, "tie_embeddings": True},
        {**LLAMA, "n_kv_head": 4, "intermediate_size": 80, "bias": True},  # MHA, with biases
    ],
)
def test_parameter_count_matches_the_hand_formula(shape: dict) -> None:
    config = GPTConfig(n_layer=3, n_head=4, n_embd=64, block_size=32, vocab_size=100, **shape)
    expected = hand_count(config, 100)
    assert GPT(config).num_params() == count_params(config) == expected
    lookup = 100 * 64 * (0 if config.tie_embeddings else 1)
    lookup += 32 * 64 if config.positions == "learned" else 0
    assert count_params(config, non_embedding=True) == expected - lookup


def test_swiglu_default_width_is_llamas() -> None:
    # 8/3 of the width rounded up to a multiple of 256: Llama-2-7B's 11008, TinyLlama's 5632.
    assert GPTConfig(n_embd=4096, mlp="swiglu").ffn_size == 11008
    assert GPTConfig(n_embd=2048, mlp="swiglu").ffn_size == 5632
    assert GPTConfig(n_embd=768, mlp="swiglu").ffn_size == 2048
    assert GPTConfig(n_embd=768).ffn_size == 3072  # GELU: 4x


def test_untied_llama_shape_flops_per_token() -> None:
    shape = {**LLAMA, "n_kv_head": 4, "intermediate_size": 2048}
    config = GPTConfig(
        n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=32000, **shape
    )
    n = hand_count(config, 32000) - 32000 * 768  # the untied head stays in N; only wte leaves
    per_layer = 2 * 768 + 768 * (12 + 2 * 4) * 64 + 768 * 768 + 3 * 768 * 2048
    assert n == 12 * per_layer + 768 + 32000 * 768  # blocks, the final norm, the head
    attention = 12 * 12 * 12 * 64 * 1024  # L * H * Q * T: query heads, whatever n_kv_head is
    assert flops_per_token(config) == 6 * n + attention
    # Tied, the head is the lookup table and N keeps it: the same matmul, the same count.
    tied = GPTConfig(**{**config.__dict__, "tie_embeddings": True})
    assert flops_per_token(config) == flops_per_token(tied)


def test_shape_problems_are_listed_together() -> None:
    config = GPTConfig(
        n_head=4,
        n_kv_head=3,
        n_embd=36,  # head size 9: odd
        positions="rope",
        norm="batchnorm",
        mlp="relu",
        rope_theta=0.0,
        norm_eps=0.0,
        intermediate_size=0,
        activation_checkpointing="some",
        vocab_size=50,
    )
    problems = shape_problems(config)
    expected = [
        "n_kv_head: 3 does not divide n_head=4",
        "rope rotates pairs of dimensions, but the head size n_embd/n_head = 9 is odd",
        "norm: 'batchnorm' is not one of layernorm, rmsnorm",
        "mlp: 'relu' is not one of gelu, swiglu",
        "activation_checkpointing: 'some' is not one of none, full, every_n",
        "rope_theta: must be > 0",
        "norm_eps: must be > 0",
        "intermediate_size: must be >= 1",
    ]
    assert len(problems) == len(expected), problems
    for fragment in expected:
        assert any(fragment in p for p in problems), (fragment, problems)
    with pytest.raises(ValueError) as error:  # building refuses with every problem at once
        GPT(config)
    assert all(p in str(error.value) for p in problems)
    more = shape_problems(GPTConfig(n_head=5, n_kv_head=0, positions="alibi", vocab_size=50))
    assert any("n_head: 5 does not divide n_embd=384" in p for p in more)
    assert any("n_kv_head: must be >= 1" in p for p in more)
    assert any("positions: 'alibi' is not one of learned, rope" in p for p in more)
    assert shape_problems(GPTConfig(vocab_size=50, **LLAMA_GQA)) == []


def test_weight_decay_groups_with_an_untied_head() -> None:
    model = tiny(**LLAMA_GQA)
    assert model.lm_head.weight is not model.transformer.wte.weight
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "lm_head.weight" in decayed  # a Linear: decays like every other matrix
    assert "transformer.wte.weight" in skipped  # the lookup table does not
    assert all(n.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "wte.weight"))
               for n in skipped)  # fmt: skip
    assert all(n.endswith("weight") for n in decayed | skipped)  # no biases anywhere
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == model.num_params()


def test_llama_style_causality_with_rope_and_grouped_queries() -> None:
    model = tiny(**LLAMA_GQA).eval()
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(3))
    for position in (0, 7, 15):
        changed = idx.clone()
        changed[:, position] = (idx[:, position] + 1) % 50
        a, _ = model(idx)
        b, _ = model(changed)
        assert torch.equal(a[:, :position], b[:, :position])
        assert not torch.allclose(a[:, position:], b[:, position:])


def test_llama_style_activation_checkpointing_same_loss_and_gradients() -> None:
    shape = {**LLAMA, "n_kv_head": 2}
    config = GPTConfig(n_layer=4, n_head=4, n_embd=64, block_size=32, vocab_size=96, **shape)
    torch.manual_seed(0)
    plain = GPT(config)
    checkpointed = GPT(GPTConfig(**{**config.__dict__, "activation_checkpointing": "full"}))
    checkpointed.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 96, (3, 32), generator=torch.Generator().manual_seed(1))
    _, loss_plain = plain(idx, idx)
    _, loss_ckpt = checkpointed(idx, idx)
    assert torch.equal(loss_plain, loss_ckpt)
    base_bytes, base_grads = _saved_bytes_and_grads(plain, idx)
    ckpt_bytes, ckpt_grads = _saved_bytes_and_grads(checkpointed, idx)
    for a, b in zip(base_grads, ckpt_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert base_bytes >= 2 * ckpt_bytes, (base_bytes, ckpt_bytes)


# ------------------------------------------------------------------------------ the KV cache

FAMILIES = {"gpt2": {}, "llama_gqa": LLAMA_GQA}


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_logits_equal_a_full_forward(family: str) -> None:
    """The cache filled by a prompt, then by chunks and single tokens, gives every position the
    logits of one forward over the whole sequence."""
    model = tiny(**FAMILIES[family]).eval()
    idx = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(model.config.n_layer, model.config.block_size)
        pieces = []
        for start, end in [(0, 5), (5, 6), (6, 7), (7, 11), (11, 12), (12, 16)]:
            logits, _ = model(idx[:, start:end], cache=cache)
            pieces.append(logits)
            assert cache.length == end
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds block_size=16"):
        model(idx[:, :1], cache=cache)  # full: one more position would pass block_size


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("batch", "prompt", "new"),
    [
        (1, 3, 10),  # within block_size
        (3, 4, 12),  # a batch, exactly to block_size
        (2, 5, 30),  # past block_size: the window slides
        (1, 20, 5),  # a prompt longer than block_size: never cached
    ],
)
def test_cached_generation_equals_uncached(family: str, batch: int, prompt: int, new: int) -> None:
    model = tiny(**FAMILIES[family]).eval()
    idx = torch.randint(0, 50, (batch, prompt), generator=torch.Generator().manual_seed(7))
    greedy = [model.generate(idx, new, temperature=0, use_cache=c) for c in (True, False)]
    assert greedy[0].shape == (batch, prompt + new)
    assert torch.equal(greedy[0], greedy[1])
    sampled = [
        model.generate(idx, new, top_k=20, generator=torch.Generator().manual_seed(11), use_cache=c)
        for c in (True, False)
    ]
    assert torch.equal(sampled[0], sampled[1])
    assert not torch.equal(sampled[0], greedy[0])  # sampling did sample


def test_generation_with_a_sliding_window_rereads_the_last_block() -> None:
    """Past block_size each token depends on the last block_size tokens only, as without a
    cache: the reference is a hand-written loop over windows."""
    model = tiny(**LLAMA_GQA).eval()
    idx = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(9))
    out = model.generate(idx, 25, temperature=0)
    expected = idx
    with torch.no_grad():
        for _ in range(25):
            logits, _ = model(expected[:, -16:])
            expected = torch.cat((expected, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(out, expected)


def test_cached_generation_runs_only_the_new_token() -> None:
    """What the cache saves: after the prompt each forward reads one token, until the text
    outgrows block_size (16) and each step re-reads the last 16."""
    model = tiny().eval()
    widths: list[int] = []
    model.transformer.wte.register_forward_hook(lambda m, args, out: widths.append(out.size(1)))
    model.generate(torch.zeros((1, 5), dtype=torch.long), 30, temperature=0)
    assert widths == [5] + [1] * 11 + [16] * 18
    widths.clear()
    model.generate(torch.zeros((1, 5), dtype=torch.long), 3, temperature=0, use_cache=False)
    assert widths == [5, 6, 7]


DEEPSPEED_CHECKPOINTING = """
import sys, torch, deepspeed
from launcher.runtime.distributed import init_process_group
from model.gpt import GPT, GPTConfig
init_process_group()
deepspeed.checkpointing.configure(None, partition_activations=True)
shape = dict(n_layer=3, n_head=4, n_kv_head=2, n_embd=32, block_size=16, vocab_size=50,
             positions="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False, bias=False)
torch.manual_seed(0)
plain = GPT(GPTConfig(**shape))
checkpointed = GPT(GPTConfig(**shape, activation_checkpointing="full"))
checkpointed.load_state_dict(plain.state_dict())
checkpointed.checkpoint_fn = deepspeed.checkpointing.checkpoint
idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
losses = []
for model in (plain, checkpointed):
    _, loss = model(idx, idx)
    loss.backward()
    losses.append(loss.item())
assert losses[0] == losses[1], losses
for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
print("same", losses)
"""


def test_deepspeed_partitioned_checkpointing_with_rotary_positions() -> None:
    """DeepSpeed's partitioned activation checkpointing (zero3_offload.json) empties the tensors
    a block is given until its backward: every block needs rotary tables of its own (shared
    ones crashed the backward, after later blocks' forwards had run on emptied tables)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import free_port

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env |= {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", DEEPSPEED_CHECKPOINTING],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "same" in result.stdout, result.stderr[-3000:]
