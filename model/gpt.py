"""The GPT decoder: GPT-2 (learned positions, LayerNorm, GELU, tied embeddings) and the Llama
family (rotary positions, RMSNorm, SwiGLU, grouped-query attention, untied, no biases), one
pre-norm block with each choice a field of GPTConfig.

Kept free of DeepSpeed and of the launcher so it can be read, tested and reused on its own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from model.init import Materializer, initial_value, parameter_names, stored_value

POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
CHECKPOINTING = ("none", "full", "every_n")


GENERATION_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
"""SDPA's kernels while generating: not cuDNN's, which builds a plan for every new shape (tens
of ms on an H200) and generation brings a new length every token: 72 ms a token for GPT-2 124M
with the KV cache, against 4 ms without cuDNN (measured on an H200, torch 2.11)."""


@dataclass
class GPTConfig:
    """Shape of the model. GPT-2 names, so every reader already knows them; every field's default
    is GPT-2's, and the Llama family is rope + rmsnorm + swiglu + n_kv_head + untied, no bias."""

    n_layer: int = 6
    """Number of transformer blocks."""
    n_head: int = 6
    """Attention (query) heads per block; must divide n_embd."""
    n_embd: int = 384
    """Width of the residual stream."""
    block_size: int = 256
    """Context length in tokens."""
    vocab_size: int | None = None
    """Embedding rows; null = the dataset tokenizer's vocabulary, padded up to a multiple of 64."""
    dropout: float = 0.0
    """Dropout on attention weights, residual branches and embeddings (0 for pretraining)."""
    bias: bool = True
    """Biases in Linear and LayerNorm layers, as in GPT-2 (Llama has none)."""
    n_kv_head: int | None = None
    """Key/value heads: grouped-query attention when fewer than n_head (must divide it; 1 is
    multi-query); null = n_head (GPT-2's multi-head attention)."""
    positions: str = "learned"
    """learned (GPT-2: a table of block_size position embeddings) | rope (rotary, Llama)."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies (positions: rope); Llama-2 10000, Llama-3 500000."""
    norm: str = "layernorm"
    """layernorm (GPT-2) | rmsnorm (Llama)."""
    norm_eps: float = 1e-5
    """Epsilon of every norm (GPT-2 1e-5; Llama-2 1e-5, TinyLlama 1e-5, Llama-3 1e-5)."""
    mlp: str = "gelu"
    """gelu (GPT-2: GELU, tanh approximation) | swiglu (Llama: SiLU-gated, three matrices)."""
    intermediate_size: int | None = None
    """MLP hidden width; null = 4 * n_embd (gelu) or Llama's 8/3 * n_embd rounded up to a
    multiple of 256 (swiglu)."""
    tie_embeddings: bool = True
    """The output head shares the token embedding's matrix (GPT-2); false = its own (Llama)."""
    activation_checkpointing: str = "none"
    """none | full (every block) | every_n (every activation_checkpointing_n-th block): keep only
    block inputs for backward and recompute the rest, trading compute for memory."""
    activation_checkpointing_n: int = 2
    """For every_n: checkpoint blocks 0, n, 2n, ..."""

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def ffn_size(self) -> int:
        """The MLP's hidden width."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        if self.mlp == "swiglu":
            return 256 * -(-(8 * self.n_embd // 3) // 256)
        return 4 * self.n_embd

    def checkpointed(self, layer: int) -> bool:
        """Whether block `layer` recomputes its activations in backward."""
        policy = self.activation_checkpointing
        if policy == "full":
            return True
        return policy == "every_n" and layer % self.activation_checkpointing_n == 0


def shape_problems(config: GPTConfig) -> list[str]:
    """Every way the fields fail to describe a buildable model, one line each (field names as in
    the spec's model section)."""
    c, problems = config, []
    choices = {
        "positions": POSITIONS,
        "norm": NORMS,
        "mlp": MLPS,
        "activation_checkpointing": CHECKPOINTING,
    }
    for key, allowed in choices.items():
        if getattr(c, key) not in allowed:
            problems.append(f"{key}: {getattr(c, key)!r} is not one of {', '.join(allowed)}")
    if c.n_head >= 1 and c.n_embd % c.n_head:
        problems.append(f"n_head: {c.n_head} does not divide n_embd={c.n_embd}")
    if c.n_kv_head is not None and c.n_head >= 1 and c.n_kv_head >= 1 and c.n_head % c.n_kv_head:
        problems.append(
            f"n_kv_head: {c.n_kv_head} does not divide n_head={c.n_head} (each key/value head "
            "serves an equal group of query heads)"
        )
    if c.n_kv_head is not None and c.n_kv_head < 1:
        problems.append(f"n_kv_head: must be >= 1 or null, got {c.n_kv_head}")
    if c.positions == "rope" and c.n_head >= 1 and (c.n_embd // c.n_head) % 2:
        problems.append(
            f"positions: rope rotates pairs of dimensions, but the head size "
            f"n_embd/n_head = {c.n_embd // c.n_head} is odd"
        )
    if not c.rope_theta > 0:
        problems.append(f"rope_theta: must be > 0, got {c.rope_theta}")
    if not c.norm_eps > 0:
        problems.append(f"norm_eps: must be > 0, got {c.norm_eps}")
    if c.intermediate_size is not None and c.intermediate_size < 1:
        problems.append(f"intermediate_size: must be >= 1 or null, got {c.intermediate_size}")
    return problems


# ------------------------------------------------------------------------------ the blocks


def rope_tables(config: GPTConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of the rotary angles, (T, head_dim) in fp32, in Hugging Face Llama's layout
    (the two halves of a head rotate together), so its checkpoints load without permutation."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float() / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    angles = torch.outer(positions.float(), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, head_dim) queries or keys by their positions' angles."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 whatever the activations' precision (as Llama)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class KVCache:
    """Keys and values of every layer for generation, allocated once for max_len positions at
    the first forward (in the model's dtype and device); `length` positions are filled."""

    def __init__(self, n_layer: int, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's keys/values after the filled ones; all of them so far."""
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions; {end} needed")
        if self.keys[layer] is None:
            B, H, _, D = k.shape
            self.keys[layer] = k.new_empty(B, H, self.max_len, D)
            self.values[layer] = v.new_empty(B, H, self.max_len, D)
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, self.length : end] = k
        values[:, :, self.length : end] = v
        return keys[:, :, :end], values[:, :, :end]


class CausalSelfAttention(nn.Module):
    """Multi-head, grouped-query or multi-query attention; q, k and v from one fused matrix
    (rows: n_head query heads, then n_kv_head key heads, then n_kv_head value heads)."""

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        qkv = (config.n_head + 2 * config.kv_heads) * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.sequence_mixer: Callable | None = None
        """Set by a launcher for sequence parallelism: takes this rank's slice of the sequence
        as q, k, v (B, heads, T / ranks, d) and returns attention over the whole sequence for
        it (calling `core` on whole sequences of some heads); None = `core` here."""

    def core(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = True,
    ) -> torch.Tensor:
        """Attention of (B, heads, T, d) queries over keys and values (B, kv heads, T', d)."""
        # SDPA picks flash / memory-efficient kernels on GPUs where they apply; with fewer
        # key/value heads each serves n_head / n_kv_head query heads without being copied.
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal,
            enable_gqa=k.size(1) != q.size(1),
        )

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        d = self.head_dim
        sizes = [self.n_head * d, self.n_kv_head * d, self.n_kv_head * d]
        q, k, v = self.c_attn(x).split(sizes, dim=2)
        # (B, T, heads * d) -> (B, heads, T, d)
        q = q.view(B, T, self.n_head, d).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, d).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, d).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        mask, causal = None, True
        if cache is not None and cache.length:
            past = cache.length
            k, v = cache.append(self.layer, k, v)
            causal = False  # one new token sees every cached one; a chunk needs its own mask
            if T > 1:
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
        elif cache is not None:
            k, v = cache.append(self.layer, k, v)
        if self.sequence_mixer is not None and cache is None:
            y = self.sequence_mixer(q, k, v)
        else:
            y = self.core(q, k, v, mask, causal)
        # n_head * d is C, or this rank's share of it under tensor parallelism.
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * d)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GPT-2's GELU MLP, or Llama's SwiGLU: silu(gate) * up, with gate and up fused in c_fc
    (rows: gate, then up)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.gated = config.mlp == "swiglu"
        hidden = config.ffn_size
        self.c_fc = nn.Linear(config.n_embd, (2 if self.gated else 1) * hidden, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = self.gelu(h)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None = None,
        sin: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        rope = None if cos is None else (cos, sin)
        x = x + self.attn(self.ln_1(x), rope, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("GPTConfig.vocab_size must be resolved to an int before building GPT")
        problems = shape_problems(config)
        if problems:
            raise ValueError("; ".join(problems))
        self.config = config
        self.position_offset = 0
        """Position of idx's first token: this rank's slice of the sequence under sequence
        parallelism (set by the launcher); 0 otherwise."""
        # Swappable so a launcher can use DeepSpeed's (partitioned, CPU-offloaded) checkpointing.
        self.checkpoint_fn: Callable = functools.partial(checkpoint, use_reentrant=False)
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.positions == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules["drop"] = nn.Dropout(config.dropout)
        modules["h"] = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        modules["ln_f"] = make_norm(config)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:  # weight tying, as GPT-2
            self.transformer.wte.weight = self.lm_head.weight
        if not self.lm_head.weight.is_meta:
            self.init_weights(torch.initial_seed())

    def init_weights(self, seed: int) -> None:
        """Every parameter drawn anew from `seed` (model/init.py: each from its own generator, so
        the values do not depend on the order of construction or on how the model is later
        split). GPT(config) draws from torch's seed: torch.manual_seed(s) then GPT(config) gives
        the weights a launch with train.seed=s starts from on the CPU."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(initial_value(name, p.shape, self.config.n_layer, seed, p.device))

    @classmethod
    def from_state(
        cls, config: GPTConfig, state: Mapping[str, Any], device: torch.device | None = None
    ) -> GPT:
        """The model holding `state`'s weights (the whole model's state dict; values may be
        tensors or lazy ones with `.contiguous()`), in fp32 on `device` (default the CPU): built
        on the meta device and made one tensor at a time, with no random draw and no second
        copy of the model. A tied matrix is read once, under its first name."""
        with torch.device("meta"):
            model = cls(config)
        value = lambda name, param: stored_value(state, name, param.shape, device)  # noqa: E731
        Materializer(parameter_names(model), value)(model)
        return model

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; tied weights counted once. non_embedding drops the lookup tables
        (position embeddings, and the token embedding unless it is also the output head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position; with targets, also the mean cross-entropy loss. With a
        cache, idx continues the positions it holds (generation)."""
        start = self.position_offset if cache is None else cache.length
        T = idx.size(1)
        if self.config.block_size < start + T:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds block_size={self.config.block_size}"
            )
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx)
        rope: tuple[torch.Tensor, ...] = ()
        if self.config.positions == "learned":
            x = x + self.transformer.wpe(pos)
        else:
            rope = rope_tables(self.config, pos)
        x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            if self.training and torch.is_grad_enabled() and self.config.checkpointed(layer):
                # Each block gets its own copy of the rotary tables: DeepSpeed's partitioned and
                # CPU checkpointing empty the tensors passed in until that block's backward.
                x = self.checkpoint_fn(block, x, *(t.clone() for t in rope))
            else:
                x = block(x, *rope, cache=cache) if rope else block(x, cache=cache)
        if cache is not None:
            cache.length += T
        return self.output(self.transformer.ln_f(x), targets)

    def output(
        self, x: torch.Tensor, targets: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head: logits of the final hidden states and, with targets, the mean cross-entropy.
        Tensor parallelism overrides this hook (its loss works on vocabulary shards)."""
        logits = self.lm_head(x)
        return logits, None if targets is None else self.loss(logits, targets)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy of the head's logits, in fp32 even when the model runs in
        bf16/fp16 (tensor parallelism overrides it: its logits are vocabulary shards)."""
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        vocab_limit: int | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Autoregressive sampling; idx is (B, T) token ids, returns (B, T + max_new_tokens).

        With the cache each step runs only the new token; once the text outgrows block_size the
        window slides and each step re-reads the last block_size tokens (as without a cache).
        vocab_limit keeps sampling to the tokenizer's ids when the embedding is padded past them.
        """
        block = self.config.block_size
        cache = None
        with sdpa_kernel(GENERATION_ATTENTION):
            for _ in range(max_new_tokens):
                if use_cache and idx.size(1) <= block:
                    cache = cache or KVCache(self.config.n_layer, block)
                    logits, _ = self(idx[:, cache.length :], cache=cache)
                else:
                    logits, _ = self(idx[:, -block:])
                last = logits[:, -1, :vocab_limit].float()
                idx = torch.cat((idx, self._pick(last, temperature, top_k, generator)), dim=1)
        return idx

    @staticmethod
    def _pick(
        logits: torch.Tensor,
        temperature: float,
        top_k: int | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """The next token of each row: greedy at temperature 0, else sampled (top-k)."""
        if temperature <= 0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
            logits[logits < kth] = -float("inf")
        probs = F.softmax(logits, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator)


def count_params(config: GPTConfig, non_embedding: bool = False) -> int:
    """Parameters of a model shape, counted on the meta device (any size, no memory)."""
    with torch.device("meta"):
        return GPT(config).num_params(non_embedding=non_embedding)


def flops_per_token(config: GPTConfig) -> int:
    """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12*L*H*Q*T.

    N is the non-embedding parameter count (which includes the output head, tied or not), L
    layers, H query heads, Q head dimension, T context length.
    """
    head_dim = config.n_embd // config.n_head
    attention = 12 * config.n_layer * config.n_head * head_dim * config.block_size
    return 6 * count_params(config, non_embedding=True) + attention


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay for matrices (Linear weights), none for biases, norms, embeddings."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied tensor once
        if not p.requires_grad:
            continue
        # A parameter partitioned by ZeRO-3 is flat and empty; `ds_shape` keeps its shape.
        matrix = len(getattr(p, "ds_shape", p.shape)) >= 2
        (decay if matrix and id(p) not in embeddings else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def recompute_fraction(config: GPTConfig) -> float:
    """Share of the blocks whose forward runs again in backward (for HFU)."""
    return sum(config.checkpointed(i) for i in range(config.n_layer)) / config.n_layer
