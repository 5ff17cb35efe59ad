"""Read a wandb offline run file (`run-ID.wandb`) back: wandb 0.31 ships no reader for it.

Layout: a 7-byte header (b":W&B", a 2-byte magic, a 1-byte version), then LevelDB log blocks of
32 KiB; each record is a 7-byte header (crc32c u32, length u16, type u8: 1 full, 2 first,
3 middle, 4 last) and its payload; whole payloads are serialized `Record` protobufs.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[pb.Record]:
    """Every whole record, in order (of a file still being written: those written so far)."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    out, pos, parts = [], HEADER, []
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # the block's tail is padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if pos + HEADER + length > len(data):
            break  # cut off: a run still writing, or killed while it wrote
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:  # zero padding up to the block end
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        if kind in (FULL, FIRST):
            parts = [payload]
        else:
            parts.append(payload)
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            out.append(record)
    return out


def history(path: Path) -> list[dict]:
    """Every logged history row, as {key: value} with `_step`."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def run_record(path: Path) -> pb.RunRecord:
    return next(r.run for r in records(path) if r.WhichOneof("record_type") == "run")


def alerts(path: Path) -> list[pb.AlertRecord]:
    return [r.alert for r in records(path) if r.WhichOneof("record_type") == "alert"]


def config(path: Path) -> dict:
    """The run's config as wandb.init recorded it ({key: value}), `_wandb` included."""
    return {item.key: json.loads(item.value_json) for item in run_record(path).config.update}


def declared_metrics(path: Path) -> dict[str, pb.MetricRecord]:
    """What `run.define_metric` declared: {name or glob: its MetricRecord}."""
    declared = [r.metric for r in records(path) if r.WhichOneof("record_type") == "metric"]
    return {m.name or m.glob_name: m for m in declared}
