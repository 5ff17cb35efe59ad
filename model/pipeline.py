"""The GPT as a flat sequence of layers, for pipeline parallelism (GPipe / PipeDream-1F1B).

A pipeline engine runs each stage's slice of `pipeline_layers(model)` and passes one tensor
between them: token ids into the first layer, the residual stream between blocks, logits out of
the last; `loss` turns logits and targets into the model's loss. Every layer is a view of the
built model's own modules (shared parameters, no copies), so a model initialised from one seed
(and cut for tensor parallelism, if it is) trains the same in pipeline form.

Kept free of DeepSpeed: the launcher assembles these layers into DeepSpeed's PipelineModule.
`layer_names` maps each layer's parameter names back to the GPT's, for checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from model.gpt import GPT, Block, GPTConfig, rope_tables


class TokenEmbedding(nn.Module):
    """The token embedding; with tied embeddings also the output head that shares its matrix
    (`head`), so one module lives on the first and the last stage and their gradients of the
    shared matrix can be summed."""

    def __init__(self, wte: nn.Module, lm_head: nn.Module | None = None) -> None:
        super().__init__()
        self.wte = wte
        if lm_head is not None:
            self.lm_head = lm_head

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.wte(idx)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the final hidden states (tied embeddings, last stage)."""
        return self.lm_head(x)


class Positions(nn.Module):
    """Learned position embeddings (GPT-2; rotary ones are applied inside each block) and the
    embedding dropout."""

    def __init__(self, wpe: nn.Module | None, drop: nn.Module) -> None:
        super().__init__()
        if wpe is not None:
            self.wpe = wpe
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "wpe"):
            x = x + self.wpe(torch.arange(x.size(1), device=x.device))
        return self.drop(x)


class PipeBlock(nn.Module):
    """One transformer block taking and returning the residual stream alone: it computes its
    rotary tables itself, and recomputes its activations in backward when the model's
    activation checkpointing covers its layer (through the model's `checkpoint_fn`)."""

    def __init__(self, block: Block, config: GPTConfig, layer: int, checkpoint: Callable) -> None:
        super().__init__()
        self.block = block
        self.config, self.layer = config, layer
        self._checkpoint = checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rope: tuple[torch.Tensor, ...] = ()
        if self.config.positions == "rope":
            rope = rope_tables(self.config, torch.arange(x.size(1), device=x.device))
        if self.training and torch.is_grad_enabled() and self.config.checkpointed(self.layer):
            return self._checkpoint(self.block, x, *(t.clone() for t in rope))
        return self.block(x, *rope)


TIED = "embed"
"""The key of the tied token embedding / output head."""


def pipeline_layers(model: GPT) -> list[nn.Module]:
    """The model as layers: token embedding, positions, the blocks, the final norm, the head.
    With tied embeddings the last entry is the first one again (the caller runs its `head`)."""
    config, t = model.config, model.transformer
    tied = config.tie_embeddings
    embedding = TokenEmbedding(t.wte, model.lm_head if tied else None)
    blocks = [
        PipeBlock(block, config, i, lambda *a: model.checkpoint_fn(*a))
        for i, block in enumerate(t.h)
    ]
    head = embedding if tied else model.lm_head
    return [embedding, Positions(t.wpe if "wpe" in t else None, t.drop), *blocks, t.ln_f, head]


def layer_names(config: GPTConfig) -> list[Callable[[str], str | None]]:
    """For each layer of `pipeline_layers`, a map from its state-dict keys to the GPT's (None:
    a key the GPT stores elsewhere, e.g. the tied head's copy of the embedding)."""
    n = config.n_layer
    embedding = {"wte.weight": "transformer.wte.weight"}
    maps: list[Callable[[str], str | None]] = [
        embedding.get,
        lambda k: f"transformer.{k}" if k.startswith("wpe.") else None,
        *[(lambda k, i=i: f"transformer.h.{i}.{k.removeprefix('block.')}") for i in range(n)],
        lambda k: f"transformer.ln_f.{k}",
        (lambda k: None) if config.tie_embeddings else (lambda k: f"lm_head.{k}"),
    ]
    return maps


def gpt_name(name: str, config: GPTConfig) -> str | None:
    """The GPT's name of a pipeline parameter or state-dict key: `tied_modules.embed.wte.weight`
    (DeepSpeed's name of the tied module) or `<layer>.<key>` (its layer index); a GPT name is
    returned as it is. None: a key the GPT keeps under another name (the tied head)."""
    head, _, rest = name.partition(".")
    if head == "tied_modules":
        return layer_names(config)[0](rest.partition(".")[2])
    if head.isdigit():
        return layer_names(config)[int(head)](rest)
    return name


def merge_layers(layers: dict[int, dict[str, torch.Tensor]], config: GPTConfig) -> dict:
    """The GPT state dict from the state dicts of every pipeline layer (by layer index)."""
    maps = layer_names(config)
    state = {}
    for index, layer_state in sorted(layers.items()):
        for key, value in layer_state.items():
            name = maps[index](key)
            if name is not None:
                state[name] = value
    if config.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def pipeline_name(name: str, config: GPTConfig) -> str | None:
    """The pipeline's name of a GPT parameter (the inverse of `gpt_name`); None for the tied
    head's matrix (the embedding's name carries it)."""
    n = config.n_layer
    if name == "transformer.wte.weight":
        return f"tied_modules.{TIED}.wte.weight" if config.tie_embeddings else "0.wte.weight"
    if name == "lm_head.weight":
        return None if config.tie_embeddings else f"{n + 3}.weight"
    if name.startswith("transformer.wpe."):
        return "1." + name.removeprefix("transformer.")
    if name.startswith("transformer.ln_f."):
        return f"{n + 2}." + name.removeprefix("transformer.ln_f.")
    if name.startswith("transformer.h."):
        layer, _, key = name.removeprefix("transformer.h.").partition(".")
        return f"{int(layer) + 2}.block.{key}"
    return None
