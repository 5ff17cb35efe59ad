"""Megatron-style tensor parallelism for GPT (Shoeybi et al. 2019, "Megatron-LM").

Each block runs as two tensor-parallel regions, attention and MLP. A region's first matrix is
split by output rows (column-parallel: c_attn takes this rank's query, key and value heads,
mlp.c_fc its hidden units) and its second by input columns (row-parallel: attn.c_proj and
mlp.c_proj), so a rank computes its heads and hidden units with no communication and one
all-reduce sums the partial outputs. The token embedding and the output head are split by
vocabulary rows, and the loss is computed on the vocabulary shards of the logits.

Replicated parameters (norms, wpe, row-parallel biases, the rest of the residual stream's
weights) need no extra communication, as there is no sequence parallelism here: every value
outside a region is the same on every rank (each region ends in an all-reduce), and so is
every gradient that flows into it, because each region begins with `copy_to_region`, whose
backward all-reduces the partial input gradients of the rank's heads or hidden units. Identical
inputs and identical output gradients give identical replicated gradients on every rank.

Dropout inside a region (attention weights) draws the same masks on every rank when the ranks
of a group share their seed, which they must for the residual dropout to stay identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F

from model.gpt import GPT, GPTConfig

IGNORE_INDEX = -100  # F.cross_entropy's default: targets to leave out of the mean


@dataclass
class TPGroup:
    """This rank's tensor-parallel group: torch.distributed group (None when size == 1), rank
    in it, size."""

    group: Any
    rank: int
    size: int


# ------------------------------------------------------------------ communication (autograd)


def _all_reduce(x: torch.Tensor, group: Any) -> torch.Tensor:
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


class _CopyToRegion(torch.autograd.Function):
    """Forward identity; backward sums the input gradients of every rank's part of the region."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    """Forward all-reduce of the ranks' partial outputs; backward identity."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _GatherFromRegion(torch.autograd.Function):
    """Forward all-gather along the last dimension; backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, rank: int, size: int) -> torch.Tensor:
        ctx.rank, ctx.size = rank, size
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return grad.chunk(ctx.size, dim=-1)[ctx.rank].contiguous(), None, None, None


def copy_to_region(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return _CopyToRegion.apply(x, tp.group)


def reduce_from_region(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return _ReduceFromRegion.apply(x, tp.group)


def gather_from_region(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return _GatherFromRegion.apply(x, tp.group, tp.rank, tp.size)


# ------------------------------------------------------------------ how each matrix is split


def split_layout(name: str, config: GPTConfig) -> tuple[int, list[int]] | None:
    """How the state-dict entry `name` is split: (dimension, sizes of its fused sections along
    it, each cut into `size` equal parts), or None when it is replicated."""
    d, ffn = config.head_dim, config.ffn_size
    fc = [ffn, ffn] if config.mlp == "swiglu" else [ffn]
    if name in ("transformer.wte.weight", "lm_head.weight"):
        return 0, [config.vocab_size]
    if name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
        return 0, [config.n_head * d, config.kv_heads * d, config.kv_heads * d]
    if name.endswith(("mlp.c_fc.weight", "mlp.c_fc.bias")):
        return 0, fc
    if name.endswith("attn.c_proj.weight"):
        return 1, [config.n_embd]
    if name.endswith("mlp.c_proj.weight"):
        return 1, [ffn]
    return None


def shard_tensor(
    full: torch.Tensor, layout: tuple[int, list[int]], rank: int, size: int
) -> torch.Tensor:
    """Rank `rank`'s shard: its part of every fused section, the sections kept in order."""
    dim, sections = layout
    parts = [section.chunk(size, dim)[rank] for section in full.split(sections, dim)]
    return torch.cat(parts, dim)


def merge_tensor(shards: list[torch.Tensor], layout: tuple[int, list[int]]) -> torch.Tensor:
    """The inverse of shard_tensor over every rank's shard."""
    dim, sections = layout
    size = len(shards)
    local = [s // size for s in sections]
    per_rank = [shard.split(local, dim) for shard in shards]
    merged = [torch.cat([parts[i] for parts in per_rank], dim) for i in range(len(sections))]
    return torch.cat(merged, dim)


def shard_state(
    full: dict[str, torch.Tensor], config: GPTConfig, rank: int, size: int
) -> dict[str, torch.Tensor]:
    """A full state dict -> the state dict of TP rank `rank` of `size` (what parallelize keeps):
    the same names, split tensors cut to this rank's part, replicated ones as they are."""
    out = {}
    for name, tensor in full.items():
        layout = split_layout(name, config)
        out[name] = tensor if layout is None else shard_tensor(tensor, layout, rank, size)
    return out


def merge_states(
    shards: list[dict[str, torch.Tensor]], config: GPTConfig
) -> dict[str, torch.Tensor]:
    """The TP ranks' state dicts (in rank order) -> the full model's state dict (inverse of
    shard_state); replicated tensors are taken from rank 0."""
    out = {}
    for name, tensor in shards[0].items():
        layout = split_layout(name, config)
        out[name] = tensor if layout is None else merge_tensor([s[name] for s in shards], layout)
    return out


# ------------------------------------------------------------------ validation


def _divisors(n: int) -> str:
    found = [d for d in range(1, n + 1) if n % d == 0]
    shown = found if len(found) <= 8 else found[:7] + ["..."]
    return ", ".join(map(str, shown))


def tp_problems(config: GPTConfig, tp: int) -> list[str]:
    """Every reason a GPTConfig cannot be split `tp` ways, one message each naming the field,
    the values and a fix. Empty if fine."""
    if tp < 1:
        return [f"parallel.tensor={tp}: must be >= 1"]
    ffn = config.ffn_size
    ffn_up = -(-ffn // tp) * tp
    checks = [(f"model.n_head={config.n_head}", config.n_head, "")]
    if config.n_kv_head is not None:
        checks.append((f"model.n_kv_head={config.n_kv_head}", config.n_kv_head, ""))
    if config.vocab_size is not None:
        vocab_up = -(-config.vocab_size // tp) * tp
        fix = f"pad it to {vocab_up}, or "
        checks.append((f"model.vocab_size={config.vocab_size}", config.vocab_size, fix))
    if config.intermediate_size is None:
        label = f"the MLP width {ffn} (model.intermediate_size=null)"
    else:
        label = f"model.intermediate_size={ffn}"
    checks.append((label, ffn, f"set model.intermediate_size={ffn_up}, or "))
    return [
        f"{label} is not divisible by parallel.tensor={tp}: {fix}use a tensor size dividing "
        f"{value} ({_divisors(value)})"
        for label, value, fix in checks
        if value >= 1 and value % tp
    ]


# ------------------------------------------------------------------ the split layers


def mark_split(param: nn.Parameter, dim: int) -> nn.Parameter:
    """Megatron's attributes: DeepSpeed's is_model_parallel_parameter reads
    tensor_model_parallel, so gradient norms count a split parameter on every rank of the group
    and a replicated one once (on tensor rank 0). partition_dim is the dimension it is cut on."""
    param.tensor_model_parallel = True
    param.partition_dim = dim
    return param


def _split_param(full: torch.Tensor, layout: tuple[int, list[int]], tp: TPGroup) -> nn.Parameter:
    shard = shard_tensor(full.detach(), layout, tp.rank, tp.size)
    return mark_split(nn.Parameter(shard, requires_grad=full.requires_grad), layout[0])


class ColumnParallelLinear(nn.Linear):
    """A Linear keeping this rank's output rows (of each fused section); its input gradient is
    summed over the group."""

    def __init__(
        self,
        full: nn.Linear,
        sections: list[int],
        tp: TPGroup,
        weight: nn.Parameter | None = None,
    ) -> None:
        kwargs = dict(device="meta", dtype=full.weight.dtype)
        out_features = full.out_features // tp.size
        super().__init__(full.in_features, out_features, full.bias is not None, **kwargs)
        self.tp = tp
        self.weight = weight if weight is not None else _split_param(full.weight, (0, sections), tp)
        if full.bias is not None:
            self.bias = _split_param(full.bias, (0, sections), tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_region(x, self.tp), self.weight, self.bias)


class RowParallelLinear(nn.Linear):
    """A Linear keeping this rank's input columns; the ranks' partial outputs are summed, then
    the (replicated) bias added once."""

    def __init__(self, full: nn.Linear, tp: TPGroup) -> None:
        kwargs = dict(device="meta", dtype=full.weight.dtype)
        in_features = full.in_features // tp.size
        super().__init__(in_features, full.out_features, full.bias is not None, **kwargs)
        self.tp = tp
        self.weight = _split_param(full.weight, (1, [full.in_features]), tp)
        self.bias = full.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_region(F.linear(x, self.weight), self.tp)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """This rank's rows of the token embedding: ids of other ranks' rows give zeros here, and
    the sum over the group is every id's row."""

    def __init__(self, full: nn.Embedding, tp: TPGroup) -> None:
        weight = _split_param(full.weight, (0, [full.num_embeddings]), tp)
        super().__init__(weight.size(0), full.embedding_dim, _weight=weight)
        self.weight = weight  # keep the marked Parameter itself
        self.tp = tp
        self.vocab_start = tp.rank * weight.size(0)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        local = idx - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_region(out, self.tp)


# ------------------------------------------------------------------ the loss and the model


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, tp: TPGroup
) -> torch.Tensor:
    """The mean cross-entropy from this rank's vocabulary shard of the logits, in fp32: the
    maximum, the sum of exponentials and the target's logit are reduced over the group, so the
    result (and its gradient) is the full logits' F.cross_entropy."""
    shard = logits.size(-1)
    logits = logits.float().reshape(-1, shard)
    targets = targets.reshape(-1)
    with torch.no_grad():  # any shift gives the same loss and gradient; the max keeps exp finite
        peak = logits.max(dim=-1).values
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=tp.group)
    shifted = logits - peak.unsqueeze(-1)
    sum_exp = reduce_from_region(shifted.exp().sum(dim=-1), tp)
    local = targets - tp.rank * shard
    mine = (local >= 0) & (local < shard)
    picked = shifted.gather(1, local.clamp(0, shard - 1).unsqueeze(1)).squeeze(1)
    picked = reduce_from_region(torch.where(mine, picked, 0.0), tp)
    per_token = sum_exp.log() - picked
    counted = targets != IGNORE_INDEX
    return torch.where(counted, per_token, 0.0).sum() / counted.sum()


class TensorParallelGPT(GPT):
    """What parallelize turns a GPT into (its class is swapped in place, as torch's
    fully_shard does): the head returns this rank's vocabulary shard of the logits, or the
    whole logits when gather_logits is set, and the loss is the vocabulary-parallel one."""

    tp: TPGroup
    gather_logits: bool

    def output(
        self, x: torch.Tensor, targets: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, loss = super().output(x, targets)
        if self.gather_logits:
            logits = gather_from_region(logits, self.tp)
        return logits, loss

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, targets, self.tp)

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """GPT.generate with the whole logits (every rank must pass the same generator state,
        so that they sample the same tokens)."""
        before, self.gather_logits = self.gather_logits, True
        try:
            return super().generate(*args, **kwargs)
        finally:
            self.gather_logits = before


def _parallelize_block(block: nn.Module, config: GPTConfig, tp: TPGroup) -> None:
    attn, mlp, d = block.attn, block.mlp, config.head_dim
    qkv = [config.n_head * d, config.kv_heads * d, config.kv_heads * d]
    attn.c_attn = ColumnParallelLinear(attn.c_attn, qkv, tp)
    attn.c_proj = RowParallelLinear(attn.c_proj, tp)
    attn.n_head, attn.n_kv_head = config.n_head // tp.size, config.kv_heads // tp.size
    fc = [config.ffn_size] * (2 if config.mlp == "swiglu" else 1)
    mlp.c_fc = ColumnParallelLinear(mlp.c_fc, fc, tp)
    mlp.c_proj = RowParallelLinear(mlp.c_proj, tp)


def parallelize(model: GPT, tp: TPGroup) -> GPT:
    """In place: the full, initialised model (the same weights on every rank) keeps only this
    rank's shard of every split matrix (what shard_state gives), each marked for DeepSpeed's
    gradient norm; attention runs this rank's heads, and the loss is the vocabulary-parallel
    cross-entropy. forward returns this rank's vocabulary shard of the logits unless
    model.gather_logits is set. A model with tp.size == 1 is returned unchanged."""
    if tp.size == 1:
        return model
    config = model.config
    problems = tp_problems(config, tp.size)
    if problems:
        raise ValueError("cannot split the model: " + "; ".join(problems))
    for block in model.transformer.h:
        _parallelize_block(block, config, tp)
    wte = VocabParallelEmbedding(model.transformer.wte, tp)
    tied = wte.weight if config.tie_embeddings else None
    model.lm_head = ColumnParallelLinear(model.lm_head, [config.vocab_size], tp, weight=tied)
    model.transformer.wte = wte
    model.__class__ = TensorParallelGPT
    model.tp, model.gather_logits = tp, False
    return model
