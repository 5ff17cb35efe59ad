"""Content hashes of a checkpoint's files: a flipped byte of the same size is caught.

Sizes (the manifest) catch a missing or truncated file; a hash per file, recorded in the
completion marker when the tag is saved, catches a changed one. Both ends share the work: the
files are dealt out to the ranks (largest first, to the least loaded), each rank hashes its
share while the tag's bytes are still in the page cache after the save, and on resume each rank
checks its share again. xxHash's XXH3-128 runs at about 20 GB/s per core, so hashing costs a
fraction of what writing the bytes did (figures: docs/benchmarks.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
import xxhash

ALGORITHM = "xxh3_128"
CHUNK = 16 << 20


def file_hash(path: Path, sync: bool = False) -> str:
    """`xxh3_128:<hex>` of a file's bytes; with `sync`, the file is on disk (fsync) first."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        if sync:
            os.fsync(f.fileno())
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return f"{ALGORITHM}:{digest.hexdigest()}"


def share(files: dict[str, int], rank: int, world: int) -> list[str]:
    """This rank's part of `files` (name -> size): the same deal on every rank, the bytes
    spread evenly (largest first, each to the least loaded rank)."""
    loads, mine = [0] * world, []
    for name, size in sorted(files.items(), key=lambda f: (-f[1], f[0])):
        target = loads.index(min(loads))
        loads[target] += size
        if target == rank:
            mine.append(name)
    return mine


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(value: Any) -> list[Any]:
    """Every rank's `value` (just this one's without a process group)."""
    rank, world = _world()
    if world == 1:
        return [value]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def hash_tag(tag_dir: Path, list_files: Callable[[], dict[str, int]]) -> tuple[dict, str | None]:
    """Every rank: fsync and hash its share of a just-written tag's files, listed once by rank
    0 (`list_files`) so that every rank deals the same list. Returns every file's hash and the
    first problem any rank met reading its share (the same on every rank)."""
    rank, world = _world()
    listing = [list_files() if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(listing, src=0)
    mine, problem = {}, None
    try:
        for name in share(listing[0], rank, world):
            mine[name] = file_hash(tag_dir / name, sync=True)
    except OSError as e:
        problem = f"rank {rank} could not read back {e.filename}: {e.strerror}"
    parts = _gather((mine, problem))
    hashes = {name: h for part, _ in parts for name, h in part.items()}
    return hashes, next((p for _, p in parts if p), None)


def mismatch(tag_dir: Path, hashes: dict[str, str], names: list[str]) -> str | None:
    """The first of `names` whose bytes no longer match their recorded hash, or cannot be
    read."""
    for name in names:
        path = tag_dir / name
        try:
            if file_hash(path) != hashes[name]:
                return f"{name} has changed since it was saved (its content hash differs)"
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as e:
            return f"{name} cannot be read ({e.strerror})"
    return None


def verify_together(
    tag_dir: Path, hashes: dict[str, str], sizes: dict[str, int], problem: str | None = None
) -> str | None:
    """Every rank (always, whatever it found): check its share of the recorded hashes; every
    rank gets the same answer, the first problem any rank found (`problem`: one this rank
    already knows of), or None. A tag without hashes passes."""
    rank, world = _world()
    if problem is None:
        recorded = {n: sizes.get(n, 0) for n in hashes}
        problem = mismatch(tag_dir, hashes, share(recorded, rank, world))
    return next((p for p in _gather(problem) if p), None)
