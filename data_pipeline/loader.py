"""Open the datasets a run names, check they agree, and build its train and val samples."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.foreign import FORMS, ForeignDataError, check_token_ids
from data_pipeline.gpt_dataset import BlendedSamples, DocumentRange, GPTSamples, carve
from data_pipeline.indexed import IndexedDataset, IndexedDatasetError, bin_path, idx_path
from data_pipeline.tokenizers import (
    Tokenizer,
    describe_identity,
    identity,
    load_tokenizer,
    same_identity,
)

PREPARE_HINT = (
    "python -m data_pipeline.prepare --source shakespeare --tokenizer char --out {prefix}"
)


class DataError(ValueError):
    """The run's data is missing, damaged or inconsistent; the message says what to do."""


@dataclass
class Source:
    """An opened indexed dataset with its PREFIX.json (or, for one made elsewhere, what the
    spec's data.tokenizer says of it)."""

    prefix: Path
    weight: float
    dataset: IndexedDataset
    meta: dict
    declared: Tokenizer | None = None
    """The spec's data.tokenizer, where it is set."""
    foreign: bool = False
    """Made by another tool (Megatron-LM, GPT-NeoX): no PREFIX.json, tokenizer `declared`."""

    @property
    def name(self) -> str:
        return self.prefix.name


DATASET_SUFFIXES = (".bin", ".idx", ".json")


def dataset_prefix(path: str | Path) -> Path:
    """The prefix meant by a path: `data/x.bin`, `.idx` or `.json` of a dataset `data/x` is
    `data/x` (the files of one dataset share its prefix)."""
    path = Path(path)
    if path.suffix not in DATASET_SUFFIXES or idx_path(path).is_file():
        return path
    stem = path.with_suffix("")
    if Path(f"{stem}.json").is_file() or idx_path(stem).is_file():
        return stem
    return path


def _prefixes_in(directory: Path) -> list[str]:
    return sorted(
        str(p.with_suffix("")) for p in directory.glob("*.json") if p.with_suffix(".idx").exists()
    )


def open_source(
    prefix: str | Path, weight: float = 1.0, declared: Tokenizer | None = None
) -> Source:
    """Open PREFIX.{json,idx,bin}; a missing or damaged dataset says how to prepare it. A
    `.bin/.idx` without PREFIX.json (made elsewhere) opens with the `declared` tokenizer."""
    prefix = dataset_prefix(prefix)
    meta_file = Path(f"{prefix}.json")
    if prefix.is_dir() and not meta_file.exists():
        found = _prefixes_in(prefix)
        which = f"; the datasets in it: {', '.join(found)}" if found else ""
        raise DataError(
            f"{prefix} is a directory: give the prefix of a prepared dataset (the path of its "
            f".bin/.idx/.json without the suffix, e.g. data/shakespeare_char){which}"
        )
    if not meta_file.exists() and (bin_path(prefix).exists() or idx_path(prefix).exists()):
        return _open_foreign(prefix, weight, declared)
    if not meta_file.exists():
        raise DataError(
            f"no prepared dataset at {prefix} ({meta_file} is missing). Prepare it first, e.g. "
            + PREPARE_HINT.format(prefix=prefix)
        )
    meta = _read_meta(meta_file, prefix)
    try:
        dataset = IndexedDataset(prefix)
    except IndexedDatasetError as e:
        raise DataError(f"{e}. Prepare {prefix} again") from e
    if dataset.num_documents != meta.get("documents"):
        raise DataError(
            f"{prefix}: the index has {dataset.num_documents} documents but {meta_file} says "
            f"{meta.get('documents')}; the files come from different runs. Prepare it again"
        )
    return Source(prefix, weight, dataset, meta, declared)


def _open_foreign(prefix: Path, weight: float, declared: Tokenizer | None) -> Source:
    """A .bin/.idx made by another tool: its files are never written to, and its tokenizer is
    the spec's data.tokenizer."""
    try:
        dataset = IndexedDataset(prefix)
    except IndexedDatasetError as e:
        raise DataError(f"{e} ({prefix} has no {prefix.name}.json: made by another tool)") from e
    if declared is None:
        raise DataError(
            f"{prefix}.bin/.idx has no {prefix.name}.json: it was made by another tool "
            "(Megatron-LM, GPT-NeoX), so the run must say what it was tokenized with: set "
            f"data.tokenizer to {FORMS} (a vocabulary size and EOD id only: training "
            "without sampling)"
        )
    meta = {
        "documents": dataset.num_documents,
        "tokenizer": declared.describe(),
        "vocab_size": declared.vocab_size,
        "eod_id": declared.eod_id,
    }
    return Source(prefix, weight, dataset, meta, declared, foreign=True)


# The fields of PREFIX.json training reads, and what each must be.
META_FIELDS = {"documents": int, "tokenizer": dict, "vocab_size": int, "eod_id": int}


def _read_meta(meta_file: Path, prefix: Path) -> dict:
    """PREFIX.json, checked: a damaged one names itself and says to prepare again."""
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{meta_file} is not valid JSON ({e}); prepare {prefix} again") from e
    if not isinstance(meta, dict):
        raise DataError(f"{meta_file} is not a dataset description; prepare {prefix} again")
    for field, kind in META_FIELDS.items():
        value = meta.get(field)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise DataError(
                f"{meta_file}: {field!r} is {value!r}, not the {kind.__name__} `prepare` writes; "
                f"the file is damaged: prepare {prefix} again"
            )
    fraction = meta.get("val_fraction")
    if fraction is not None and (not isinstance(fraction, (int, float)) or not 0 <= fraction < 1):
        raise DataError(f"{meta_file}: val_fraction {fraction!r} is not in [0, 1); prepare again")
    return meta


def run_tokenizer(sources: list[Source]) -> Tokenizer:
    """The one tokenizer every source was prepared with: the same identity (kind, vocabulary
    or model file hash, size, EOD), wherever each dataset keeps its copy of the files; and the
    one data.tokenizer declares, where it is set."""
    tokenizers = [_source_tokenizer(source) for source in sources]
    for source, tokenizer in zip(sources, tokenizers):
        if source.declared is not None and not source.foreign:
            _check_declared(source, tokenizer)
    first, mine = sources[0], identity(tokenizers[0])
    for other, tokenizer in zip(sources[1:], tokenizers[1:]):
        if not same_identity(identity(tokenizer), mine):
            raise DataError(
                f"{other.prefix} was tokenized with {describe_identity(identity(tokenizer))} but "
                f"{first.prefix} with {describe_identity(mine)}; blended datasets need one "
                "tokenizer"
            )
    return tokenizers[0]


def _check_declared(source: Source, tokenizer: Tokenizer) -> None:
    """data.tokenizer and a dataset's PREFIX.json name the same tokenizer (identity)."""
    declared, recorded = identity(source.declared), identity(tokenizer)
    if not same_identity(declared, recorded):
        raise DataError(
            f"data.tokenizer is {describe_identity(declared)}, but {source.prefix}.json says "
            f"{source.prefix} was prepared with {describe_identity(recorded)}; set "
            "data.tokenizer to the dataset's tokenizer, or null to take it from PREFIX.json"
        )


def _source_tokenizer(source: Source) -> Tokenizer:
    if source.foreign:
        return source.declared
    try:
        return load_tokenizer(source.meta["tokenizer"], source.prefix.parent)
    except (ValueError, KeyError, TypeError, OSError) as e:  # TokenizerError is a ValueError
        raise DataError(
            f"{source.prefix}.json: its tokenizer cannot be loaded ({type(e).__name__}: {e}); "
            f"prepare {source.prefix} again"
        ) from e


def split_ranges(
    train: list[Source], val: list[Source] | None, val_fraction: float | None, need_val: bool = True
) -> tuple[list[DocumentRange], list[DocumentRange] | None]:
    """Document ranges for train and val: separate val sources, or carved from each train one.

    Without evaluation (need_val false) and nothing to carve, train keeps every document.
    """
    whole = lambda s: DocumentRange(s.dataset, 0, s.dataset.num_documents)  # noqa: E731
    if val is not None:
        return [whole(s) for s in train], [whole(s) for s in val]
    fractions = [
        val_fraction if val_fraction is not None else s.meta.get("val_fraction", 0) for s in train
    ]
    if not need_val and not any(fractions):
        return [whole(s) for s in train], None
    train_ranges, val_ranges = [], []
    for source, fraction in zip(train, fractions):
        if source.foreign and val_fraction is None:
            raise DataError(
                f"{source.prefix} was made by another tool and records no val_fraction to carve "
                "a val split with: set data.val_fraction (e.g. 0.01), give data.val, or turn "
                "evaluation off (eval.interval: 0)"
            )
        try:
            t, v = carve(source.dataset, fraction)
        except ValueError as e:
            raise DataError(str(e)) from e
        train_ranges.append(t)
        val_ranges.append(v)
    return train_ranges, val_ranges


def build_samples(
    ranges: list[DocumentRange],
    sources: list[Source],
    seq_len: int,
    seed: int,
    index_cache: str | None,
) -> BlendedSamples:
    """Blended samples over the ranges, weights from their sources."""
    samples = []
    for r, source in zip(ranges, sources):
        try:
            samples.append(GPTSamples(r, seq_len, seed, cache_dir(source, index_cache)))
        except ValueError as e:
            raise DataError(str(e)) from e
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    return BlendedSamples(samples, [s.weight for s in sources], names)


def cache_dir(source: Source, index_cache: str | None) -> Path:
    """Where a source's sample index and token scan are cached: data.index_cache, or
    PREFIX.cache beside the dataset."""
    return Path(index_cache) if index_cache else Path(f"{source.prefix}.cache")


def check_foreign_ids(
    sources: list[Source], tokenizer: Tokenizer, index_cache: str | None, is_builder: bool
) -> None:
    """Every token id of each dataset made elsewhere is below the tokenizer's vocabulary:
    scanned once per dataset (the builder scans, the others wait for its cached result)."""
    for source in sources:
        if source.foreign:
            try:
                check_token_ids(
                    source.dataset, tokenizer, cache_dir(source, index_cache), is_builder
                )
            except ForeignDataError as e:
                raise DataError(str(e)) from e
