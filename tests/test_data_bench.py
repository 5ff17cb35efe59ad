"""The plumbing of `python -m data_pipeline.bench --memory` on a few MB (the figures themselves
are docs/data.md's, from 2 GB inputs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import PYTHON, run


@pytest.mark.integration  # the plays come from the package registry once (cached)
def test_memory_bench_prepares_every_kind_and_samples_the_process_tree(tmp_path: Path) -> None:
    cmd = [PYTHON, "-m", "data_pipeline.bench", "--memory", "--gb", "0.003", "--workers", "2"]
    result = run([*cmd, "--dir", str(tmp_path)])
    r = json.loads(result.stdout)
    assert r["same_tokens_from_every_input"] and set(r["inputs"]) == {"txt", "jsonl", "parquet"}
    raw = r["raw_tokenizer"]
    assert raw["tokens_per_sec"] > 0 and raw["2_processes_encode_to_numpy"]["tokens"] > 0
    for kind, row in r["inputs"].items():
        assert row["tokens"] == raw["2_threads_encode_ordinary_batch"]["tokens"], kind
        assert row["processes"] == 3  # the main process and 2 workers were seen
        assert 0 < row["peak_pss_sum_mib"] <= row["peak_rss_sum_mib"]
        assert row["peak_rss_sum_mib"] <= row["sum_of_process_peaks_mib"] < 1024
        assert row["under_1_gib"] and row["vs_raw_tokenizer"] > 0
    assert not list(tmp_path.iterdir())  # its inputs and outputs are deleted
