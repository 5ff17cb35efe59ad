"""Pipeline parallelism through DeepSpeed's PipelineModule and pipeline engine (1F1B).

The whole model is built on every rank from one seed (and cut for tensor parallelism), then laid
out as `model.pipeline.pipeline_layers`; DeepSpeed keeps the layers of this rank's stage (the
transformer blocks balanced over the stages, the embedding on the first, the head on the last),
runs the gradient-accumulation micro-batches as its 1F1B schedule, and sums the gradients of the
tied token embedding / output head over the first and last stage. Ranks are laid out as
DeepSpeed's pipe x data x model topology, which is topology.Layout's order.
"""

from __future__ import annotations

from collections.abc import Iterator
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
    of the whole model built from the run's seed)."""
    from deepspeed.pipe import TiedLayerSpec

    class Built(TiedLayerSpec):
        def build(self, log: bool = False) -> nn.Module:
            return module

    return Built(TIED, type(module), forward_fn=forward_fn, tied_weight_attr=["wte.weight"])


def pipeline_module(model: GPT, layout: Layout, tensor_rank: int) -> nn.Module:
    """DeepSpeed's PipelineModule of `model` for `layout` (its stage's layers on this rank)."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    layers: list[Any] = pipeline_layers(model)
    if model.config.tie_embeddings:  # one module on the first and the last stage
        layers[0] = _tied_spec(layers[0])
        layers[-1] = _tied_spec(layers[-1], forward_fn=TokenEmbedding.head)
    topology = PipeModelDataParallelTopology(
        num_pp=layout.pipeline, num_mp=layout.tensor, num_dp=layout.data
    )
    with torch.no_grad():  # it broadcasts the tied matrix from the first stage: not autograd's
        pipe = PipelineModule(
            layers, topology=topology, loss_fn=model.loss, partition_method=PARTITION
        )
    _count_norms_once(pipe, tensor_rank)
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
