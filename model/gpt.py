"""GPT-2 architecture: learned positions, pre-LayerNorm, GELU (tanh), tied embeddings.

Kept free of DeepSpeed and of the launcher so it can be read, tested and reused on its own.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    """Shape of the model. GPT-2 names, so every reader already knows them."""

    n_layer: int = 6
    """Number of transformer blocks."""
    n_head: int = 6
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 384
    """Width of the residual stream."""
    block_size: int = 256
    """Context length in tokens (learned position embeddings of this many rows)."""
    vocab_size: int | None = None
    """Embedding rows; null = the dataset tokenizer's vocabulary, padded up to a multiple of 64."""
    dropout: float = 0.0
    """Dropout on attention weights, residual branches and embeddings (0 for pretraining)."""
    bias: bool = True
    """Biases in Linear and LayerNorm layers, as in GPT-2."""
    activation_checkpointing: str = "none"
    """none | full (every block) | every_n (every activation_checkpointing_n-th block): keep only
    block inputs for backward and recompute the rest, trading compute for memory."""
    activation_checkpointing_n: int = 2
    """For every_n: checkpoint blocks 0, n, 2n, ..."""

    def checkpointed(self, layer: int) -> bool:
        """Whether block `layer` recomputes its activations in backward."""
        policy = self.activation_checkpointing
        if policy == "full":
            return True
        return policy == "every_n" and layer % self.activation_checkpointing_n == 0


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # SDPA picks flash / memory-efficient kernels on GPUs where they apply.
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("GPTConfig.vocab_size must be resolved to an int before building GPT")
        if config.activation_checkpointing not in ("none", "full", "every_n"):
            policy = config.activation_checkpointing
            raise ValueError(f"activation_checkpointing={policy!r}: use none, full or every_n")
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"n_head={config.n_head} must divide n_embd={config.n_embd}")
        self.config = config
        # Swappable so a launcher can use DeepSpeed's (partitioned, CPU-offloaded) checkpointing.
        self.checkpoint_fn: Callable = functools.partial(checkpoint, use_reentrant=False)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Tied input/output embeddings (weight tying, as GPT-2).
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer), one per residual add.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; tied weights counted once. non_embedding drops position embeddings
        (the token embedding stays: it is also the output head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position; with targets, also the mean cross-entropy loss."""
        T = idx.size(1)
        if self.config.block_size < T:
            raise ValueError(f"sequence of {T} tokens exceeds block_size={self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for layer, block in enumerate(self.transformer.h):
            if self.training and torch.is_grad_enabled() and self.config.checkpointed(layer):
                x = self.checkpoint_fn(block, x)
            else:
                x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            # Loss in fp32 even when the model runs in bf16/fp16.
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        vocab_limit: int | None = None,
    ) -> torch.Tensor:
        """Autoregressive sampling; idx is (B, T) token ids, returns (B, T + max_new_tokens).

        vocab_limit keeps sampling to the tokenizer's ids when the embedding is padded past them.
        """
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size :]
            logits, _ = self(context)
            logits = logits[:, -1, :vocab_limit].float()
            if temperature <= 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits[logits < kth] = -float("inf")
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, next_id), dim=1)
        return idx


def count_params(config: GPTConfig, non_embedding: bool = False) -> int:
    """Parameters of a model shape, counted on the meta device (any size, no memory)."""
    with torch.device("meta"):
        return GPT(config).num_params(non_embedding=non_embedding)


def flops_per_token(config: GPTConfig) -> int:
    """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12*L*H*Q*T.

    N is the non-embedding parameter count (which includes the tied output head), L layers,
    H heads, Q head dimension, T context length.
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
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def recompute_fraction(config: GPTConfig) -> float:
    """Share of the blocks whose forward runs again in backward (for HFU)."""
    return sum(config.checkpointed(i) for i in range(config.n_layer)) / config.n_layer
