"""A trained model back in memory, from a run's checkpoint (any tag, any ZeRO stage, no process
group) or from a directory written by `zerolaunch export`; with its tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from data_pipeline.tokenizers import Tokenizer, load_tokenizer
from launcher.checkpoints import hf, store
from launcher.checkpoints.hf_layout import read_config
from launcher.errors import UserError
from model.gpt import GPT, GPTConfig


def load_run_model(run_dir: Path, tag: str | None, device: torch.device) -> tuple[GPT, Path]:
    """Build the run's model and load consolidated weights from a complete checkpoint tag."""
    tag_dir = store.resolve_tag(run_dir, tag)
    config = store.read_run_spec(run_dir).model
    return GPT.from_state(config, store.load_weights(tag_dir, lazy=True), device), tag_dir


def load_exported_model(export_dir: Path, device: torch.device) -> GPT:
    """A Hugging Face model directory (GPT-2 or Llama layout), e.g. one `zerolaunch export`
    wrote."""
    config = GPTConfig(**read_config(export_dir))
    return GPT.from_state(config, hf.load_state(export_dir, config, lazy=True), device)


def is_export(path: Path) -> bool:
    weights = (path / hf.WEIGHTS).exists() or (path / hf.INDEX).exists()
    return weights and (path / hf.TOKENIZER_FILE).exists()


def load_model_and_tokenizer(
    path: Path, tag: str | None, device: torch.device
) -> tuple[GPT, Tokenizer, str]:
    """(model, tokenizer, where the weights came from) from a run or an exported directory."""
    if is_export(path):
        if tag is not None:
            raise UserError(f"{path} is an exported model; --tag applies to run directories")
        description = json.loads((path / hf.TOKENIZER_FILE).read_text())
        return load_exported_model(path, device), load_tokenizer(description, path), str(path)
    model, tag_dir = load_run_model(path, tag, device)
    tokenizer = load_tokenizer(json.loads((path / "tokenizer.json").read_text()), path)
    return model, tokenizer, str(tag_dir)
