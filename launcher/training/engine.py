"""The DeepSpeed engine around the model: the spec's optimizer, DeepSpeed's activation
checkpointing when the JSON asks for it, and the engine itself."""

from __future__ import annotations

from typing import Any

import torch

from launcher.config.ds_config import ActivationCheckpointing, EngineSettings
from launcher.config.spec import TrainConfig
from launcher.training.schedule import lr_at
from model.gpt import GPT, param_groups


def build_optimizer(
    model: torch.nn.Module, train: TrainConfig, offload_optimizer: str
) -> torch.optim.Optimizer:
    """The spec's AdamW: DeepSpeed's CPU Adam when the optimizer is offloaded (to the CPU or to
    NVMe, whose states are stepped on the CPU too), else torch's fused AdamW."""
    groups = param_groups(model, train.weight_decay)
    betas = (train.beta1, train.beta2)
    if offload_optimizer in ("cpu", "nvme"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr_at(0, train), betas=betas, adamw_mode=True)
    # Fused on GPUs and on CPUs alike: one kernel over all tensors. On this project's 2-core CPU
    # it steps a 10.7M-parameter model in 7 ms against 27 ms for torch's CPU default.
    return torch.optim.AdamW(groups, lr=lr_at(0, train), betas=betas, fused=True)


def use_deepspeed_checkpointing(model: GPT, section: ActivationCheckpointing | None) -> None:
    """With an `activation_checkpointing` section in the DeepSpeed JSON, the blocks the spec
    checkpoints go through DeepSpeed's checkpointing (partitioned / CPU activations)."""
    if section is None:
        return
    import deepspeed

    deepspeed.checkpointing.configure(
        None,
        partition_activations=section.partition_activations,
        contiguous_checkpointing=section.contiguous_memory_optimization,
        num_checkpoints=section.number_checkpoints,
        checkpoint_in_cpu=section.cpu_checkpointing,
        synchronize=section.synchronize_checkpoint_boundary,
        profile=section.profile,
    )
    model.checkpoint_fn = deepspeed.checkpointing.checkpoint


OWN_MONITORS = ("tensorboard", "csv_monitor", "wandb")
"""DeepSpeed JSON sections the launcher's own sinks serve (monitoring/sinks.py: every metric)."""


def deepspeed_config(ds_config: dict) -> dict:
    """The JSON for deepspeed.initialize: without the `tensorboard`, `csv_monitor` and `wandb`
    sections, which rank 0 serves itself with every metric; DeepSpeed would open a second writer
    into the same directory (a second wandb run) for its own three, plotted against samples."""
    return {key: value for key, value in ds_config.items() if key not in OWN_MONITORS}


class Zero3Partitioner:
    """ZeRO-3: partitions modules' parameters over the data-parallel ranks as they are made, as
    deepspeed.initialize would (DeepSpeed's zero.Init on a built module: the training precision,
    the JSON's parameter offload), so that the next module is made in the memory freed. One
    zero.Init serves every module (the first's; the others go through its converter), so its
    settings and an NVMe swapper are made once. With sequence parallelism over the sequence x
    data ranks: DeepSpeed would partition over mpu's data-parallel ranks while ZeRO-3 reduces
    the gradients over those (every parameter's gradient landing in the wrong places: 0.007 off
    after one step)."""

    def __init__(self, settings: EngineSettings, mpu: Any = None) -> None:
        self.settings, self.mpu = settings, mpu
        self.convert: Any = None

    def __call__(self, module: torch.nn.Module) -> None:
        params = list(module.parameters())
        if not params:
            return
        if self.convert is not None:
            self.convert(params)  # skips the ones already partitioned (a tied matrix)
            return
        import deepspeed

        group, mpu = None, self.mpu
        if mpu is not None and mpu.layout.sequence > 1:
            group = mpu.get_sequence_data_parallel_group()
        elif mpu is not None:
            group = mpu.get_data_parallel_group()
        config = deepspeed_config(self.settings.ds_config)
        deepspeed.zero.Init(
            module=module, data_parallel_group=group, config_dict_or_path=config, mpu=mpu
        )
        self.convert = params[0].convert_to_zero_parameters


def build_engine(
    model: torch.nn.Module,
    train: TrainConfig,
    settings: EngineSettings,
    async_save: bool = False,
    mpu: Any = None,
) -> Any:
    """Wrap the model in a DeepSpeed engine with the spec's optimizer (and, for asynchronous
    saves, checkpoints/async_save.py's writer as its checkpoint engine). `mpu` (the layout's
    ParallelGroups, with model parallelism) tells DeepSpeed which ranks average gradients and
    which share a layer: gradient norms count every tensor-parallel shard once, checkpoints are
    written per tensor-parallel rank (mp_rank_NN)."""
    import deepspeed

    if isinstance(model, GPT):  # a PipelineModule's blocks were given it before
        use_deepspeed_checkpointing(model, settings.activation_checkpointing)
    optimizer = build_optimizer(model, train, settings.offload_optimizer)
    config = deepspeed_config(settings.ds_config)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=mpu)
    if settings.zero_stage == 0 and settings.dp_size == 1:
        # Nothing to average with: skip the flatten-all-reduce-copy-back of every gradient.
        engine.enable_backward_allreduce = False
    if train.compile:  # in place (nn.Module.compile): parameter names and checkpoints unchanged
        engine.compile()
    if async_save:
        from launcher.checkpoints.async_save import AsyncWriter

        engine.checkpoint_engine = AsyncWriter()
    return engine


def repair_universal_load(engine: Any, train: TrainConfig) -> None:
    """After any universal load: DeepSpeed 0.19.8's loader (seen at ZeRO-3) gives every
    parameter group the first group's weight decay and all groups one shared Adam `step` tensor,
    which fused AdamW then advances once per group (a 4-rank ZeRO-3 tag resumed on 2 ranks
    drifted 0.012 from the unchanged run within 4 steps). Put back the spec's groups (as
    `param_groups` makes them) and one step counter per state; where the loader got them right
    this changes nothing."""
    groups = engine.optimizer.param_groups
    spec_groups = param_groups(torch.nn.Module(), train.weight_decay)  # their settings, in order
    if len(groups) == len(spec_groups):
        for group, spec_group in zip(groups, spec_groups):
            group["weight_decay"] = spec_group["weight_decay"]
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in base.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def set_lr(engine: Any, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
