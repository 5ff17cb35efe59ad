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
from model.gpt import GPT


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
    """Build the run's model and load consolidated weights from a checkpoint tag."""
    spec_file = run_dir / "spec.yaml"
    if not spec_file.exists():
        raise UserError(f"{run_dir} is not a zerolaunch run directory ({spec_file} is missing)")
    spec = spec_from_dict(yaml.safe_load(spec_file.read_text()))
    ckpt_dir = checkpoint.checkpoint_dir(run_dir)
    tags = [name for _, name in checkpoint.list_tags(ckpt_dir)]
    if not tags:
        raise UserError(f"{run_dir} has no checkpoint yet (nothing in {ckpt_dir})")
    if tag is not None and tag not in tags:
        raise UserError(f"no checkpoint tag {tag!r} in {ckpt_dir}; it has: {', '.join(tags)}")
    tag_dir = ckpt_dir / (tag or tags[-1])
    model = GPT(spec.model)
    model.load_state_dict(checkpoint.load_weights(tag_dir))
    return model.to(device), tag_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m launcher.sample",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", type=Path, required=True, help="run directory, e.g. runs/NAME")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the newest)")
    p.add_argument("--prompt", default=SampleConfig.prompt)
    p.add_argument("--max-new-tokens", type=int, default=SampleConfig.max_new_tokens)
    p.add_argument("--temperature", type=float, default=SampleConfig.temperature)
    p.add_argument("--top-k", type=int, default=SampleConfig.top_k)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    model, tag_dir = load_run_model(args.run, args.tag, device)
    tokenizer = load_tokenizer(json.loads((args.run / "tokenizer.json").read_text()), args.run)
    sample = replace(
        SampleConfig(),
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
    )
    print(f"# {tag_dir}", file=sys.stderr)
    print(generate_text(model, tokenizer, sample, args.seed, device))
    return 0


if __name__ == "__main__":
    run_cli(main)
