"""Pipeline parallelism through DeepSpeed's PipelineModule and pipeline engine (1F1B).

The whole model is built on the meta device (and cut for tensor parallelism), then laid out as
`model.pipeline.pipeline_layers`; DeepSpeed keeps the layers of this rank's stage (the
transformer blocks balanced over the stages, the embedding on the first, the head on the last),
whose parameters alone are then made (training/build.py). It runs the gradient-accumulation
micro-batches as its 1F1B schedule, and sums the gradients of the tied token embedding / output
head over the first and last stage. Ranks are laid out as
DeepSpeed's pipe x data x model topology, which is topology.Layout's order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn

from launcher.monitoring.metrics import StepLoss
from launcher.monitoring.timing import StepTimer
from launcher.runtime.topology import Layout
from model.gpt import GPT
from model.pipeline import TIED, TokenEmbedding, pipeline_layers

PARTITION = "type:PipeBlock"
"""Stages get equal numbers of transformer blocks (Megatron-DeepSpeed's `type:transformer`)."""


def _tied_spec(module: TokenEmbedding, forward_fn: Any = None) -> Any:
    """A TiedLayerSpec whose module already exists (DeepSpeed builds its specs; ours are views
    of the whole model)."""
    from deepspeed.pipe import TiedLayerSpec

    class Built(TiedLayerSpec):
        def build(self, log: bool = False) -> nn.Module:
            return module

    return Built(TIED, type(module), forward_fn=forward_fn, tied_weight_attr=["wte.weight"])


def pipeline_module(
    model: GPT, layout: Layout, tensor_rank: int, materialize: Callable[[nn.Module], None]
) -> nn.Module:
    """DeepSpeed's PipelineModule of `model` for `layout` (its stage's layers on this rank).
    `model` is on the meta device: once DeepSpeed has chosen this stage's layers, `materialize`
    makes their parameters (before it moves them to the device and broadcasts the tied matrix)."""
    from deepspeed.pipe import PipelineModule

    class Stage(PipelineModule):
        def _build(self) -> None:
            super()._build()  # this stage's layers, registered as its submodules
            materialize(self)

    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    layers: list[Any] = pipeline_layers(model)
    if model.config.tie_embeddings:  # one module on the first and the last stage
        layers[0] = _tied_spec(layers[0])
        layers[-1] = _tied_spec(layers[-1], forward_fn=TokenEmbedding.head)
    topology = PipeModelDataParallelTopology(
        num_pp=layout.pipeline, num_mp=layout.tensor, num_dp=layout.data
    )
    with torch.no_grad():  # it broadcasts the tied matrix from the first stage: not autograd's
        pipe = Stage(layers, topology=topology, loss_fn=model.loss, partition_method=PARTITION)
    _count_norms_once(pipe, tensor_rank)
    pipe.tensor_group = getattr(model, "tp", None)  # whose vocabulary shards the logits are
    return pipe


def _count_norms_once(pipe: nn.Module, tensor_rank: int) -> None:
    """Mark the parameters whose gradients this rank counts in the global gradient norm.

    DeepSpeed's fp32 path without ZeRO (runtime.utils.clip_grad_norm_) counts a parameter on
    the rank of model-parallel rank 0 (pipeline x tensor) or when it is marked model-parallel,
    so every stage after the first would leave its replicated parameters out, and the tied
    matrix would count on two stages. Marked here: what is split over the tensor ranks, and on
    tensor rank 0 everything else; never the second copy of the tied matrix (not even as split:
    that path does not skip `ds_pipe_replicated`). The ZeRO and bf16 paths, which count by
    tensor rank and skip `ds_pipe_replicated`, count the same as before the marks."""
    for p in pipe.parameters():
        if getattr(p, "ds_pipe_replicated", False):
            p.model_parallel = p.tensor_model_parallel = False
        else:
            p.model_parallel = getattr(p, "tensor_model_parallel", False) or tensor_rank == 0


def micro_batches(batches: Any, step: int, accum: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """The step's micro-batches, as the pipeline engine pulls them (first and last stage)."""
    return (batches.train(step, micro) for micro in range(accum))


def pipeline_step(
    engine: Any, batches: Any, step: int, accum: int, timer: StepTimer | None = None
) -> StepLoss:
    """One optimizer step through the 1F1B schedule; the loss is the mean over the
    micro-batches and the data-parallel ranks, known on every stage (so is the last
    micro-batch's: not separately). The timer sees the step whole: forward and backward
    interleave across micro-batches."""
    start = timer.mark() if timer else None
    loss = engine.train_batch(micro_batches(batches, step, accum)).detach().float()
    if timer:
        timer.micro_step(start, None, timer.mark())
    return StepLoss(loss, loss)


@torch.no_grad()
def pipeline_val_loss(engine: Any, batches: Any, n_batches: int) -> float:
    """Mean val loss over `n_batches` micro-batches per data-parallel rank (every stage)."""
    data = (batches.val(b) for b in range(n_batches))
    loss = engine.eval_batch(data, num_micro_batches=n_batches)
    return float(loss)


@torch.no_grad()
def pipeline_logits(engine: Any, idx: torch.Tensor) -> torch.Tensor:
    """The whole model's logits of `idx` (B, T) on every rank of the pipeline: one forward
    through the stages (DeepSpeed's inference schedule, any shape: the activation shapes are
    sent anew), the last stage's vocabulary shards gathered over its tensor group, then
    broadcast to the other stages. For sampling and task scoring, not for the training loss
    (that stays on the last stage). Collective over the whole world (eval_batch begins with a
    barrier): every rank calls it the same number of times."""
    engine.reset_activation_shape()
    engine.total_loss = None  # DeepSpeed sums each forward's output here: logits, not a loss
    _, logits = engine.eval_batch(
        iter([(idx, idx)]), return_logits=True, compute_loss=False, bcast_loss=False,
        num_micro_batches=1,
    )  # fmt: skip
    engine.reset_activation_shape()  # the training shapes are sent again at the next step
    engine.total_loss = None
    last = engine.grid.stage_to_global(engine.num_stages - 1)
    group = engine.grid.get_pipe_parallel_group()
    if engine.is_last_stage():
        tensor = engine.module.tensor_group
        if tensor is not None:
            from model.tensor_parallel import gather_from_region

            logits = gather_from_region(logits, tensor)
        logits = logits.float().contiguous()
        shape = torch.tensor(logits.shape, dtype=torch.long, device=idx.device)
    else:
        shape = torch.zeros(3, dtype=torch.long, device=idx.device)
    torch.distributed.broadcast(shape, src=last, group=group)
    if not engine.is_last_stage():
        logits = torch.empty(*shape.tolist(), dtype=torch.float32, device=idx.device)
    torch.distributed.broadcast(logits, src=last, group=group)
    return logits


class PipelinedModel:
    """The whole model, as sampling and task scoring use it, on the ranks of a pipeline:
    `model(idx) -> (logits, None)` and `generate` (without a KV cache: each new token runs the
    window through the stages again)."""

    _pick = staticmethod(GPT._pick)

    def __init__(self, engine: Any, config: Any) -> None:
        self.engine, self.config = engine, config

    def __call__(self, idx: torch.Tensor, targets: Any = None, cache: Any = None) -> tuple:
        return pipeline_logits(self.engine, idx), None

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
        return GPT.generate(self, idx, max_new_tokens, **{**kwargs, "use_cache": False})

    @property
    def training(self) -> bool:
        return self.engine.module.training

    def train(self, mode: bool = True) -> None:
        self.engine.module.train(mode)

    def eval(self) -> None:
        self.engine.module.eval()
