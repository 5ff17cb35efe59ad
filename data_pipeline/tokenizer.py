"""Tokenizers saved beside a prepared dataset, so training and sampling use the same one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class CharTokenizer:
    """Character-level tokenizer whose vocabulary is the sorted set of a corpus's characters."""

    kind = "char"

    def __init__(self, chars: list[str]) -> None:
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        unknown = sorted({c for c in text if c not in self.stoi})
        if unknown:
            raise ValueError(
                f"characters not in the tokenizer's vocabulary: {''.join(unknown)!r}; "
                "a char tokenizer only knows the characters of the corpus it was built from"
            )
        return [self.stoi[c] for c in text]

    def encode_array(self, text: str) -> np.ndarray:
        """Fast path for a whole corpus: a lookup table over code points."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        table = np.full(max(max(map(ord, self.chars)), int(codes.max(initial=0))) + 1, -1, np.int64)
        table[[ord(c) for c in self.chars]] = np.arange(len(self.chars))
        ids = table[codes]
        if (ids < 0).any():
            self.encode(text)  # raises with the offending characters
        return ids

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict:
        return {"type": self.kind, "chars": self.chars}


def load_tokenizer(path: Path) -> CharTokenizer:
    """Load the tokenizer description written by `save_tokenizer`."""
    data = json.loads(Path(path).read_text())
    if data.get("type") != CharTokenizer.kind:
        raise ValueError(f"{path}: unknown tokenizer type {data.get('type')!r}")
    return CharTokenizer(data["chars"])


def save_tokenizer(tokenizer: CharTokenizer, path: Path) -> None:
    Path(path).write_text(json.dumps(tokenizer.to_dict(), ensure_ascii=False))
