"""Initial weights drawn parameter by parameter (model/init.py): they depend on the seed and the
parameter's name only, so a rank that builds on the meta device and makes only its own tensor-
parallel shard, or one block at a time, gets exactly the whole model's values."""

from __future__ import annotations

import math

import pytest
import torch
from test_tensor_parallel import CONFIGS  # a GPT-2 and a Llama shape, 2 layers

from launcher.training.build import shard_values
from model.gpt import GPT, GPTConfig
from model.init import Materializer, initial_value, parameter_names
from model.tensor_parallel import TPGroup, parallelize, shard_state


def _seeded(config: GPTConfig, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return GPT(config).state_dict()


def _meta(config: GPTConfig) -> GPT:
    with torch.device("meta"):
        return GPT(config)


def _drawn(seed: int, config: GPTConfig):
    return lambda name, shape: initial_value(name, shape, config.n_layer, seed, torch.device("cpu"))


@pytest.mark.parametrize("family", CONFIGS)
def test_the_weights_are_the_seeds_whatever_was_drawn_before(family: str) -> None:
    config = CONFIGS[family]
    first = _seeded(config, 3)
    torch.manual_seed(3)
    torch.randn(1000)  # draws from torch's generator change nothing: each tensor has its own
    again = GPT(config).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = _seeded(config, 4)
    assert not torch.equal(first["transformer.h.0.attn.c_attn.weight"],
                           other["transformer.h.0.attn.c_attn.weight"])  # fmt: skip
    # GPT-2's rule: N(0, 0.02), residual projections / sqrt(2 n_layer), biases 0, gains 1.
    proj = first["transformer.h.1.mlp.c_proj.weight"]
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(4), rel=0.1)
    assert first["transformer.h.0.attn.c_attn.weight"].std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.all(first["transformer.ln_f.weight"] == 1)
    if config.bias:
        assert torch.all(first["transformer.h.0.mlp.c_fc.bias"] == 0)


@pytest.mark.parametrize("family", CONFIGS)
def test_a_meta_model_made_unit_by_unit_is_the_seeded_model(family: str) -> None:
    """As under ZeRO-3: one module at a time, the tied head last (made with the embedding)."""
    config = CONFIGS[family]
    model = _meta(config)
    make = Materializer(parameter_names(model), lambda name, p: _drawn(7, config)(name, p.shape))
    t = model.transformer
    for unit in [*(m for name, m in t.items() if name != "h"), *t.h]:
        make(unit)
    assert model.lm_head.weight.is_meta
    make(model.lm_head)
    assert not any(p.is_meta for p in model.parameters())
    assert (model.lm_head.weight is model.transformer.wte.weight) == config.tie_embeddings
    seeded = _seeded(config, 7)
    assert all(torch.equal(v, seeded[k]) for k, v in model.state_dict().items())
    model(torch.zeros(1, 4, dtype=torch.long))  # and it runs


@pytest.mark.parametrize("family", CONFIGS)
@pytest.mark.parametrize("rank", [0, 1])
def test_a_tensor_parallel_rank_makes_exactly_its_shard_of_the_whole_model(
    family: str, rank: int
) -> None:
    config = CONFIGS[family]
    model = _meta(config)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    tp = TPGroup(None, rank, 2)  # no communication to build
    model = parallelize(model, tp)
    value = shard_values(_drawn(11, config), shapes, config, tp)
    Materializer(parameter_names(model), value)(model)
    expected = shard_state(_seeded(config, 11), config, rank, 2)
    state = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)
    params = dict(model.named_parameters())
    assert params["transformer.h.0.attn.c_attn.weight"].tensor_model_parallel  # marks kept
    assert params["transformer.h.0.mlp.c_proj.weight"].partition_dim == 1
    assert (model.lm_head.weight is model.transformer.wte.weight) == config.tie_embeddings


@pytest.mark.parametrize("family", CONFIGS)
def test_a_model_from_a_state_dict_holds_it_tied_and_refuses_what_does_not_fit(family) -> None:
    config = CONFIGS[family]
    state = _seeded(config, 5)
    model = GPT.from_state(config, state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert (model.lm_head.weight is model.transformer.wte.weight) == config.tie_embeddings
    with pytest.raises(ValueError, match=r"the weights have no transformer\.ln_f\.weight"):
        GPT.from_state(config, {k: v for k, v in state.items() if k != "transformer.ln_f.weight"})
    wrong = {**state, "transformer.h.1.mlp.c_proj.weight": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=r"c_proj.weight is \(3, 3\), the model's \(64, "):
        GPT.from_state(config, wrong)
