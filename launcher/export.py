"""Export a checkpoint to the Hugging Face GPT-2 layout: model.safetensors + config.json.

    python -m launcher.export --run runs/NAME [--tag global_step300] --out exported/NAME

Consolidated fp32 weights from any ZeRO stage, streamed tensor by tensor into the safetensors
file (memory stays near one tensor), with Hugging Face's names and Conv1D layout, so that
`transformers.GPT2LMHeadModel.from_pretrained(DIR)` loads it. The tokenizer description (and its
model file) is copied beside it; `python -m launcher.sample --run DIR` samples from it.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from data_pipeline.tokenizers import load_tokenizer
from launcher import checkpoint
from launcher.config import spec_from_dict
from launcher.errors import UserError, run_cli
from model.gpt import GPTConfig

TOKENIZER_FILE = "zerolaunch_tokenizer.json"
# Our Linear weights are (out, in); GPT-2's Conv1D stores (in, out).
_CONV1D = re.compile(r"\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")


def hf_config(model: GPTConfig, eod_id: int | None) -> dict:
    """config.json for transformers' GPT2LMHeadModel."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": model.vocab_size,
        "n_positions": model.block_size,
        "n_embd": model.n_embd,
        "n_layer": model.n_layer,
        "n_head": model.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",  # GELU, tanh approximation
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": model.dropout,
        "embd_pdrop": model.dropout,
        "attn_pdrop": model.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": eod_id,
        "eos_token_id": eod_id,
        "torch_dtype": "float32",
    }


def hf_tensors(model: GPTConfig, weights: dict) -> dict[str, tuple[tuple, Callable]]:
    """HF name -> (shape, function that materialises the fp32 tensor), in a stable order.

    The tied output head is stored once (as the token embedding); a model without biases gets
    zero biases, which is the same function.
    """
    out: dict[str, tuple[tuple, Callable]] = {}
    for name, value in weights.items():
        if name == "lm_head.weight":
            continue
        shape = tuple(value.shape)
        if _CONV1D.search(name):
            out[name] = (shape[::-1], lambda v=value: _materialise(v).t().contiguous())
        else:
            out[name] = (shape, lambda v=value: _materialise(v))
    if not model.bias:
        _add_zero_biases(model, out)
    return out


def _materialise(value) -> torch.Tensor:
    tensor = value.contiguous() if not isinstance(value, torch.Tensor) else value
    return tensor.detach().to(torch.float32).contiguous()


def _add_zero_biases(model: GPTConfig, out: dict) -> None:
    width = {
        "ln_1": model.n_embd,
        "ln_2": model.n_embd,
        "attn.c_attn": 3 * model.n_embd,
        "attn.c_proj": model.n_embd,
        "mlp.c_fc": 4 * model.n_embd,
        "mlp.c_proj": model.n_embd,
    }
    for layer in range(model.n_layer):
        for part, n in width.items():
            out[f"transformer.h.{layer}.{part}.bias"] = ((n,), lambda n=n: torch.zeros(n))
    out["transformer.ln_f.bias"] = ((model.n_embd,), lambda: torch.zeros(model.n_embd))


def write_safetensors(path: Path, tensors: dict[str, tuple[tuple, Callable]]) -> None:
    """The safetensors format written as a stream: header first (shapes known), then each
    tensor's bytes as it is materialised."""
    header, offset = {}, 0
    for name, (shape, _) in tensors.items():
        size = 4 * int(torch.Size(shape).numel())
        header[name] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, (shape, materialise) in tensors.items():
            tensor = materialise()
            if tuple(tensor.shape) != tuple(shape):
                raise UserError(f"{name}: shape {tuple(tensor.shape)}, expected {shape}")
            f.write(tensor.numpy().tobytes())
            del tensor
    tmp.replace(path)


def resolve_tag(run_dir: Path, tag: str | None) -> Path:
    """A complete tag of the run: the named one, else `latest`; errors list what exists."""
    if not (run_dir / "spec.yaml").exists():
        raise UserError(f"{run_dir} is not a zerolaunch run directory (no spec.yaml)")
    ckpt_dir = checkpoint.checkpoint_dir(run_dir)
    complete = [t for _, t in checkpoint.list_tags(ckpt_dir)]
    if not complete:
        raise UserError(f"{run_dir} has no complete checkpoint in {ckpt_dir}")
    if tag is None:
        latest = checkpoint.read_pointer(ckpt_dir, checkpoint.LATEST)
        return ckpt_dir / (latest if latest in complete else complete[-1])
    if tag not in complete:
        problem = checkpoint.verify(ckpt_dir / tag) if (ckpt_dir / tag).is_dir() else None
        why = f" ({problem})" if problem else ""
        raise UserError(
            f"no complete checkpoint tag {tag!r} in {ckpt_dir}{why}; it has: {', '.join(complete)}"
        )
    return ckpt_dir / tag


def export(run_dir: Path, tag: str | None, out: Path) -> Path:
    tag_dir = resolve_tag(run_dir, tag)
    spec = spec_from_dict(yaml.safe_load((run_dir / "spec.yaml").read_text()))
    weights = checkpoint.load_weights(tag_dir, lazy=True)
    tokenizer = json.loads((run_dir / "tokenizer.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", hf_tensors(spec.model, weights))
    eod = load_tokenizer(tokenizer, run_dir).eod_id
    (out / "config.json").write_text(json.dumps(hf_config(spec.model, eod), indent=2))
    (out / TOKENIZER_FILE).write_text(json.dumps(tokenizer, ensure_ascii=False))
    if tokenizer.get("type") == "sentencepiece":
        shutil.copyfile(run_dir / tokenizer["model"], out / tokenizer["model"])
    (out / "zerolaunch.json").write_text(
        json.dumps(
            {"run": str(run_dir), "tag": tag_dir.name, "model": spec.model.__dict__}, indent=1
        )
    )
    return tag_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m launcher.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", type=Path, required=True, help="run directory, e.g. runs/NAME")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    args = p.parse_args(argv)
    tag_dir = export(args.run, args.tag, args.out)
    print(f"exported {tag_dir} -> {args.out} (model.safetensors, config.json, {TOKENIZER_FILE})")
    return 0


if __name__ == "__main__":
    run_cli(main)
