"""Tokenizer files that `transformers.AutoTokenizer.from_pretrained(DIR)` loads and that encode
exactly the ids our tokenizer does (documents written with `zerolaunch export`).

    char            a tokenizer.json: one token per character, EOD a special token
    tiktoken:NAME   a tokenizer.json: byte-level BPE whose merges are recovered from tiktoken's
                    ranks (as transformers' TikTokenConverter does), the encoding's regex split
    sentencepiece   a tokenizer.json converted from the model (its .model kept as tokenizer.model)
    hf:PATH         its tokenizer.json (less a post-processor adding BOS/EOS: we trained
                    without them), with its tokenizer_config.json

Every tokenizer_config.json names `PreTrainedTokenizerFast` (transformers then reads the
tokenizer.json as it is, never rebuilding it in a model family's own way), eos and bos = our EOD
token, no BOS/EOS added by `tokenizer(text)`, and `model_max_length`. Built with the `tokenizers`
library only: transformers is not needed here. A converted tokenizer is checked against ours on
a few texts before it is written.

One difference stays: a special token's string inside a text (`<|endoftext|>`, `</s>`) is that
special token for transformers (its usual behaviour, which `tokenizer(text + eos_token)` relies
on), while we encode documents as text throughout.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE, Unigram, WordLevel

from data_pipeline.tokenizers import (
    CharTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    TokenizerError,
)

CHAR_EOD = "<|endoftext|>"
"""The string of a char tokenizer's EOD (it has none of its own; never a single character)."""
SOURCE_ONLY = (
    "tokenizer_file",
    "vocab_file",
    "merges_file",
    "name_or_path",
    "special_tokens_map_file",
)
"""Keys of a source tokenizer_config.json that name its own files, not written again."""
PROBES = (
    "What is an LLM?",
    "  two leading spaces, trailing ones  ",
    "line one\nline two\n\n    indented\r\nwindows\ttab",
    "unicode: café, naïve, 日本語, Ελληνικά, emoji 🙂👍🏽",
    "numbers 1234567890, 3.14159, 1e-9, 2024-06-01",
    "I'm sure they've said DON'T; we'll see.",
    "def f(x):\n    return x ** 2  # square\n",
)
"""Texts a converted tokenizer must encode as ours does before it is written."""


def save_for_transformers(
    tokenizer: Tokenizer, base_dir: Path, out_dir: Path, model_max_length: int
) -> list[str]:
    """Write tokenizer.json + tokenizer_config.json (+ tokenizer.model for SentencePiece) into
    out_dir for `AutoTokenizer.from_pretrained(out_dir)`; base_dir holds the tokenizer's own
    files (the run directory). Returns the names of the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config: dict = {}
    written = ["tokenizer.json", "tokenizer_config.json"]
    if isinstance(tokenizer, HFTokenizer):
        config = {k: v for k, v in tokenizer.config.items() if k not in SOURCE_ONLY}
    backend = to_backend(tokenizer, base_dir)
    check_same_ids(tokenizer, backend)
    backend.save(str(out_dir / "tokenizer.json"))
    if isinstance(tokenizer, SentencePieceTokenizer):
        shutil.copyfile(_own_file(tokenizer.model_file, base_dir), out_dir / "tokenizer.model")
        written.append("tokenizer.model")
        config["unk_token"] = _unk_piece(tokenizer)
    config.update(_common_config(eod_token(tokenizer), model_max_length))
    config = {k: v for k, v in config.items() if v is not None}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return written


def _common_config(eod: str, model_max_length: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "eos_token": eod,
        "bos_token": eod,  # GPT-2's convention: EOD also starts a document (config.json agrees)
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }


def _own_file(file: Path, base_dir: Path) -> Path:
    """The tokenizer's file as found in base_dir (where its description names it), else where
    the tokenizer was loaded from."""
    beside = Path(base_dir) / file.name
    return beside if beside.is_file() else file


def eod_token(tokenizer: Tokenizer) -> str:
    """The string of our EOD token in the tokenizer's vocabulary."""
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.eos_token
    if isinstance(tokenizer, TiktokenTokenizer):
        names = {i: name for name, i in tokenizer.enc._special_tokens.items()}
        return names[tokenizer.eod_id]
    if isinstance(tokenizer, SentencePieceTokenizer):
        return tokenizer.sp.id_to_piece(tokenizer.eod_id)
    if isinstance(tokenizer, CharTokenizer):
        return CHAR_EOD
    raise TokenizerError(f"no Hugging Face files for a {type(tokenizer).__name__}")


def to_backend(tokenizer: Tokenizer, base_dir: Path) -> Backend:
    """A `tokenizers.Tokenizer` that encodes as ours does (HF tokenizers: as they are, less a
    post-processor that adds tokens: we trained on documents without a BOS)."""
    if isinstance(tokenizer, HFTokenizer):
        backend = Backend.from_file(str(_own_file(tokenizer.file, base_dir)))
        if backend.num_special_tokens_to_add(is_pair=False):
            backend.post_processor = None
        return backend
    if isinstance(tokenizer, TiktokenTokenizer):
        return tiktoken_backend(tokenizer.enc)
    if isinstance(tokenizer, SentencePieceTokenizer):
        return sentencepiece_backend(_own_file(tokenizer.model_file, base_dir))
    if isinstance(tokenizer, CharTokenizer):
        return char_backend(tokenizer)
    raise TokenizerError(f"no Hugging Face files for a {type(tokenizer).__name__}")


def check_same_ids(tokenizer: Tokenizer, backend: Backend) -> None:
    """Refuse a converted tokenizer that encodes one of PROBES otherwise than ours."""
    for text in PROBES:
        try:
            ours = tokenizer.encode(text)
        except ValueError:  # a char tokenizer without these characters
            continue
        theirs = backend.encode(text, add_special_tokens=False).ids
        if theirs != ours:
            raise TokenizerError(
                f"the tokenizer.json converted from {tokenizer.describe().get('type')} encodes "
                f"{text!r} as {theirs[:20]}, ours as {ours[:20]}: it would not reproduce "
                "training's ids, so it is not written"
            )


# ------------------------------------------------------------------------------ char


def char_backend(tokenizer: CharTokenizer) -> Backend:
    """One token per character (newlines included), EOD a special token with our id."""
    vocab = {c: i for i, c in enumerate(tokenizer.chars)}
    vocab[CHAR_EOD] = tokenizer.eod_id
    # "[UNK]" is not in the vocabulary: a character outside it is an error, as with ours
    backend = Backend(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(CHAR_EOD, special=True, normalized=False)])
    return backend


# ------------------------------------------------------------------------------ tiktoken


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table of byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def tiktoken_vocab_and_merges(
    ranks: dict[bytes, int],
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocab and BPE merges from tiktoken's mergeable ranks: for each multi-byte
    token, every split whose halves are tokens (ordered by their ranks), in the token's rank
    order. Merging by these priorities is tiktoken's merge-by-lowest-rank."""
    table = bytes_to_unicode()
    as_text = lambda token: "".join(table[b] for b in token)  # noqa: E731
    vocab = {as_text(token): rank for token, rank in ranks.items()}
    merges: list[tuple[int, str, str]] = []
    for token, rank in ranks.items():
        splits = [
            (ranks[token[:i]], ranks[token[i:]], token[:i], token[i:])
            for i in range(1, len(token))
            if token[:i] in ranks and token[i:] in ranks
        ]
        merges += [(rank, as_text(left), as_text(right)) for *_, left, right in sorted(splits)]
    merges.sort(key=lambda merge: merge[0])
    return vocab, [(left, right) for _, left, right in merges]


def onig_pattern(pattern: str) -> str:
    """tiktoken's regex for the `tokenizers` library's Oniguruma, which reads a possessive
    counted repeat (`\\p{N}{1,3}+`) as "one or more of {1,3}". At the end of an alternative (as
    in every tiktoken pattern) the greedy form matches the same."""
    return re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", pattern)


def tiktoken_backend(enc) -> Backend:
    """A byte-level BPE `tokenizers.Tokenizer` equal to a tiktoken Encoding on ordinary text,
    with its special tokens (ids kept) as added special tokens."""
    vocab, merges = tiktoken_vocab_and_merges(enc._mergeable_ranks)
    vocab.update(enc._special_tokens)  # ids after a gap (cl100k: 100257) stay where they are
    backend = Backend(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(onig_pattern(enc._pat_str)), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    specials = sorted(enc._special_tokens, key=enc._special_tokens.get)
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return backend


# ------------------------------------------------------------------------------ sentencepiece

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # piece types
SPM_BPE = 2  # trainer_spec.model_type (1: unigram)


def sentencepiece_backend(model_file: Path) -> Backend:
    """The SentencePiece model as a `tokenizers.Tokenizer`: its normalizer (charsmap, extra
    whitespace, ▁ for spaces, dummy prefix), its BPE merges by piece score or its unigram
    scores, byte fallback, and control/unknown pieces as special tokens."""
    proto = read_sentencepiece_proto(model_file)
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    model_type = proto.trainer_spec.model_type
    if model_type not in (1, SPM_BPE):
        raise TokenizerError(
            f"{model_file}: SentencePiece model type {model_type} (only BPE and unigram models "
            "convert to a tokenizer.json)"
        )
    backend = Backend(_spm_model(pieces, model_type, proto.trainer_spec.byte_fallback))
    backend.normalizer = _spm_normalizer(proto.normalizer_spec)
    if not any("▁" in piece[1:] for piece, _, kind in pieces if kind == NORMAL):
        # no piece spans a word boundary: words can be encoded one by one (and cached)
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never", split=True)
    backend.decoder = _spm_decoder(proto.normalizer_spec.add_dummy_prefix)
    specials = [piece for piece, _, kind in pieces if kind in (CONTROL, UNKNOWN)]
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return backend


def read_sentencepiece_proto(model_file: Path):
    """The model's ModelProto (sentencepiece ships the protobuf module that reads it)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    return proto


def _spm_model(pieces: list[tuple[str, float, int]], model_type: int, byte_fallback: bool):
    unk = next((i for i, (_, _, kind) in enumerate(pieces) if kind == UNKNOWN), None)
    if model_type != SPM_BPE:
        vocab = [(piece, score) for piece, score, _ in pieces]
        return Unigram(vocab, unk_id=unk, byte_fallback=byte_fallback)
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    unk_token = pieces[unk][0] if unk is not None else None
    merges = _spm_merges(pieces)
    return BPE(vocab, merges, unk_token=unk_token, fuse_unk=True, byte_fallback=byte_fallback)


def _spm_merges(pieces: list[tuple[str, float, int]]) -> list[tuple[str, str]]:
    """Each normal piece's splits into two mergeable pieces, ordered by the piece's score
    (SentencePiece BPE merges the pair whose union scores highest) and then its id."""
    mergeable = {p: i for i, (p, _, kind) in enumerate(pieces) if kind in (NORMAL, USER_DEFINED)}
    merges: list[tuple[float, int, str, str]] = []
    for i, (piece, score, kind) in enumerate(pieces):
        if kind != NORMAL or len(piece) < 2:
            continue
        splits = [
            (mergeable[piece[:k]], mergeable[piece[k:]], piece[:k], piece[k:])
            for k in range(1, len(piece))
            if piece[:k] in mergeable and piece[k:] in mergeable
        ]
        merges += [(-score, i, left, right) for *_, left, right in sorted(splits)]
    merges.sort(key=lambda merge: merge[:2])
    return [(left, right) for *_, left, right in merges]


def _spm_normalizer(spec) -> normalizers.Normalizer | None:
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [
            normalizers.Strip(left=True, right=True),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if spec.add_dummy_prefix:  # always, even before a leading space (Metaspace would not)
        steps.append(normalizers.Prepend("▁"))
    return normalizers.Sequence(steps) if steps else None


def _spm_decoder(add_dummy_prefix: bool) -> decoders.Decoder:
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    return decoders.Sequence(steps)


def _unk_piece(tokenizer: SentencePieceTokenizer) -> str | None:
    unk = tokenizer.sp.unk_id()
    return tokenizer.sp.id_to_piece(unk) if unk >= 0 else None
