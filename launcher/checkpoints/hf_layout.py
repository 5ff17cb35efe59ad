"""The two Hugging Face layouts our GPT maps onto, both ways: `GPT2LMHeadModel` and
`LlamaForCausalLM` (config.json fields, tensor names and shapes).

Pure mapping, no files: `hf.py` reads and writes them. Our fused matrices split into theirs:
attn.c_attn = [q; k; v] rows (Llama's q_proj, k_proj, v_proj), mlp.c_fc = [gate; up] rows (Llama's
gate_proj, up_proj); GPT-2's Conv1D stores every Linear transposed. RoPE uses Llama's layout in
both, so no permutation is ever needed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from launcher.errors import UserError
from model.gpt import GPTConfig

GPT2, LLAMA = "gpt2", "llama"
ARCHITECTURES = {"GPT2LMHeadModel": GPT2, "LlamaForCausalLM": LLAMA}
SHAPE_FIELDS = (
    "n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias", "n_kv_head", "positions",
    "rope_theta", "norm", "norm_eps", "mlp", "intermediate_size", "tie_embeddings",
)  # fmt: skip
"""The GPTConfig fields a Hugging Face config.json decides."""
# GPT-2's Conv1D weights are (in, out); ours are (out, in).
CONV1D = re.compile(r"\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
GPT2_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all the tanh approximation

Lazy = Callable[[], torch.Tensor]
"""Materialises one tensor on demand (export streams tensor by tensor)."""


def layout_of(model: GPTConfig) -> str:
    """Which Hugging Face class holds this shape; a mix of the two (say RoPE with LayerNorm) has
    none, and the error lists what to change."""
    gpt2 = {"positions": "learned", "norm": "layernorm", "mlp": "gelu"}
    llama = {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu"}
    if all(getattr(model, k) == v for k, v in gpt2.items()):
        if model.kv_heads != model.n_head:
            raise UserError(
                f"model.n_kv_head={model.n_kv_head}: GPT2LMHeadModel has no grouped-query "
                "attention; only the Llama layout (rope, rmsnorm, swiglu) exports with it"
            )
        return GPT2
    if all(getattr(model, k) == v for k, v in llama.items()):
        return LLAMA
    differ = ", ".join(f"{k}={getattr(model, k)}" for k in gpt2)
    raise UserError(
        f"model ({differ}) matches neither Hugging Face layout: GPT-2 is positions=learned, "
        "norm=layernorm, mlp=gelu; Llama is positions=rope, norm=rmsnorm, mlp=swiglu"
    )


# ------------------------------------------------------------------------------ config.json


def to_hf_config(model: GPTConfig, eod_id: int | None, dtype: str) -> dict:
    """config.json for the model's layout (dtype: float32 or bfloat16)."""
    if layout_of(model) == GPT2:
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": model.vocab_size,
            "n_positions": model.block_size,
            "n_embd": model.n_embd,
            "n_layer": model.n_layer,
            "n_head": model.n_head,
            "n_inner": model.intermediate_size,
            "activation_function": "gelu_new",  # GELU, tanh approximation
            "layer_norm_epsilon": model.norm_eps,
            "resid_pdrop": model.dropout,
            "embd_pdrop": model.dropout,
            "attn_pdrop": model.dropout,
            "initializer_range": 0.02,
            "scale_attn_weights": True,
            "tie_word_embeddings": model.tie_embeddings,
            "bos_token_id": eod_id,
            "eos_token_id": eod_id,
            "torch_dtype": dtype,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model.vocab_size,
        "max_position_embeddings": model.block_size,
        "hidden_size": model.n_embd,
        "intermediate_size": model.ffn_size,
        "num_hidden_layers": model.n_layer,
        "num_attention_heads": model.n_head,
        "num_key_value_heads": model.kv_heads,
        "head_dim": model.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": model.norm_eps,
        "rope_theta": model.rope_theta,
        "rope_scaling": None,
        "attention_bias": model.bias,
        "mlp_bias": model.bias,
        "attention_dropout": model.dropout,
        "initializer_range": 0.02,
        "tie_word_embeddings": model.tie_embeddings,
        "bos_token_id": eod_id,
        "eos_token_id": eod_id,
        "torch_dtype": dtype,
    }


def read_config(directory: Path) -> dict[str, Any]:
    """Our shape fields from a Hugging Face model directory's config.json."""
    path = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        raise UserError(f"{directory} is not a directory; give a Hugging Face model directory")
    if not path.is_file():
        raise UserError(
            f"{directory} has no config.json: not a Hugging Face model directory (save one with "
            "model.save_pretrained(DIR), or export a run with zerolaunch export)"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read as JSON: {e}") from e
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object")
    return from_hf_config(config, str(path))


def from_hf_config(config: dict, source: str) -> dict[str, Any]:
    """Our shape fields (SHAPE_FIELDS) from a config.json; anything we cannot reproduce exactly
    is refused, every problem listed."""
    archs = config.get("architectures") or [config.get("model_type", "?")]
    layout = ARCHITECTURES.get(archs[0]) or {"gpt2": GPT2, "llama": LLAMA}.get(archs[0])
    if layout is None:
        raise UserError(
            f"{source}: architecture {archs[0]!r} is not supported; zerolaunch reads "
            "GPT2LMHeadModel and LlamaForCausalLM checkpoints"
        )
    problems: list[str] = []
    shape = _gpt2_fields(config, problems) if layout == GPT2 else _llama_fields(config, problems)
    if problems:
        raise UserError(
            f"{source}: this {archs[0]} cannot be reproduced exactly:\n  " + "\n  ".join(problems),
            problems,
        )
    return shape


def _require(config: dict, problems: list[str], *keys: str) -> None:
    for key in keys:
        if not isinstance(config.get(key), int):
            problems.append(f"{key}: missing or not an integer ({config.get(key)!r})")


def _gpt2_fields(config: dict, problems: list[str]) -> dict[str, Any]:
    _require(config, problems, "n_layer", "n_head", "n_embd", "n_positions", "vocab_size")
    act = config.get("activation_function", "gelu_new")
    if act not in GPT2_GELUS:
        problems.append(f"activation_function: {act!r}; ours is GELU's tanh form (gelu_new)")
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if config.get(key):
            problems.append(f"{key}: true is not supported")
    return {
        "n_layer": config.get("n_layer"),
        "n_head": config.get("n_head"),
        "n_embd": config.get("n_embd"),
        "block_size": config.get("n_positions"),
        "vocab_size": config.get("vocab_size"),
        "bias": True,
        "n_kv_head": None,
        "positions": "learned",
        "rope_theta": GPTConfig.rope_theta,
        "norm": "layernorm",
        "norm_eps": float(config.get("layer_norm_epsilon", 1e-5)),
        "mlp": "gelu",
        "intermediate_size": config.get("n_inner"),
        "tie_embeddings": bool(config.get("tie_word_embeddings", True)),
    }


def _llama_fields(config: dict, problems: list[str]) -> dict[str, Any]:
    keys = ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size")
    _require(config, problems, *keys, "max_position_embeddings", "vocab_size")
    heads, width = config.get("num_attention_heads"), config.get("hidden_size")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act: {config.get('hidden_act')!r}; Llama's SwiGLU uses silu")
    head_dim = config.get("head_dim")
    if head_dim is not None and isinstance(heads, int) and head_dim * heads != width:
        problems.append(f"head_dim: {head_dim} x {heads} heads is not hidden_size={width}")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        problems.append(f"rope scaling {kind!r}: only plain RoPE (rope_type default) is supported")
    if bool(config.get("attention_bias", False)) != bool(config.get("mlp_bias", False)):
        problems.append("attention_bias and mlp_bias differ; model.bias sets both")
    return {
        "n_layer": config.get("num_hidden_layers"),
        "n_head": heads,
        "n_embd": width,
        "block_size": config.get("max_position_embeddings"),
        "vocab_size": config.get("vocab_size"),
        "bias": bool(config.get("attention_bias", False)),
        "n_kv_head": config.get("num_key_value_heads", heads),
        "positions": "rope",
        "rope_theta": float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        "norm": "rmsnorm",
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "mlp": "swiglu",
        "intermediate_size": config.get("intermediate_size"),
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
    }


def shape_differences(spec: GPTConfig, hf: dict[str, Any], given: set[str]) -> list[str]:
    """The spec's model fields (those the spec sets: `given`) that disagree with the checkpoint's,
    compared by what they build (n_kv_head null = n_head; intermediate_size null = default)."""
    merged = GPTConfig(**{f.name: getattr(spec, f.name) for f in fields(GPTConfig)} | hf)
    effective = {"n_kv_head": lambda c: c.kv_heads, "intermediate_size": lambda c: c.ffn_size}
    out = []
    for key in sorted(given & set(SHAPE_FIELDS)):
        read = effective.get(key, lambda c, k=key: getattr(c, k))
        if read(spec) != read(merged):
            out.append(f"model.{key}: the spec says {_show(getattr(spec, key))}, the checkpoint "
                       f"{_show(hf[key])}")  # fmt: skip
    return out


def _show(value: Any) -> str:
    """A value as YAML spells it (true, null, 'rope')."""
    return json.dumps(value) if value is None or isinstance(value, bool) else repr(value)


# ------------------------------------------------------------------------------ tensors


def export_tensors(model: GPTConfig, weights: dict) -> dict[str, tuple[tuple, Lazy]]:
    """Hugging Face name -> (shape, materialise) from our (lazy) weights, in a stable order;
    a tied head is stored once, as the token embedding."""
    if layout_of(model) == GPT2:
        return _gpt2_export(model, weights)
    return _llama_export(model, weights)


def _fp32(value) -> torch.Tensor:
    tensor = value.contiguous() if not isinstance(value, torch.Tensor) else value
    return tensor.detach().to(torch.float32).contiguous()


def _gpt2_export(model: GPTConfig, weights: dict) -> dict[str, tuple[tuple, Lazy]]:
    out: dict[str, tuple[tuple, Lazy]] = {}
    for name, value in weights.items():
        if name == "lm_head.weight" and model.tie_embeddings:
            continue
        shape = tuple(value.shape)
        if CONV1D.search(name):
            out[name] = (shape[::-1], lambda v=value: _fp32(v).t().contiguous())
        else:
            out[name] = (shape, lambda v=value: _fp32(v))
    if not model.bias:  # zero biases: the same function
        for name, (shape, _) in list(out.items()):
            block = name.startswith(("transformer.h.", "transformer.ln_f"))
            if block and name.endswith(".weight"):
                width = shape[-1] if CONV1D.search(name) else shape[0]
                bias = name.removesuffix(".weight") + ".bias"
                out[bias] = ((width,), lambda n=width: torch.zeros(n))
    return out


def _llama_names(layer: int) -> dict[str, str]:
    """Our per-layer names -> Llama's (fused ones handled apart)."""
    ours, theirs = f"transformer.h.{layer}.", f"model.layers.{layer}."
    return {
        f"{ours}ln_1.weight": f"{theirs}input_layernorm.weight",
        f"{ours}ln_2.weight": f"{theirs}post_attention_layernorm.weight",
        f"{ours}attn.c_proj.weight": f"{theirs}self_attn.o_proj.weight",
        f"{ours}attn.c_proj.bias": f"{theirs}self_attn.o_proj.bias",
        f"{ours}mlp.c_proj.weight": f"{theirs}mlp.down_proj.weight",
        f"{ours}mlp.c_proj.bias": f"{theirs}mlp.down_proj.bias",
    }


def _fused(model: GPTConfig, layer: int) -> dict[str, list[tuple[str, int]]]:
    """Our fused tensors of one layer -> [(Llama name, rows)], in row order."""
    q, kv, hidden = model.n_head * model.head_dim, model.kv_heads * model.head_dim, model.ffn_size
    ours, theirs = f"transformer.h.{layer}.", f"model.layers.{layer}."
    out = {}
    for kind in ("weight", "bias"):
        out[f"{ours}attn.c_attn.{kind}"] = [
            (f"{theirs}self_attn.{p}_proj.{kind}", rows) for p, rows in zip("qkv", (q, kv, kv))
        ]
        out[f"{ours}mlp.c_fc.{kind}"] = [
            (f"{theirs}mlp.{p}_proj.{kind}", hidden) for p in ("gate", "up")
        ]
    return out


def _llama_map(model: GPTConfig) -> tuple[dict[str, str], dict[str, list[tuple[str, int]]]]:
    plain = {"transformer.wte.weight": "model.embed_tokens.weight",
             "transformer.ln_f.weight": "model.norm.weight"}  # fmt: skip
    if not model.tie_embeddings:
        plain["lm_head.weight"] = "lm_head.weight"
    fused: dict[str, list[tuple[str, int]]] = {}
    for layer in range(model.n_layer):
        plain |= _llama_names(layer)
        fused |= _fused(model, layer)
    return plain, fused


def _llama_export(model: GPTConfig, weights: dict) -> dict[str, tuple[tuple, Lazy]]:
    plain, fused = _llama_map(model)
    out: dict[str, tuple[tuple, Lazy]] = {}
    for name, value in weights.items():
        if name in plain:
            out[plain[name]] = (tuple(value.shape), lambda v=value: _fp32(v))
        elif name in fused:
            start = 0
            for hf_name, rows in fused[name]:
                shape = (rows, *tuple(value.shape)[1:])
                piece = lambda v=value, a=start, b=start + rows: _fp32(v)[a:b].contiguous()
                out[hf_name] = (shape, piece)
                start += rows
    return out


class Deferred:
    """A tensor read when asked (`.contiguous()`), as DeepSpeed's lazy zero_to_fp32 values are:
    a model made from it reads one tensor at a time."""

    def __init__(self, read: Lazy) -> None:
        self.read = read

    def contiguous(self) -> torch.Tensor:
        return self.read()


def import_state(
    model: GPTConfig, tensors: dict[str, Lazy], lazy: bool = False
) -> dict[str, torch.Tensor | Deferred]:
    """Our state dict (fp32) from a checkpoint's tensors (name -> loader); a tensor we need and
    do not find is an error naming it, and so is one we would not use. With lazy, every value
    is Deferred (read when asked), else read now."""
    reads = (
        _gpt2_import(model, tensors) if layout_of(model) == GPT2 else _llama_import(model, tensors)
    )
    if lazy:
        return {name: Deferred(read) for name, read in reads.items()}
    done: dict[int, torch.Tensor] = {}  # a tied matrix is read once, and stays one tensor
    for read in reads.values():
        if id(read) not in done:
            done[id(read)] = read()
    return {name: done[id(read)] for name, read in reads.items()}


def _llama_import(model: GPTConfig, tensors: dict[str, Lazy]) -> dict[str, Lazy]:
    plain, fused = _llama_map(model)
    state: dict[str, Lazy] = {}
    used = set()
    for ours, theirs in plain.items():
        if not ours.endswith(".bias") or model.bias:
            load = _need(tensors, theirs)
            state[ours] = lambda load=load: _fp32(load())
            used.add(theirs)
    for ours, parts in fused.items():
        if ours.endswith(".bias") and not model.bias:
            continue
        loads = [_need(tensors, name) for name, _ in parts]
        state[ours] = lambda loads=loads: torch.cat([_fp32(load()) for load in loads])
        used.update(name for name, _ in parts)
    if model.tie_embeddings:  # saved by some tools beside the embedding it is tied to
        used.add("lm_head.weight")
    _refuse_unused(tensors, used, ignore=("rotary_emb.inv_freq",))
    if model.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def _gpt2_import(model: GPTConfig, tensors: dict[str, Lazy]) -> dict[str, Lazy]:
    # GPT2Model checkpoints (the hub's gpt2) name tensors without the "transformer." prefix.
    named = {
        (k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"): v
        for k, v in tensors.items()
    }
    state: dict[str, Lazy] = {}
    for name, load in named.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # old causal-mask buffers, not weights
        if name == "lm_head.weight" and model.tie_embeddings:
            continue
        conv1d = bool(CONV1D.search(name))
        state[name] = lambda load=load, t=conv1d: (
            _fp32(load()).t().contiguous() if t else _fp32(load())
        )
    _need(named, "transformer.wte.weight")
    if model.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def _need(tensors: dict[str, Lazy], name: str) -> Lazy:
    if name not in tensors:
        raise UserError(f"the checkpoint has no tensor {name!r}, which this model shape needs")
    return tensors[name]


def _refuse_unused(tensors: dict[str, Lazy], used: set[str], ignore: tuple[str, ...]) -> None:
    extra = sorted(k for k in tensors if k not in used and not k.endswith(ignore))
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise UserError(
            f"the checkpoint has tensors this model shape does not use: {', '.join(extra[:3])}"
            f"{more}; is its config.json the one these weights were saved with?"
        )
