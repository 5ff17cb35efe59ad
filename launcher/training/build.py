"""The rank's model, built without ever holding the whole of it.

The GPT is built on the meta device (no memory), cut for tensor parallelism there (each split
matrix keeps this rank's shard, still on meta), and then each parameter this rank keeps is made
on its device, one at a time (model/init.py): drawn from the run's seed, or taken from the
weights of checkpoint.init_from / model.init_from. A pipeline stage makes only its own layers
(once DeepSpeed's PipelineModule has chosen them); under ZeRO-3 each block is partitioned as
soon as it is made, so a rank holds one whole block at most. The values are those of the whole
model drawn from the seed (a shard is cut from its whole tensor), whatever the layout.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn as nn

from launcher.checkpoints import hf, store
from launcher.runtime.topology import ParallelGroups
from launcher.training import sequence_parallel
from launcher.training.engine import Zero3Partitioner, use_deepspeed_checkpointing
from launcher.training.memory import ModelBuild, held_parameter_bytes, host_peak, reset_host_peak
from launcher.training.pipeline import pipeline_module
from launcher.training.plan import RunPlan
from model.gpt import GPT, GPTConfig
from model.init import Materializer, initial_value, parameter_names, stored_value
from model.tensor_parallel import TPGroup, parallelize, shard_tensor, split_layout

Source = Callable[[str, torch.Size], torch.Tensor]
"""(a parameter's name in the whole GPT, its whole shape) -> its whole value on the device."""


def build_measured(
    plan: RunPlan, groups: ParallelGroups | None, device: torch.device
) -> tuple[nn.Module, ModelBuild]:
    """build_model, with how long it took, what the rank holds after and its host memory peak."""
    start, resident = time.perf_counter(), reset_host_peak()
    model = build_model(plan, groups, device)
    peak = host_peak()
    growth = None if resident is None or peak is None else max(peak - resident, 0)
    held = held_parameter_bytes(model)
    return model, ModelBuild(time.perf_counter() - start, held, growth)


def build_model(plan: RunPlan, groups: ParallelGroups | None, device: torch.device) -> nn.Module:
    """This rank's model on `device`: the GPT, or its tensor-parallel shard, or DeepSpeed's
    PipelineModule of its stage; under ZeRO-3 already partitioned over the data-parallel ranks."""
    config, layout = plan.spec.model, plan.layout
    with torch.device("meta"):
        model = GPT(config)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    tp = None
    if groups is not None and layout.tensor > 1:
        tp = TPGroup(groups.groups["tensor"], groups.coords["tensor"], layout.tensor)
        model = parallelize(model, tp)
    if groups is not None and layout.sequence > 1:
        sequence = (groups.groups["sequence"], groups.coords["sequence"], layout.sequence)
        sequence_parallel.enable(model, *sequence)
    value = shard_values(_source(plan, device), shapes, config, tp)
    materialize = Materializer(parameter_names(model), value)
    if layout.pipeline > 1:
        use_deepspeed_checkpointing(model, plan.engine.activation_checkpointing)
        return pipeline_module(model, layout, plan.coords["tensor"], materialize)
    if plan.engine.zero_stage == 3:
        partition = Zero3Partitioner(plan.engine, groups)
        for unit in _units(model):  # one whole unit at a time
            materialize(unit)
            partition(unit)
    materialize(model)  # (after ZeRO-3's units: nothing left)
    return model


def _units(model: GPT) -> list[nn.Module]:
    """The modules ZeRO-3 partitions one after another, in the order of model.parameters()."""
    units: list[nn.Module] = []
    for module in model.transformer.values():
        units.extend(module if isinstance(module, nn.ModuleList) else [module])
    return [*units, model.lm_head]


def _source(plan: RunPlan, device: torch.device) -> Source:
    """Where the whole values come from: the init weights when a new run starts from some (read
    lazily: a tensor at a time where the checkpoint allows), else the seed."""
    config, seed = plan.spec.model, plan.spec.train.seed
    if not plan.reads_init_weights:  # a new run from the seed, or a resume (DeepSpeed loads)
        return lambda name, shape: initial_value(name, shape, config.n_layer, seed, device)
    if plan.init_from is not None:
        weights = store.load_weights(plan.init_from, lazy=True)
    else:
        weights = hf.load_state(plan.init_hf, config, lazy=True)

    return lambda name, shape: stored_value(weights, name, shape, device)


def shard_values(
    source: Source, shapes: dict[str, torch.Size], config: GPTConfig, tp: TPGroup | None
) -> Callable[[str, nn.Parameter], torch.Tensor]:
    """materialize's value: the whole tensor from `source`, cut to this rank's tensor-parallel
    shard where the parameter is split."""

    def value(name: str, param: nn.Parameter) -> torch.Tensor:
        full = source(name, shapes[name])
        layout = split_layout(name, config) if tp is not None else None
        return full if layout is None else shard_tensor(full, layout, tp.rank, tp.size)

    return value
