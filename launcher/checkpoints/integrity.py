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
from pathlib import Path

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


def hash_tag(tag_dir: Path, files: dict[str, int]) -> dict[str, str]:
    """Every rank: fsync and hash its share of a just-written tag's files; every rank gets all
    the hashes."""
    rank, world = _world()
    mine = {name: file_hash(tag_dir / name, sync=True) for name in share(files, rank, world)}
    if world == 1:
        return mine
    gathered: list[dict[str, str] | None] = [None] * world
    dist.all_gather_object(gathered, mine)
    return {name: h for part in gathered for name, h in (part or {}).items()}


def mismatch(tag_dir: Path, hashes: dict[str, str], names: list[str]) -> str | None:
    """The first of `names` whose bytes no longer match their recorded hash."""
    for name in names:
        path = tag_dir / name
        if not path.exists():
            return f"{name} is missing"
        if file_hash(path) != hashes[name]:
            return f"{name} has changed since it was saved (its content hash differs)"
    return None


def verify_together(tag_dir: Path, hashes: dict[str, str], sizes: dict[str, int]) -> str | None:
    """Every rank: check its share of the recorded hashes; every rank gets the same answer
    (the first problem any rank found, or None). A tag without hashes passes."""
    rank, world = _world()
    recorded = {n: sizes.get(n, 0) for n in hashes}
    problem = mismatch(tag_dir, hashes, share(recorded, rank, world))
    if world == 1:
        return problem
    gathered: list[str | None] = [None] * world
    dist.all_gather_object(gathered, problem)
    return next((p for p in gathered if p), None)
