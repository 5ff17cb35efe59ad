"""Where each rank sits in the 3D layout (pipeline, data, sequence, tensor), its process groups,
and the `mpu` object DeepSpeed asks for them (with sequence parallelism, gradients are reduced
and ZeRO shards over the sequence x data ranks, which hold the same weights).

Ranks are numbered with the tensor axis fastest, then sequence, then data, then pipeline
(Megatron's order, and DeepSpeed's pipe topology's): the tensor-parallel ranks of one layer are
consecutive, so with `--ntasks-per-node` a multiple of `parallel.tensor` they share a node and
its NVLink; data-parallel replicas and pipeline stages span nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from launcher.config.spec import ParallelConfig

AXES = ("pipeline", "data", "sequence", "tensor")
"""Slowest to fastest."""
BUILT = {"tensor", "sequence", "pipeline"}
"""The model-parallel axes this version trains with."""
SEQ_DATA = "sequence_data"
"""The group of ranks that differ only in their sequence and data coordinates."""


@dataclass(frozen=True)
class Layout:
    """Sizes of the four axes; their product is the world size."""

    pipeline: int = 1
    data: int = 1
    sequence: int = 1
    tensor: int = 1

    @classmethod
    def of(cls, parallel: ParallelConfig, world_size: int) -> Layout:
        """The layout of `parallel` on `world_size` ranks (the data axis takes what is left;
        `layout_problems` first: this assumes it divides)."""
        model = parallel.tensor * parallel.pipeline * parallel.sequence
        return cls(parallel.pipeline, max(1, world_size // model), parallel.sequence,
                   parallel.tensor)  # fmt: skip

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(getattr(self, axis) for axis in AXES)

    @property
    def world_size(self) -> int:
        n = 1
        for size in self.sizes:
            n *= size
        return n

    @property
    def model_parallel(self) -> int:
        """Ranks holding one model replica between them."""
        return self.tensor * self.pipeline * self.sequence

    def coords(self, rank: int) -> dict[str, int]:
        """{axis: index} of a rank."""
        found = {}
        for axis, size in reversed(list(zip(AXES, self.sizes))):
            found[axis] = rank % size
            rank //= size
        return found

    def rank_of(self, coords: dict[str, int]) -> int:
        rank = 0
        for axis, size in zip(AXES, self.sizes):
            rank = rank * size + coords[axis]
        return rank

    def group_ranks(self, *axes: str) -> list[list[int]]:
        """Every group along `axes`: ranks that differ only in those coordinates."""
        groups: dict[tuple, list[int]] = {}
        for rank in range(self.world_size):
            coords = self.coords(rank)
            key = tuple(v for a, v in coords.items() if a not in axes)
            groups.setdefault(key, []).append(rank)
        return list(groups.values())

    def describe(self) -> str:
        parts = [f"{getattr(self, a)} {a}" for a in ("tensor", "pipeline", "sequence")
                 if getattr(self, a) > 1]  # fmt: skip
        return " x ".join([*parts, f"{self.data} data"]) + " parallel"


def layout_problems(parallel: ParallelConfig, world_size: int, model: Any) -> list[str]:
    """Every reason the layout cannot run: sizes below 1, axes not built yet, a world size
    the model-parallel ranks do not divide, a model the tensor axis cannot split."""
    problems = []
    for axis in ("tensor", "pipeline", "sequence"):
        size = getattr(parallel, axis)
        if size < 1:
            problems.append(f"parallel.{axis}: must be >= 1, got {size}")
        elif size > 1 and axis not in BUILT:
            problems.append(
                f"parallel.{axis}={size}: {axis} parallelism is not built yet (tensor and "
                f"sequence parallelism are); set parallel.{axis}=1"
            )
    if any(getattr(parallel, axis) < 1 for axis in ("tensor", "pipeline", "sequence")):
        return problems
    per_replica = parallel.tensor * parallel.pipeline * parallel.sequence
    if world_size % per_replica:
        fits = [n for n in range(per_replica, 8 * per_replica + 1, per_replica)]
        problems.append(
            f"parallel: tensor x pipeline x sequence = {per_replica} does not divide the "
            f"{world_size} rank(s); launch a multiple of {per_replica} ranks (e.g. "
            f"{', '.join(map(str, fits[:4]))}) or change the layout"
        )
    if parallel.tensor > 1 and model is not None:
        from model.tensor_parallel import tp_problems

        problems += tp_problems(model, parallel.tensor)
    if parallel.sequence > 1 and model is not None:
        problems += sequence_problems(model, parallel.tensor, parallel.sequence)
    if parallel.pipeline > 1 and model is not None:
        problems += pipeline_problems(model, parallel.pipeline, parallel.sequence)
    return problems


def pipeline_problems(model: Any, pipeline: int, sequence: int) -> list[str]:
    """Each stage takes whole transformer blocks, at least one; DeepSpeed's pipe topology has
    no sequence axis."""
    problems = []
    if pipeline > model.n_layer:
        problems.append(
            f"parallel.pipeline={pipeline} exceeds model.n_layer={model.n_layer}: each stage "
            f"needs at least one transformer block; use at most {model.n_layer} stages"
        )
    if sequence > 1:
        problems.append(
            f"parallel.pipeline={pipeline} with parallel.sequence={sequence}: DeepSpeed's "
            "pipeline engine lays ranks out as pipe x data x model and has no sequence axis; "
            "combine pipeline with tensor parallelism instead, or sequence with tensor"
        )
    return problems


def sequence_problems(model: Any, tensor: int, sequence: int) -> list[str]:
    """Ulysses trades sequence slices for heads: each tensor rank's query and key/value heads
    must split over the sequence ranks, and the context into equal slices."""
    problems = []
    for name, heads in (("model.n_head", model.n_head), ("model.n_kv_head", model.kv_heads)):
        if heads % (tensor * sequence):
            problems.append(
                f"{name}={heads} does not split over parallel.tensor x parallel.sequence = "
                f"{tensor} x {sequence} (Ulysses gives each sequence rank whole heads): use "
                f"sizes whose product divides {heads}"
            )
    if model.block_size % sequence:
        problems.append(
            f"model.block_size={model.block_size} is not divisible by parallel.sequence="
            f"{sequence}: each sequence rank takes an equal slice"
        )
    return problems


class ParallelGroups:
    """This rank's process groups along every axis, and the names DeepSpeed's `mpu` argument
    asks for (Megatron's: "model parallel" is the tensor axis). Every rank creates every group,
    in the same order, as torch.distributed.new_group requires."""

    def __init__(self, layout: Layout, rank: int) -> None:
        import torch.distributed as dist

        self.layout, self.rank = layout, rank
        self.coords = layout.coords(rank)
        self.groups: dict[str, Any] = {}
        self.members: dict[str, list[int]] = {}
        # One group per axis, and the sequence x data ranks (which reduce gradients and shard
        # ZeRO's states when the sequence is split: they all hold the same weights).
        for name, axes in [*((axis, (axis,)) for axis in AXES), (SEQ_DATA, ("sequence", "data"))]:
            for ranks in layout.group_ranks(*axes):
                group = dist.new_group(ranks)
                if rank in ranks:
                    self.groups[name], self.members[name] = group, ranks

    # DeepSpeed's mpu interface (deepspeed/runtime/engine.py, zero/stage_1_and_2.py, utils.py)
    def get_data_parallel_group(self) -> Any:
        return self.groups["data"]

    def get_data_parallel_rank(self) -> int:
        return self.coords["data"]

    def get_data_parallel_world_size(self) -> int:
        return self.layout.data

    def get_model_parallel_group(self) -> Any:
        return self.groups["tensor"]

    def get_model_parallel_rank(self) -> int:
        return self.coords["tensor"]

    def get_model_parallel_world_size(self) -> int:
        return self.layout.tensor

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.members["tensor"][0]

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.layout.pipeline

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.coords["pipeline"]

    def get_sequence_parallel_world_size(self) -> int:
        return self.layout.sequence

    def get_sequence_parallel_group(self) -> Any:
        return self.groups["sequence"]

    def get_sequence_parallel_rank(self) -> int:
        return self.coords["sequence"]

    def get_sequence_data_parallel_group(self) -> Any:
        return self.groups[SEQ_DATA]

    def get_sequence_data_parallel_rank(self) -> int:
        return self.members[SEQ_DATA].index(self.rank)

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.layout.sequence * self.layout.data
