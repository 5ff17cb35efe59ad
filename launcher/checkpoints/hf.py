"""The Hugging Face GPT-2 layout, both ways: config.json + model.safetensors out of a checkpoint,
and our state dict back from such a directory.

Out: consolidated fp32 weights from any ZeRO stage, streamed tensor by tensor into the
safetensors file (memory stays near one tensor), with Hugging Face's names and Conv1D layout,
so that `transformers.GPT2LMHeadModel.from_pretrained(DIR)` loads it; the tokenizer description
(and its model file) is copied beside it.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from data_pipeline.tokenizers import load_tokenizer
from launcher.checkpoints import store
from launcher.checkpoints.contract import META_FILE
from launcher.errors import UserError
from model.gpt import GPTConfig

TOKENIZER_FILE = "zerolaunch_tokenizer.json"
# Our Linear weights are (out, in); GPT-2's Conv1D stores (in, out).
CONV1D = re.compile(r"\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")


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
        if CONV1D.search(name):
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
        bar = tqdm(tensors.items(), desc=path.name, unit="tensor", disable=None, delay=2.0)
        for name, (shape, materialise) in bar:
            tensor = materialise()
            if tuple(tensor.shape) != tuple(shape):
                raise UserError(f"{name}: shape {tuple(tensor.shape)}, expected {shape}")
            f.write(tensor.numpy().tobytes())
            del tensor
    tmp.replace(path)


EXPORT_META = "zerolaunch_export.json"
"""Where an export came from (never the checkpoint marker's name)."""


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse an output directory that is (or is inside) a run or a checkpoint, a file, or a
    directory that already holds files (unless force: then only our files are replaced)."""
    for d in (out, *out.parents):
        if (d / META_FILE).exists() or (d / "spec.yaml").exists() or (d / store.LATEST).exists():
            where = "is" if d == out else f"is inside {d},"
            raise UserError(
                f"--out {out} {where} a zerolaunch run or checkpoint: exporting there "
                "could overwrite its files; pick a directory of its own, e.g. exported/NAME"
            )
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory for the exported model")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not force:
        raise UserError(
            f"--out {out} already holds files ({', '.join(held[:5])}); pick an empty or new "
            "directory, or pass --force to replace the exported files"
        )


def export(run_dir: Path, tag: str | None, out: Path, force: bool = False) -> Path:
    """Write the run's tag (default latest) into `out` in the Hugging Face GPT-2 layout."""
    check_output_dir(out, force)
    tag_dir = store.resolve_tag(run_dir, tag)
    spec = store.read_run_spec(run_dir)
    weights = store.load_weights(tag_dir, lazy=True)
    tokenizer = json.loads((run_dir / "tokenizer.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", hf_tensors(spec.model, weights))
    eod = load_tokenizer(tokenizer, run_dir).eod_id
    (out / "config.json").write_text(json.dumps(hf_config(spec.model, eod), indent=2))
    (out / TOKENIZER_FILE).write_text(json.dumps(tokenizer, ensure_ascii=False))
    if tokenizer.get("type") == "sentencepiece":
        shutil.copyfile(run_dir / tokenizer["model"], out / tokenizer["model"])
    source = {"run": str(run_dir), "tag": tag_dir.name, "model": asdict(spec.model)}
    (out / EXPORT_META).write_text(json.dumps(source, indent=1))
    return tag_dir


def gpt_config(config: dict) -> GPTConfig:
    """Our model shape from a GPT-2 config.json (biases on, as GPT-2 has them)."""
    return GPTConfig(
        n_layer=config["n_layer"],
        n_head=config["n_head"],
        n_embd=config["n_embd"],
        block_size=config["n_positions"],
        vocab_size=config["vocab_size"],
        bias=True,
    )


def state_dict_from_hf(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict from GPT-2 safetensors: Conv1D weights transposed, the head tied."""
    state = {k: v.t() if CONV1D.search(k) else v for k, v in tensors.items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state
