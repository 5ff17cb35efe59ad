"""What a checkpoint holds besides DeepSpeed's tensors: one dataclass, every version read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.checkpoints.contract import FORMAT_VERSION, CheckpointMeta
from launcher.errors import UserError

V1 = Path(__file__).parent / "assets" / "zerolaunch_v1.json"


def test_a_file_written_by_zerolaunch_0_1_is_read() -> None:
    meta = CheckpointMeta.from_json(V1.read_text(), str(V1))
    assert meta.format_version == 1 and meta.precision == "fp32"  # from "bf16": false
    assert (meta.step, meta.consumed_samples, meta.run_id) == (10, 160, "53640bd20cfc")
    assert meta.own_val_loss == meta.val_loss and meta.zero_stage == 1
    assert meta.manifest["rng_state_rank0.pt"] == 14497


def test_written_and_read_back_unchanged() -> None:
    meta = CheckpointMeta(
        step=20,
        consumed_samples=320,
        run_id="abc",
        model={"n_layer": 2},
        zero_stage=3,
        world_size=4,
        precision="bf16",
        val_loss=2.5,
        val_step=10,
    )
    again = CheckpointMeta.from_json(meta.to_json(), "x")
    assert again == meta and again.format_version == FORMAT_VERSION
    assert again.own_val_loss is None  # val was measured at step 10, not at this step


def test_newer_or_foreign_files_are_refused_with_what_to_do() -> None:
    data = json.loads(V1.read_text()) | {"format_version": FORMAT_VERSION + 1}
    with pytest.raises(UserError, match="newer than this zerolaunch reads"):
        CheckpointMeta.from_json(json.dumps(data), "tag/zerolaunch.json")
    with pytest.raises(UserError, match="lacks step, consumed_samples, run_id"):
        CheckpointMeta.from_json('{"model": {}}', "tag/zerolaunch.json")
    with pytest.raises(UserError, match="not valid JSON"):
        CheckpointMeta.from_json("{", "tag/zerolaunch.json")


def test_a_tag_from_a_newer_zerolaunch_is_kept_and_refused_when_used(tmp_path: Path) -> None:
    from launcher.checkpoints import store

    ckpt_dir = tmp_path / "checkpoints"
    for step in (10, 20):
        tag = store.tag_for(step)
        (ckpt_dir / tag).mkdir(parents=True)
        (ckpt_dir / tag / "shard.pt").write_bytes(b"x" * step)
        meta = CheckpointMeta(step, 8 * step, "run", {}, 2, 2, "fp32")
        store.complete(ckpt_dir, tag, meta, keep_last=1)
    marker = ckpt_dir / "global_step20" / "zerolaunch.json"
    newer = json.loads(marker.read_text()) | {"format_version": FORMAT_VERSION + 1}
    marker.write_text(json.dumps(newer))
    # Complete (never skipped as a leftover, never rotated away) ...
    assert store.verify(ckpt_dir / "global_step20") is None
    store.rotate(ckpt_dir, keep_last=1)
    assert (ckpt_dir / "global_step20").is_dir()
    assert store.resolve_resume("auto", tmp_path) == (ckpt_dir / "global_step20", [])
    # ... and refused, with what to do, when a run would resume from it.
    with pytest.raises(UserError, match="newer than this zerolaunch reads"):
        store.read_meta(ckpt_dir / "global_step20")
