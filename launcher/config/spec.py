"""The run spec: one dataclass per section, each field with a one-line docstring.

The root `RunSpec` only composes the sections; `launcher.config.load` reads one from YAML and
`--set` overrides, checking every key and value. Runtime values (ranks, devices, the engine)
never live here: builders receive them as arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from model.gpt import GPTConfig


@dataclass
class ModelSpec(GPTConfig):
    """The model's shape (every GPTConfig field), and where its first weights come from."""

    init_from: str | None = None
    """A Hugging Face model directory (GPT2LMHeadModel or LlamaForCausalLM) a fresh run starts
    from; its config.json gives every shape field the spec leaves out, and those set must agree."""


@dataclass
class DataSource:
    """One indexed dataset (PREFIX.bin/.idx/.json) and its share of a blend."""

    path: str = "data/shakespeare_char"
    """Prefix written by `python -m data_pipeline.prepare --out PREFIX`."""
    weight: float = 1.0
    """Relative share of samples when several sources are blended."""


@dataclass
class DataConfig:
    """Training and validation data: indexed datasets, blended by weight."""

    train: list[DataSource] = field(default_factory=lambda: [DataSource()])
    """Training sources: a prefix, a list of prefixes, or a list of {path, weight}."""
    val: list[DataSource] | None = None
    """Validation sources (same forms); null = carve val_fraction of each train source."""
    val_fraction: float | None = None
    """Fraction of documents (the last ones) carved off for val; null = what prepare recorded."""
    index_cache: str | None = None
    """Directory for the cached sample index; null = PREFIX.cache beside each dataset."""
    tokenizer: str | None = None
    """What datasets without PREFIX.json were tokenized with (tiktoken:NAME, ...); null = none."""


@dataclass
class ProfileConfig:
    """A torch profiler trace of `steps` optimizer steps from step `start`, every rank writing
    out_dir/profile/rank<N>.pt.trace.json (TensorBoard or https://ui.perfetto.dev)."""

    steps: int = 0
    """Steps recorded; 0 = no profile."""
    start: int = 10
    """The first step recorded (counted from 1, like the logged steps); steps before it warm up
    the kernels and allocator so the trace shows the steady state."""


@dataclass
class TrainConfig:
    """Optimisation: batch sizes, AdamW, the LR schedule, logging cadence."""

    max_steps: int = 1000
    """Optimizer steps to train for (the run ends at this step, resumed or not)."""
    micro_batch_size: int = 8
    """Sequences per rank per forward/backward."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 1e-4
    """Floor of the cosine decay."""
    warmup_steps: int = 100
    """Linear warmup from 0 to lr over this many steps."""
    lr_decay_steps: int | None = None
    """Step at which cosine decay reaches min_lr; null = max_steps."""
    weight_decay: float = 0.1
    """AdamW weight decay for matrices (never biases, norms or embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables it."""
    seed: int = 1337
    """Seed for initialisation, data order and sampling."""
    log_interval: int = 10
    """Steps between log lines (and metrics.jsonl records)."""
    time_limit: int | str | None = None
    """Wall-time budget of one process: seconds, or Slurm's [D-]HH:MM:SS; the run saves and
    exits (code 75) before it runs out. Under Slurm the job's own limit applies too."""
    compile: bool = False
    """torch.compile the model inside the DeepSpeed engine (engine.compile()): fused kernels
    after a compilation of some seconds to minutes in the first steps."""
    profile: ProfileConfig = field(default_factory=lambda: ProfileConfig())
    """A torch profiler trace of a few steps, written to out_dir/profile."""

    @property
    def time_limit_s(self) -> float | None:
        return parse_duration(self.time_limit) if self.time_limit is not None else None


@dataclass
class EvalConfig:
    """Validation loss (one or several named sets) and downstream tasks during training."""

    interval: int = 100
    """Steps between evaluations (and after the last step); 0 disables evaluation."""
    batches: int = 20
    """Micro-batches per rank in each evaluation."""
    patience: int = 3
    """Overfitting: evaluations in a row with val above its best by more than min_delta."""
    min_delta: float = 0.0
    """Overfitting: how far above its best val must be for an evaluation to count as a rise."""
    early_stop: bool = False
    """On overfitting, save a final checkpoint and stop cleanly."""
    sets: dict[str, str] = field(default_factory=dict)
    """Named val sets {name: PREFIX}, each logged as Loss/val/<name> (the monitored one also as
    Loss/val); the value `data.val` is the run's own val split (data.val, or val_fraction of the
    train sources). Empty = that split alone, logged as Loss/val."""
    monitor: str | None = None
    """The set (a name in eval.sets) the overfitting detector and the `best` checkpoint follow;
    null = the first."""
    tasks: dict[str, str] = field(default_factory=dict)
    """Downstream tasks {name: FILE.jsonl}: multiple choice ({context, endings, label}) or last
    word ({text}), scored as lm-evaluation-harness does and logged as Eval/<name>/acc, ..."""
    tasks_interval: int | None = None
    """Steps between downstream-task evaluations (and after the last step); null = eval.interval,
    0 = only after the last step."""
    tasks_limit: int | None = None
    """Examples scored per task (the first ones); null = all."""


@dataclass
class CheckpointConfig:
    """Sharded DeepSpeed checkpoints under out_dir/checkpoints."""

    interval: int = 500
    """Steps between checkpoints; one is always written at the end; 0 = only at the end."""
    keep_last: int = 3
    """Checkpoints kept; older ones are deleted after a newer one is saved; 0 keeps all."""
    resume: str = "auto"
    """'auto' = newest checkpoint in out_dir/checkpoints if any, 'none', or a checkpoint path."""
    async_save: bool = False
    """Write checkpoints in a background thread: training waits only for a copy to host memory;
    the tag completes (marker, `latest`, `best`) once every rank's files are on disk."""
    init_from: str | None = None
    """A new run starting from this tag's weights (step 0, a fresh optimizer, its own run id),
    with any tokenizer; used only while out_dir has no checkpoint of its own."""


@dataclass
class SampleConfig:
    """Text generated at the end of training."""

    prompt: str = "What is an LLM?"
    """Text the sample continues."""
    max_new_tokens: int = 200
    """Tokens generated; 0 skips the sample."""
    temperature: float = 0.8
    """Softmax temperature; 0 = greedy."""
    top_k: int | None = 200
    """Sample only among the k most likely tokens; null = all."""


@dataclass
class WandbConfig:
    """Weights & Biases: rank 0 logs every metric; a failure warns once and training goes on.
    A DeepSpeed JSON's `wandb` section fills in project, group and entity (its `team`) where
    these are left at their defaults (monitoring/sinks.py: wandb_settings)."""

    enabled: bool = True
    """Log to wandb at all (metrics.jsonl is always written)."""
    project: str = "zerolaunch"
    """wandb project."""
    entity: str | None = None
    """wandb entity (user or team); null = your default."""
    name: str | None = None
    """Display name; null = the run spec's name."""
    group: str | None = None
    """wandb group, e.g. to gather the runs of a sweep."""
    tags: list[str] = field(default_factory=list)
    """wandb tags."""
    mode: str | None = None
    """online, offline or disabled; null = online with an API key configured, else offline."""


@dataclass
class MonitorConfig:
    """Metrics: where they go and how throughput is measured."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    peak_flops: float | None = None
    """Peak FLOP/s of one device for MFU; null = the device table (GPUs) or a measured matmul
    peak (CPUs)."""
    detailed_timing: bool = True
    """Time forward and backward separately (CUDA events on GPUs, no extra synchronisation)."""
    tensorboard: bool = False
    """Every metric to TensorBoard event files in out_dir/tensorboard (also on when the DeepSpeed
    JSON's `tensorboard` section is enabled: then in its output_path/job_name)."""
    csv: bool = False
    """Every metric to CSV files in out_dir/csv (also on when the DeepSpeed JSON's `csv_monitor`
    section is enabled: then in its output_path/job_name)."""


@dataclass
class ParallelConfig:
    """How one model replica is split over ranks (Megatron's layout). The data-parallel size is
    what remains: world size / (tensor x pipeline x sequence); ZeRO shards over it."""

    tensor: int = 1
    """Tensor-parallel ranks: each layer's matrices split Megatron's way (column-parallel QKV and
    MLP-in, row-parallel outputs, vocabulary-parallel embedding and loss); keep it within a node."""
    pipeline: int = 1
    """Pipeline stages (DeepSpeed's pipeline engine); 1 = none."""
    sequence: int = 1
    """Sequence-parallel ranks (DeepSpeed-Ulysses) for long contexts; 1 = none."""


@dataclass
class RunSpec:
    """The whole run: it only composes the sections."""

    name: str = "run"
    """Run name; also the default output directory runs/<name>."""
    out_dir: str | None = None
    """Where checkpoints, metrics and the resolved spec go; null = runs/<name>."""
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir if self.out_dir is not None else Path("runs") / self.name)


def parse_duration(value: int | str) -> float:
    """Seconds from an int, '90s', '45m', '2h', or Slurm's 'MM:SS', 'HH:MM:SS', 'D-HH:MM:SS'."""
    if isinstance(value, int):
        return float(value)
    text = value.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1:] in units:
            return float(text[:-1]) * units[text[-1]]
        days, _, clock = text.rpartition("-")
        parts = [float(p) for p in clock.split(":")]
        if not 1 <= len(parts) <= 3 or (days and len(parts) == 1):
            raise ValueError(text)
        seconds = sum(v * 60**i for i, v in enumerate(reversed(parts)))
        return seconds + (float(days) * 86400 if days else 0.0)
    except ValueError:
        raise ValueError(
            f"{value!r} is not a duration: give seconds, '45m', '2h' or [D-]HH:MM:SS"
        ) from None
