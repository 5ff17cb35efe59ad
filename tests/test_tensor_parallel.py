"""Tensor parallelism (model/tensor_parallel.py): a GPT split over 2 real gloo processes gives
the full model's loss, logits, gradient slices and AdamW trajectory, for a GPT-2-style and a
Llama-style shape; shard_state and merge_states are inverses; tp_problems lists every problem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.gpt import GPT, GPTConfig
from model.tensor_parallel import (
    TensorParallelGPT,
    TPGroup,
    merge_states,
    parallelize,
    shard_state,
    split_layout,
    tp_problems,
)

TINY = dict(n_layer=2, n_embd=64, block_size=32, vocab_size=128, dropout=0.0)
CONFIGS = {
    "gpt2": GPTConfig(n_head=4, **TINY),  # bias, learned positions, layernorm, gelu, tied
    "llama": GPTConfig(
        n_head=4,
        n_kv_head=2,
        positions="rope",
        norm="rmsnorm",
        mlp="swiglu",
        tie_embeddings=False,
        bias=False,
        **TINY,
    ),
}
STEPS = 5


def full_model(config: GPTConfig) -> GPT:
    torch.manual_seed(0)  # every rank builds the same whole model
    return GPT(config)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 128, (2, 32), generator=g)
    targets = torch.randint(0, 128, (2, 32), generator=g)
    targets[0, :3] = -100  # F.cross_entropy leaves these out of the mean
    return idx, targets


def adamw_losses(model: GPT) -> list[float]:
    """The loss before each of STEPS AdamW steps and after the last."""
    idx, targets = batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        _, loss = model(idx, targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(model(idx, targets)[1].item())
    return losses


def run(model: GPT) -> dict[str, Any]:
    """Everything the tests compare, from one (full or sharded) model."""
    idx, targets = batch()
    out: dict[str, Any] = {"state": {k: v.clone() for k, v in model.state_dict().items()}}
    logits, loss = model(idx, targets)
    loss.backward()
    out["logits"], out["loss"] = logits.detach(), loss.item()
    out["grads"] = {name: p.grad.clone() for name, p in model.named_parameters()}
    out["marked"] = {
        name: p.partition_dim
        for name, p in model.named_parameters()
        if getattr(p, "tensor_model_parallel", False)
    }
    if isinstance(model, TensorParallelGPT):
        model.gather_logits = True
        with torch.no_grad():
            out["gathered"], out["gathered_loss"] = model(idx, targets)
        model.gather_logits = False
    out["sample"] = model.generate(idx[:, :4], 8, temperature=0)
    out["losses"] = adamw_losses(model)
    return out


def _worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    tp = TPGroup(dist.new_group([0, 1]), rank, 2)
    out = {family: run(parallelize(full_model(c), tp)) for family, c in CONFIGS.items()}
    torch.save(out, f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("tp")
    mp.spawn(_worker, args=(str(tmp),), nprocs=2, join=True)
    return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def full() -> dict[str, dict[str, Any]]:
    return {family: run(full_model(c)) for family, c in CONFIGS.items()}


@pytest.mark.parametrize("family", CONFIGS)
def test_split_model_gives_the_full_loss_and_logits(family, ranks, full) -> None:
    ref = full[family]
    for rank, out in enumerate(ranks):
        got = out[family]
        assert got["loss"] == pytest.approx(ref["loss"], abs=1e-6)
        assert got["gathered_loss"].item() == pytest.approx(ref["loss"], abs=1e-6)
        # By default each rank holds its vocabulary slice of the logits; gathered, all of them.
        own = ref["logits"][..., rank * 64 : (rank + 1) * 64]
        torch.testing.assert_close(got["logits"], own, rtol=0, atol=1e-5)
        torch.testing.assert_close(got["gathered"], ref["logits"], rtol=0, atol=1e-5)
        assert torch.equal(got["sample"], ref["sample"])  # greedy decoding with the KV cache


@pytest.mark.parametrize("family", CONFIGS)
def test_gradients_are_slices_of_the_full_gradients(family, ranks, full) -> None:
    config, ref = CONFIGS[family], full[family]
    for rank, out in enumerate(ranks):
        expected = shard_state(ref["grads"], config, rank, 2)
        got = out[family]["grads"]
        assert got.keys() == expected.keys()
        for name, grad in got.items():
            torch.testing.assert_close(grad, expected[name], rtol=0, atol=1e-5, msg=name)
    for name in ranks[0][family]["grads"]:
        if split_layout(name, config) is None:  # replicated: identical on both ranks
            torch.testing.assert_close(
                ranks[0][family]["grads"][name], ranks[1][family]["grads"][name]
            )


@pytest.mark.parametrize("family", CONFIGS)
def test_adamw_steps_keep_the_full_models_losses(family, ranks, full) -> None:
    # The first losses agree to fp32's summation order; by the last steps Adam has amplified
    # it (at lr 1e-2 a gradient near zero whose sign flips moves its weight by a whole step):
    # 6e-5 seen, against the 0.1 nats these steps learn.
    for out in ranks:
        assert out[family]["losses"][:3] == pytest.approx(full[family]["losses"][:3], abs=1e-5)
        assert out[family]["losses"] == pytest.approx(full[family]["losses"], abs=2e-4)
    assert full[family]["losses"][-1] < full[family]["losses"][0] - 0.1  # the steps did learn


@pytest.mark.parametrize("family", CONFIGS)
def test_parallelize_keeps_shard_state_and_marks_every_split_parameter(family, ranks, full) -> None:
    config = CONFIGS[family]
    for rank, out in enumerate(ranks):
        expected = shard_state(full[family]["state"], config, rank, 2)
        state = out[family]["state"]
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in state)
        split = {
            name: split_layout(name, config)[0]
            for name in out[family]["grads"]
            if split_layout(name, config) is not None
        }
        assert out[family]["marked"] == split
    assert not full[family]["marked"]


def test_marks_survive_a_cast_and_are_what_deepspeed_reads() -> None:
    from deepspeed.runtime.utils import is_model_parallel_parameter

    config = CONFIGS["gpt2"]
    model = parallelize(full_model(config), TPGroup(None, 1, 2))  # no communication to build
    model.to(torch.bfloat16)  # as DeepSpeed does for bf16 training
    params = dict(model.named_parameters())
    assert is_model_parallel_parameter(params["transformer.h.0.attn.c_attn.weight"])
    assert params["transformer.h.0.mlp.c_proj.weight"].partition_dim == 1
    assert not is_model_parallel_parameter(params["transformer.h.0.mlp.c_proj.bias"])
    assert not is_model_parallel_parameter(params["transformer.wpe.weight"])
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied, rows 64..127
    assert model.lm_head.weight.shape == (64, 64)
    assert model.transformer.h[0].attn.c_attn.weight.shape == (3 * 32, 64)


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("family", CONFIGS)
def test_merge_states_inverts_shard_state(family, size) -> None:
    config = CONFIGS[family]
    state = full_model(config).state_dict()
    shards = [shard_state(state, config, r, size) for r in range(size)]
    c_attn = shards[0]["transformer.h.0.attn.c_attn.weight"]
    assert c_attn.shape == ((config.n_head + 2 * config.kv_heads) * 16 // size, 64)
    merged = merge_states(shards, config)
    assert merged.keys() == state.keys()
    assert all(torch.equal(merged[k], state[k]) for k in state)


def test_shards_hold_each_ranks_query_key_and_value_heads() -> None:
    config = CONFIGS["llama"]  # 4 query heads, 2 key/value heads of 16 rows each
    full_qkv = torch.arange(8 * 16).float().unsqueeze(1)
    name = "transformer.h.0.attn.c_attn.weight"
    rank1 = shard_state({name: full_qkv}, config, 1, 2)[name].squeeze(1)
    rows = list(range(32, 64)) + list(range(80, 96)) + list(range(112, 128))
    assert rank1.tolist() == rows  # query heads 2-3, key head 1, value head 1


def test_tp_problems_lists_every_problem_together() -> None:
    config = GPTConfig(n_head=6, n_kv_head=3, n_embd=96, vocab_size=130, intermediate_size=90)
    problems = tp_problems(config, 4)
    assert len(problems) == 4, problems
    assert problems[0] == (
        "model.n_head=6 is not divisible by parallel.tensor=4: use a tensor size dividing 6 "
        "(1, 2, 3, 6)"
    )
    assert problems[1].startswith("model.n_kv_head=3 is not divisible by parallel.tensor=4")
    assert "model.vocab_size=130" in problems[2] and "pad it to 132" in problems[2]
    assert "set model.intermediate_size=92" in problems[3]
    for config in CONFIGS.values():
        assert tp_problems(config, 2) == [] and tp_problems(config, 1) == []
    assert len(tp_problems(CONFIGS["llama"], 4)) == 1  # 2 key/value heads
    with pytest.raises(ValueError, match="n_kv_head=2"):
        parallelize(full_model(CONFIGS["llama"]), TPGroup(None, 0, 4))


def test_one_rank_leaves_the_model_as_it_is() -> None:
    model = full_model(CONFIGS["gpt2"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert parallelize(model, TPGroup(None, 0, 1)) is model
    assert type(model) is GPT and not hasattr(model, "gather_logits")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
