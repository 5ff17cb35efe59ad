"""The GPT: GPT-2's shapes and parameter count, causality, FLOPs, weight-decay groups."""

from __future__ import annotations

import pytest
import torch

from model.gpt import GPT, GPTConfig, count_params, flops_per_token, param_groups

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
