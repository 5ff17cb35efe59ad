"""Generate text from a trained run's newest (or a chosen) checkpoint.

python -m launcher.sample --run runs/shakespeare_char --prompt "What is an LLM?"
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from data_pipeline.tokenizers import Tokenizer, load_tokenizer
from launcher import checkpoint
from launcher.config import SampleConfig, spec_from_dict
from launcher.errors import UserError, run_cli
from model.gpt import GPT, GPTConfig


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
    out = model.generate(
        torch.tensor([ids], device=device),
        sample.max_new_tokens,
        temperature=sample.temperature,
        top_k=sample.top_k,
        generator=generator,
        vocab_limit=tokenizer.vocab_size,
    )
    model.train(was_training)
    return tokenizer.decode(out[0].tolist())


def load_run_model(run_dir: Path, tag: str | None, device: torch.device) -> tuple[GPT, Path]:
    """Build the run's model and load consolidated weights from a complete checkpoint tag."""
    from launcher.export import resolve_tag

    tag_dir = resolve_tag(run_dir, tag)
    spec = spec_from_dict(yaml.safe_load((run_dir / "spec.yaml").read_text()))
    model = GPT(spec.model)
    model.load_state_dict(checkpoint.load_weights(tag_dir))
    return model.to(device), tag_dir


def load_exported_model(export_dir: Path, device: torch.device) -> GPT:
    """A model written by `python -m launcher.export` (the Hugging Face GPT-2 layout)."""
    from safetensors.torch import load_file

    from launcher.export import _CONV1D

    config = json.loads((export_dir / "config.json").read_text())
    model = GPT(
        GPTConfig(
            n_layer=config["n_layer"],
            n_head=config["n_head"],
            n_embd=config["n_embd"],
            block_size=config["n_positions"],
            vocab_size=config["vocab_size"],
            bias=True,
        )
    )
    state = {
        k: v.t() if _CONV1D.search(k) else v
        for k, v in load_file(export_dir / "model.safetensors").items()
    }
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state)
    return model.to(device)


def load_model_and_tokenizer(
    path: Path, tag: str | None, device: torch.device
) -> tuple[GPT, Tokenizer, str]:
    """From a run directory (any tag, any ZeRO stage) or an exported directory."""
    from launcher.export import TOKENIZER_FILE

    if (path / "model.safetensors").exists() and (path / TOKENIZER_FILE).exists():
        if tag is not None:
            raise UserError(f"{path} is an exported model; --tag applies to run directories")
        model = load_exported_model(path, device)
        return (
            model,
            load_tokenizer(json.loads((path / TOKENIZER_FILE).read_text()), path),
            str(path),
        )
    model, tag_dir = load_run_model(path, tag, device)
    tokenizer = load_tokenizer(json.loads((path / "tokenizer.json").read_text()), path)
    return model, tokenizer, str(tag_dir)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m launcher.sample",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--run",
        type=Path,
        required=True,
        help="run directory (runs/NAME) or a directory written by launcher.export",
    )
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the newest)")
    p.add_argument("--prompt", default=SampleConfig.prompt)
    p.add_argument("--max-new-tokens", type=int, default=SampleConfig.max_new_tokens)
    p.add_argument("--temperature", type=float, default=SampleConfig.temperature)
    p.add_argument("--top-k", type=int, default=SampleConfig.top_k)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--num-samples", type=int, default=1, help="independent samples to print")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    model, tokenizer, source = load_model_and_tokenizer(args.run, args.tag, device)
    sample = replace(
        SampleConfig(),
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
    )
    print(f"# {source}", file=sys.stderr)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(generate_text(model, tokenizer, sample, args.seed + i, device))
    return 0


if __name__ == "__main__":
    run_cli(main)
