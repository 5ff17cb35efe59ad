"""Text continuing a prompt, from a model in memory (the end-of-run sample, `zerolaunch sample`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from data_pipeline.tokenizers import Tokenizer
from launcher.config.spec import SampleConfig
from launcher.errors import UserError


def generate_text(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    sample: SampleConfig,
    seed: int,
    device: torch.device,
) -> str:
    """The prompt followed by sample.max_new_tokens generated tokens."""
    try:
        ids = tokenizer.encode(sample.prompt)
    except ValueError as e:
        raise UserError(f"sample.prompt: {e}") from e
    if not ids:
        raise UserError("sample.prompt is empty; give at least one character to continue")
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out = model.generate(  # a tensor-parallel model gathers the whole logits itself
        torch.tensor([ids], device=device),
        sample.max_new_tokens,
        temperature=sample.temperature,
        top_k=sample.top_k,
        generator=generator,
        vocab_limit=tokenizer.vocab_size,
    )
    model.train(was_training)
    return tokenizer.decode(out[0].tolist())


@contextlib.contextmanager
def whole_logits(model: torch.nn.Module) -> Iterator[None]:
    """Within: a tensor-parallel model's forward returns the whole vocabulary's logits (each
    rank holds a slice of it otherwise); any other model is left as it is."""
    if not hasattr(model, "gather_logits"):
        yield
        return
    before, model.gather_logits = model.gather_logits, True
    try:
        yield
    finally:
        model.gather_logits = before
