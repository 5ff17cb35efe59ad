"""Hugging Face model directories, both ways: a run's checkpoint out as `GPT2LMHeadModel` or
`LlamaForCausalLM` (config.json, generation_config.json, safetensors sharded with an index past
--max-shard-size, tokenizer files AutoTokenizer loads), and weights back in (`model.init_from`,
`zerolaunch sample` on an exported directory).

Out: consolidated weights from any ZeRO stage, streamed tensor by tensor into the safetensors
files (memory stays near one tensor), split into shards by huggingface_hub's own splitter.
The names and fused-matrix splits are in `hf_layout.py`.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from data_pipeline.foreign import has_text
from data_pipeline.tokenizers import Tokenizer, load_tokenizer
from launcher.checkpoints import store
from launcher.checkpoints.contract import META_FILE
from launcher.checkpoints.hf_layout import Lazy, export_tensors, import_state, to_hf_config
from launcher.errors import UserError
from model.gpt import GPTConfig

TOKENIZER_FILE = "zerolaunch_tokenizer.json"
"""Our tokenizer description in an exported directory (`zerolaunch sample` reads it)."""
EXPORT_META = "zerolaunch_export.json"
"""Where an export came from (never the checkpoint marker's name)."""
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {"fp32": (torch.float32, "F32", "float32"), "bf16": (torch.bfloat16, "BF16", "bfloat16")}
"""--dtype -> (torch dtype, safetensors dtype, config.json torch_dtype)."""


# ----------------------------------------------------------------------------- writing


def write_safetensors(path: Path, tensors: dict[str, tuple[tuple, Lazy]], dtype: str) -> None:
    """The safetensors format written as a stream: header first (shapes known), then each
    tensor's bytes as it is materialised (in `dtype`); atomically renamed into place."""
    torch_dtype, name_in_file, _ = DTYPES[dtype]
    width = torch.empty((), dtype=torch_dtype).element_size()
    header, offset = {}, 0
    for name, (shape, _) in tensors.items():
        size = width * int(torch.Size(shape).numel())
        header[name] = {"dtype": name_in_file, "shape": list(shape),
                        "data_offsets": [offset, offset + size]}  # fmt: skip
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        bar = tqdm(tensors.items(), desc=path.name, unit="tensor", disable=None, delay=2.0)
        for name, (shape, materialise) in bar:
            tensor = materialise().to(torch_dtype).contiguous()
            if tuple(tensor.shape) != tuple(shape):
                raise UserError(f"{name}: shape {tuple(tensor.shape)}, expected {shape}")
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
            del tensor
    tmp.replace(path)


def write_weights(
    out: Path, tensors: dict[str, tuple[tuple, Lazy]], dtype: str, max_shard_size: int | str
) -> list[str]:
    """model.safetensors, or shards with model.safetensors.index.json once the weights pass
    max_shard_size (huggingface_hub's splitter: the names and index transformers expects)."""
    from huggingface_hub import split_state_dict_into_shards_factory

    width = torch.empty((), dtype=DTYPES[dtype][0]).element_size()
    split = split_state_dict_into_shards_factory(
        tensors,
        get_storage_size=lambda t: width * int(torch.Size(t[0]).numel()),
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
    for filename, names in split.filename_to_tensors.items():
        write_safetensors(out / filename, {n: tensors[n] for n in names}, dtype)
    files = list(split.filename_to_tensors)
    if split.is_sharded:
        index = {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename}
        (out / INDEX).write_text(json.dumps(index, indent=2))
        files.append(INDEX)
    return files


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


def export(
    run_dir: Path,
    tag: str | None,
    out: Path,
    force: bool = False,
    dtype: str = "fp32",
    max_shard_size: int | str = "5GB",
) -> tuple[Path, list[str]]:
    """Write the run's tag (default latest) into `out` as a Hugging Face model directory;
    (the tag, the files written)."""
    check_output_dir(out, force)
    tag_dir = store.resolve_tag(run_dir, tag)
    spec = store.read_run_spec(run_dir)
    tensors = export_tensors(spec.model, store.load_weights(tag_dir, lazy=True))
    description = json.loads((run_dir / "tokenizer.json").read_text())
    tokenizer = load_tokenizer(description, run_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("model*.safetensors"), out / INDEX]:  # --force: no stale shard stays
        old.unlink(missing_ok=True)
    files = write_weights(out, tensors, dtype, max_shard_size)
    config = to_hf_config(spec.model, tokenizer.eod_id, DTYPES[dtype][2])
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": tokenizer.eod_id, "eos_token_id": tokenizer.eod_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    files += ["config.json", "generation_config.json"]
    files += _tokenizer_files(run_dir, out, description, tokenizer, spec.model.block_size)
    source = {"run": str(run_dir), "tag": tag_dir.name, "dtype": dtype,
              "model": asdict(spec.model)}  # fmt: skip
    (out / EXPORT_META).write_text(json.dumps(source, indent=1))
    return tag_dir, files


def _tokenizer_files(
    run_dir: Path, out: Path, description: dict, tokenizer: Tokenizer, block_size: int
) -> list[str]:
    """Our description (for `zerolaunch sample`), the tokenizer's own files, and the files
    `transformers.AutoTokenizer` loads."""
    from data_pipeline.hf_tokenizer import save_for_transformers

    (out / TOKENIZER_FILE).write_text(json.dumps(description, ensure_ascii=False))
    written = [TOKENIZER_FILE]
    if not has_text(tokenizer):  # vocab:SIZE:eod=ID: a size and an EOD id, nothing to convert
        return written
    for key in ("model", "file"):  # sentencepiece's .model, a Hugging Face tokenizer's file
        name = description.get(key)
        if isinstance(name, str) and (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, out / name)
            written.append(name)
    return written + save_for_transformers(tokenizer, run_dir, out, block_size)


# ----------------------------------------------------------------------------- reading


def weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, from the index (sharded) or the one
    file; a shard the index names but the directory lacks is an error naming it."""
    directory = Path(directory)
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{index} is not a safetensors index ({e})") from e
        missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if missing:
            raise UserError(
                f"{index} names shards that {directory} does not have: {', '.join(missing)}; "
                "copy every shard (or download the model again)"
            )
        return {name: directory / f for name, f in weight_map.items()}
    single = directory / WEIGHTS
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    other = sorted(p.name for p in directory.glob("*.bin")) + sorted(
        p.name for p in directory.glob("*.pt*")
    )
    hint = (
        f" (it has {', '.join(other[:3])}: load it in transformers and save_pretrained(DIR) "
        "with safe_serialization, the default)"
        if other
        else ""
    )
    raise UserError(f"{directory} has neither {WEIGHTS} nor {INDEX}{hint}")


def load_state(directory: Path, model: GPTConfig, lazy: bool = False) -> dict[str, Any]:
    """Our fp32 state dict from a Hugging Face directory's safetensors (sharded or not); with
    lazy, each value is read when asked (`.contiguous()`), a tensor at a time."""
    from safetensors import SafetensorError, safe_open

    files = weight_files(directory)
    handles: dict[Path, Any] = {}
    try:
        for path in sorted(set(files.values())):
            handles[path] = safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:
        raise UserError(f"{directory}: a weights file cannot be read ({e})") from e

    def read(name: str, path: Path) -> torch.Tensor:
        try:
            return handles[path].get_tensor(name)
        except SafetensorError as e:
            raise UserError(f"{directory}: tensor {name} cannot be read ({e})") from e

    tensors: dict[str, Lazy] = {
        name: (lambda n=name, p=path: read(n, p)) for name, path in files.items()
    }
    return import_state(model, tensors, lazy)
