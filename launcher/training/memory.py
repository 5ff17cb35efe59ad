"""Per-device memory: an estimate before launch, and what a live engine really holds.

Model states follow the ZeRO paper (Rajbhandari et al., 2020) for Psi parameters on W ranks:
parameters and gradients at the training precision (2 bytes in bf16/fp16, 4 in fp32), and the
optimizer holding an fp32 master copy plus Adam's two moments (12 bytes; 8 in plain fp32 ZeRO-0,
where the parameters are the master copy). Stage 1 shards the optimizer, stage 2 the gradients
too, stage 3 the parameters too; offload moves the optimizer (and with stage 3 the parameters)
to CPU memory (to NVMe: off both). Training in 16 bits, DeepSpeed's ZeRO optimizers also make
an fp32 copy of the rank's gradient partition for the optimizer step (stage 3: one sub-group at
a time), so a 16-bit ZeRO-2 rank holds 2 Psi + 18 Psi / W bytes of model states: the figure of
DeepSpeed's own `estimate_zero2_model_states_mem_needs`, printed beside ours by
`zerolaunch check`. That copy lives only during the step, after backward has freed the
activations, so the peak counts the larger of the two, not both (on an H200, 1.3B at block
1024, micro-batch 4, bf16, one rank: measured 25.9 / 26.7 / 26.7 / 29.2 GiB at ZeRO 0-3
against 27.5 / 29.4 / 29.4 / 29.4 estimated; the sum had said 34.2 at ZeRO-1 and 2).
Activations follow Korthikanti et al. (2022), generalised to the Llama options
(`activation_bytes`): 34 s b h bytes per GPT-2 layer in 16 bits (attention scores are not kept:
SDPA's fused kernels), only the layer inputs with full checkpointing plus one layer being
recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from launcher.config.ds_config import EngineSettings
from model.gpt import GPTConfig, count_params

GIB = 2**30
MIB = 2**20


@dataclass
class Estimate:
    """Bytes per device."""

    params: float
    grads: float
    step_grads: float
    """fp32 copy of the gradient partition for the optimizer step (16-bit training)."""
    optimizer: float
    activations: float
    activations_checkpointed: float
    buffers: float
    cpu: float
    """Host memory per rank taken by offloaded states (not in the device total)."""

    def total(self, checkpointing: bool) -> float:
        """The peak: the fp32 gradient copy of the step and the activations of forward and
        backward are never alive together (the step starts after backward has freed them)."""
        acts = self.activations_checkpointed if checkpointing else self.activations
        states = self.params + self.grads + self.optimizer
        return states + max(acts, self.step_grads) + self.buffers

    @property
    def model_states(self) -> float:
        """Parameters, gradients (both copies) and optimizer on the device."""
        return self.params + self.grads + self.step_grads + self.optimizer


def layer_activation_bytes(config: GPTConfig, tokens: int, dtype_bytes: int) -> float:
    """Bytes one block keeps for backward over `tokens` = s * b positions (see activation_bytes).

    Korthikanti et al.'s 34 s b h (16 bits, scores not kept) is attention 11 + MLP 19 + norms 4,
    each term a tensor autograd saves; here every width is the model's own (coefficients below
    per token in 16 bits). p = dtype_bytes, h = n_embd, kv = kv_heads * head_dim (the width of
    k and of v under grouped-query attention), f = ffn_size:

    - attention 7 h + 4 kv (GPT-2: 11 h; rope: 9 h + 6 kv): the norm's output feeding the qkv
      matmul (p h); q, k and v, views of that matmul's output (p (h + 2 kv)); the attention
      output feeding the projection (p h); the residual dropout mask (p/2 h: one byte in 16
      bits). With rope the rotated q and k are new tensors (p (h + kv) more), and the unrotated
      ones stay alive inside the fused output that v is a view of; the rotation itself keeps
      only the shared cos/sin tables (s x head_dim), as learned positions keep only indices.
    - MLP 3 h + 4 f (GPT-2, f = 4 h: 19 h; swiglu 3 h + 8 f): the norm's output (p h), the
      dropout mask (p/2 h), and for gelu its input and output (2 p f); for swiglu the fused
      gate|up output (2 p f), silu(gate) and silu(gate) * up (2 p f): four f-wide tensors.
    - two norms: LayerNorm keeps its input (p h each: 4 h); RMSNorm runs in fp32 and keeps its
      input in fp32 (a copy in 16-bit training) and its normalised output before the weight
      (4 h + p h each: 12 h).

    Left out, as the paper leaves them: per-token statistics (norm means, the attention's
    log-sum-exp: 4 s b heads bytes) and the rope tables, about 1% of a block at n_embd 128 and
    less when wider (tests/test_memory.py measures it). The dropout masks are counted even at
    dropout 0, where nothing keeps them (p s b h per block: a slight overestimate there).
    """
    replicated, split = _layer_terms(config, dtype_bytes)
    return tokens * (replicated + split)


def _layer_terms(config: GPTConfig, dtype_bytes: int) -> tuple[float, float]:
    """Per-token bytes of one block: (what every tensor-parallel rank keeps whole: the norms,
    their outputs feeding the column-parallel matmuls, the residual dropout masks; what is split
    over them: q, k, v, the attention output and the MLP's hidden tensors). Korthikanti et al.'s
    10 + 24 / t for GPT-2 in 16 bits."""
    p, h = dtype_bytes, config.n_embd
    kv = config.kv_heads * config.head_dim
    norm = 4 * h + p * h if config.norm == "rmsnorm" else p * h
    replicated = 2 * norm + 2 * p * h + 2 * (p / 2 * h)
    split = p * (h + 2 * kv) + p * h
    if config.positions == "rope":
        split += p * (h + kv)
    split += (4 if config.mlp == "swiglu" else 2) * p * config.ffn_size
    return replicated, split


def activation_bytes(
    config: GPTConfig,
    micro_batch: int,
    dtype_bytes: int,
    tensor: int = 1,
    sequence: int = 1,
    pipeline: int = 1,
    micro_batches: int = 1,
) -> tuple[float, float]:
    """(without checkpointing, with full checkpointing) activation bytes for one micro-batch.

    Every block keeps layer_activation_bytes (34 s b h in 16 bits for GPT-2's shape, 68 in
    fp32); with full checkpointing only each block's input (p s b h) stays, plus one block
    being recomputed. The loss adds fp32 logits and their log-softmax (8 s b vocab), tied or
    untied head alike; position embeddings are parameters, not activations. With `tensor`
    ranks per layer, each keeps the replicated terms whole and 1/tensor of the rest; with
    `sequence` ranks per sequence, each keeps its slice's (Ulysses' all-to-all buffers, the size
    of q, k, v and the output for one layer, are left out). Over `pipeline` stages, the first
    keeps the activations of its share of the blocks for as many micro-batches as 1F1B has in
    flight there (min(stages, micro-batches)); the logits are the last stage's, one at a time.
    """
    tokens = config.block_size * micro_batch // sequence
    layers = -(-config.n_layer // pipeline) * min(pipeline, micro_batches)
    replicated, split = _layer_terms(config, dtype_bytes)
    per_layer = tokens * (replicated + split / tensor)
    # fp32 logits and their softmax for the loss: each tensor-parallel rank its vocabulary slice
    logits = tokens * config.vocab_size * 4 * 2 / tensor
    full = layers * per_layer + logits
    checkpointed = layers * tokens * config.n_embd * dtype_bytes + per_layer + logits
    return full, checkpointed


def stage_params(config: GPTConfig, tensor: int, pipeline: int) -> float:
    """Parameters one rank holds: its tensor-parallel share of its pipeline stage's layers (the
    busiest stage: the most blocks, and the first stage's token and position embeddings or the
    last stage's final norm and head, whichever is larger; a tied head is a copy of the
    embedding there)."""
    whole = tensor_parallel_params(config, tensor)
    if pipeline == 1:
        return whole
    ends = tensor_parallel_params(replace(config, n_layer=0), tensor)
    block = (whole - ends) / config.n_layer
    vocab = config.vocab_size * config.n_embd / tensor
    first = vocab + (config.block_size * config.n_embd if config.positions == "learned" else 0)
    last = ends - first + (vocab if config.tie_embeddings else 0)
    return -(-config.n_layer // pipeline) * block + max(first, last)


def tensor_parallel_params(config: GPTConfig, tensor: int) -> float:
    """Parameters one tensor-parallel rank holds: 1/tensor of the split matrices (embedding,
    head, every block's matmuls and the column-parallel biases), all of the replicated ones
    (norms, position table, the row-parallel output biases)."""
    total = count_params(config)
    if tensor == 1:
        return float(total)
    h, norm_params = config.n_embd, config.n_embd * (2 if config.norm == "layernorm" else 1)
    replicated = (2 * config.n_layer + 1) * norm_params
    if config.positions == "learned":
        replicated += config.block_size * h
    if config.bias:
        replicated += 2 * config.n_layer * h  # attn.c_proj and mlp.c_proj biases
    return replicated + (total - replicated) / tensor


def estimate(
    config: GPTConfig,
    engine: EngineSettings,
    tensor: int = 1,
    sequence: int = 1,
    pipeline: int = 1,
) -> Estimate:
    """Per-device memory for this model under the engine's ZeRO stage, precision, offload and
    data-parallel size (`engine.at_stage(s)` for another stage), each layer split over `tensor`
    ranks (ZeRO then shards each rank's share over the data-parallel ranks) and each sequence
    over `sequence` ranks (ZeRO shards over the sequence x data ranks: they hold the same
    weights), and the layers over `pipeline` stages (the busiest stage's figures)."""
    stage, w = engine.zero_stage, engine.dp_size * sequence  # ZeRO shards over both
    p = stage_params(config, tensor, pipeline)
    width = 2 if engine.half else 4
    params = p * width / (w if stage >= 3 else 1)
    grads = p * width / (w if stage >= 2 else 1)
    optimizer_bytes = 12 if (engine.half or stage >= 1) else 8
    optimizer = p * optimizer_bytes / (w if stage >= 1 else 1)
    step_grads = 0.0
    if engine.half and stage >= 1:
        partition = p / w if stage < 3 else min(p / w, engine.sub_group_size)
        step_grads = 4 * partition
    cpu = 0.0
    if engine.offload_optimizer != "none" and stage >= 1:  # nvme: off the device, not in RAM
        # The optimizer and its fp32 gradients move; from stage 2 so do the gradient partitions.
        moved = optimizer + step_grads + (grads if stage >= 2 else 0.0)
        cpu += moved if engine.offload_optimizer == "cpu" else 0.0
        optimizer = step_grads = 0.0
        grads = grads if stage < 2 else 0.0
    if engine.offload_param != "none" and stage >= 3:
        cpu += params if engine.offload_param == "cpu" else 0.0
        params = 0.0
    acts, acts_ckpt = activation_bytes(
        config, engine.micro_batch_size, width, tensor, sequence, pipeline, engine.grad_accum_steps
    )
    buffers = 0.0
    if stage >= 1:
        buffers += 4 * float(engine.reduce_bucket_size)
    if stage >= 3:
        buffers += width * float(engine.prefetch_bucket_size)
    return Estimate(params, grads, step_grads, optimizer, acts, acts_ckpt, buffers, cpu)


def deepspeed_estimate(
    config: GPTConfig, engine: EngineSettings, gpus_per_node: int
) -> tuple[str, float, float] | None:
    """DeepSpeed's own model-states estimate for the configured stage, as a cross-check:
    (function name, device bytes, host bytes per node); None below stage 2 (DeepSpeed has none).
    DeepSpeed's formulas assume 16-bit training and a ZeRO-3 model built under zero.Init."""
    stage, world = engine.zero_stage, engine.dp_size
    if stage < 2:
        return None
    nodes = -(-world // gpus_per_node)
    p = count_params(config)
    if stage < 3:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        host, device = estimate_zero2_model_states_mem_needs(
            p, gpus_per_node, nodes, cpu_offload=engine.offload_optimizer == "cpu"
        )
        return "estimate_zero2_model_states_mem_needs", float(device), float(host)
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    host, device, _ = estimate_zero3_model_states_mem_needs(
        p,
        largest_layer_params(config),
        gpus_per_node,
        nodes,
        cpu_offload=engine.offload_optimizer == "cpu",
        cpu_offload_params=engine.offload_param == "cpu",
    )
    return "estimate_zero3_model_states_mem_needs", float(device), float(host)


def startup_host_bytes(config: GPTConfig, local_ranks: int, whole_weights: bool) -> float:
    """Host memory a node needs while its ranks build the model (training/build.py), beyond what
    they train with: each rank makes its own parameters one at a time on its device, so at most
    one whole module in fp32 each (on a CPU device that is the training memory itself; init
    weights from a ZeRO checkpoint or Hugging Face safetensors are read a tensor at a time), or,
    with whole_weights (checkpoint.init_from of a tensor- or pipeline-parallel tag, put together
    before each rank cuts its part), the whole fp32 state each."""
    per_rank = count_params(config) if whole_weights else largest_layer_params(config)
    return local_ranks * 4.0 * per_rank


def startup_memory_warning(
    need: float, available: float, local_ranks: int, whole_weights: bool
) -> str | None:
    """A warning when the node's available memory cannot hold what its ranks build at start."""
    if need <= available:
        return None
    each = (
        "each putting the init weights' tensor- or pipeline-parallel tag together whole in "
        "fp32 before it cuts its part"
        if whole_weights
        else "each making its parameters one whole module at a time"
    )
    return (
        f"starting takes up to {need / GIB:,.0f} GiB of host memory on this node ({local_ranks} "
        f"rank(s), {each}) but {available / GIB:,.0f} GiB is available: the out-of-memory "
        "killer may stop the ranks before training starts. Start fewer ranks per node or use "
        "nodes with more memory"
    )


def largest_layer_params(config: GPTConfig) -> int:
    """Parameters of the largest single module (ZeRO-3 gathers one at a time), on meta."""
    from model.gpt import GPT

    with torch.device("meta"):
        model = GPT(config)
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


@dataclass
class ModelBuild:
    """How building this rank's model went (training/build.py), for memory.json."""

    seconds: float
    held_bytes: int
    """Bytes of the parameters this rank holds once built (its partitions under ZeRO-3)."""
    host_peak_growth_bytes: int | None
    """The process's peak resident memory during the build above its resident memory at the
    start of it (Linux: /proc/self/status's VmHWM, restarted through clear_refs); None
    elsewhere."""


def describe_build(build: ModelBuild, config: GPTConfig) -> str:
    """The launch's line on rank 0's model: time, what it holds, its host memory peak."""
    whole = 4 * count_params(config)
    peak = ""
    if build.host_peak_growth_bytes is not None:
        peak = f"; host memory peak +{build.host_peak_growth_bytes / MIB:,.1f} MiB"
    return (
        f"model built in {build.seconds:.1f} s: rank 0 holds {build.held_bytes / MIB:,.1f} MiB "
        f"of parameters (the whole model: {whole / MIB:,.1f} MiB in fp32){peak}"
    )


def reset_host_peak() -> int | None:
    """Restart this process's peak resident memory (VmHWM) from now and return its resident
    bytes now; None where the kernel does not allow that (not Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_bytes("VmRSS")


def host_peak() -> int | None:
    """This process's peak resident bytes since the last reset_host_peak (Linux)."""
    return _status_bytes("VmHWM")


def _status_bytes(field: str) -> int | None:
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith(field)), None)


def held_parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters `module` holds on this rank (a ZeRO-3 parameter: its partition)."""
    held = (getattr(p, "ds_tensor", p) for p in module.parameters())
    return sum(t.numel() * t.element_size() for t in held)


def engine_state_bytes(engine: Any) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state this rank's engine holds, read from
    its own (partitioned) tensors."""
    stage = engine.zero_optimization_stage()
    module_params = list(engine.module.parameters())
    params = held_parameter_bytes(engine.module)
    optimizer = engine.optimizer
    base = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the torch optimizer
    moments = sum(
        t.numel() * t.element_size()
        for state in base.state.values()
        for t in state.values()
        if torch.is_tensor(t) and t.dim() > 0
    )
    master = _master_partitions(optimizer, stage)
    master_bytes = sum(t.numel() * t.element_size() for t in master)
    if stage >= 2:  # gradients live in fp32 partitions shaped like the master copy
        grads = sum(t.numel() for t in master) * 4
    else:
        grads = sum(p.numel() for p in module_params) * module_params[0].element_size()
    return {"params": params, "grads": grads, "optimizer": moments + master_bytes}


def _master_partitions(optimizer: Any, stage: int) -> list[torch.Tensor]:
    if stage >= 3:
        return list(optimizer.fp32_partitioned_groups_flat)
    if stage >= 1:
        return list(optimizer.single_partition_of_fp32_groups)
    return []
