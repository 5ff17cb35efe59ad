"""The GPT as pipeline layers (model/pipeline.py), without any process: run in order they are
the model; their state dicts, renamed, are the model's state dict; every parameter's pipeline
name and GPT name map onto each other (what checkpoints across layouts rely on)."""

from __future__ import annotations

import pytest
import torch

from model.gpt import GPT, GPTConfig
from model.pipeline import gpt_name, merge_layers, pipeline_layers, pipeline_name

GPT2 = GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=64)
LLAMA = GPTConfig(n_layer=3, n_head=4, n_kv_head=2, n_embd=32, block_size=16, vocab_size=64,
                  positions="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                  tie_embeddings=False)  # fmt: skip


@pytest.mark.parametrize("config", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_the_layers_in_order_are_the_model(config: GPTConfig) -> None:
    torch.manual_seed(0)
    model = GPT(config).eval()
    idx = torch.randint(0, config.vocab_size, (2, config.block_size))
    x = idx
    layers = pipeline_layers(model)
    for layer in layers[:-1]:
        x = layer(x)
    x = layers[-1].head(x) if config.tie_embeddings else layers[-1](x)
    torch.testing.assert_close(x, model(idx)[0], rtol=0, atol=0)


@pytest.mark.parametrize("config", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_layer_states_renamed_are_the_state_dict(config: GPTConfig) -> None:
    model = GPT(config)
    layers = pipeline_layers(model)
    n = len(layers) - (1 if config.tie_embeddings else 0)  # the tied head is not saved twice
    merged = merge_layers({i: layers[i].state_dict() for i in range(n)}, config)
    whole = model.state_dict()
    assert merged.keys() == whole.keys()
    assert all(merged[k] is whole[k] or torch.equal(merged[k], whole[k]) for k in whole)


@pytest.mark.parametrize("config", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_pipeline_and_gpt_names_map_onto_each_other(config: GPTConfig) -> None:
    names = [name for name, _ in GPT(config).named_parameters()]  # the tied head once
    piped = [pipeline_name(name, config) for name in names]
    assert None not in piped and len(set(piped)) == len(names)
    assert [gpt_name(p, config) for p in piped] == names
    assert gpt_name("transformer.h.0.ln_1.weight", config) == "transformer.h.0.ln_1.weight"
    if config.tie_embeddings:
        assert pipeline_name("lm_head.weight", config) is None
        assert piped[0] == "tied_modules.embed.wte.weight"
    # DeepSpeed names a stage's parameters by layer index: the same names at any stage count.
    assert (
        pipeline_name("transformer.h.2.attn.c_attn.weight", config) == "4.block.attn.c_attn.weight"
    )
