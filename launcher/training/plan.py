"""Everything checked before a run starts: spec, DeepSpeed config, dataset, checkpoint.

`prepare_run` starts no process group and writes no file of the run (only the token scan of a
dataset made elsewhere is cached beside it), so a mistake costs nothing and an existing run's
checkpoints are never touched by a run that was going to fail; `write_run_files` writes the
run's first files once the plan is known to be good.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from data_pipeline.foreign import declared_tokenizer, describe_spec, has_text
from data_pipeline.gpt_dataset import BlendedSamples, DocumentRange
from data_pipeline.loader import (
    DataError,
    Source,
    build_samples,
    check_foreign_ids,
    open_source,
    run_tokenizer,
    split_ranges,
)
from data_pipeline.tokenizers import (
    Tokenizer,
    TokenizerError,
    describe_identity,
    identity,
    load_tokenizer,
    same_identity,
)
from launcher.checkpoints import hf, store
from launcher.checkpoints.contract import CheckpointMeta
from launcher.checkpoints.universal import needs_universal
from launcher.config.ds_config import EngineSettings, load_ds_config, resolve_engine
from launcher.config.load import load_spec
from launcher.config.paths import DEFAULT_SPEC, display_path
from launcher.config.spec import RunSpec
from launcher.errors import UserError, combined
from launcher.evaluation.tasks import Task, load_tasks
from launcher.runtime.distributed import DistEnv, bf16_supported, detect_env, device_type
from launcher.runtime.topology import Layout, layout_problems
from launcher.training.memory import (
    GIB,
    Estimate,
    estimate,
    startup_host_bytes,
    startup_memory_warning,
)

VOCAB_MULTIPLE = 64


def padded_vocab(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Round a tokenizer's vocabulary up so embedding matmuls hit efficient shapes."""
    return -(-vocab_size // multiple) * multiple


@dataclass
class DataPlan:
    """The run's opened datasets: samples are indexed lazily, when training starts."""

    sources: list[Source]
    tokenizer: Tokenizer
    train: BlendedSamples
    val_sets: dict[str, BlendedSamples] = field(default_factory=dict)
    """The named val sets, in the spec's order (one named `val` without eval.sets); empty when
    evaluation is off."""
    monitor: str | None = None
    """The val set logged as Loss/val: the overfitting detector and `best` follow it."""
    tokenizer_identity: dict = field(default_factory=dict)
    """What every checkpoint of the run records of its tokenizer (tokenizers.identity)."""
    tasks: list[Task] = field(default_factory=list)
    """Downstream tasks (eval.tasks), read and tokenized in pre-flight."""

    @property
    def val(self) -> BlendedSamples | None:
        """The monitored val set."""
        return self.val_sets.get(self.monitor) if self.monitor else None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def describe(self) -> str:
        train = ", ".join(
            f"{s.name} x{s.weight:g}{' (made elsewhere)' if s.foreign else ''}"
            for s in self.sources
        )
        if any(s.foreign for s in self.sources):
            declared = describe_spec(self.tokenizer)
            line = f"data: {train}; tokenizer {declared} (data.tokenizer; token ids checked)"
        else:
            line = f"data: {train}; tokenizer {self.sources[0].meta['tokenizer']['type']}"
        return line + self._evaluation()

    def _evaluation(self) -> str:
        """The named val sets and the tasks, where there are more than the one val split."""
        parts = []
        if len(self.val_sets) > 1 or (self.val_sets and self.monitor != "val"):
            parts.append(f"val sets {', '.join(self.val_sets)} (Loss/val: {self.monitor})")
        if self.tasks:
            parts.append("tasks " + ", ".join(f"{t.name} ({t.size})" for t in self.tasks))
        return "".join(f"\n{p}" for p in parts)


@dataclass
class Resume:
    """The checkpoint a run continues from."""

    tag_dir: Path
    meta: CheckpointMeta
    universal: bool
    """Written by another world size or ZeRO stage: loaded through DeepSpeed's universal format."""


@dataclass
class RunPlan:
    """A validated run, ready to start."""

    spec: RunSpec
    engine: EngineSettings
    env: DistEnv
    data: DataPlan
    resume: Resume | None
    warnings: list[str]
    run_id: str
    """Stable across resumes (stored in every checkpoint): the monitor's run id."""
    memory: Estimate
    """Per-device memory estimate at the configured stage."""
    device: str = "cpu"
    """cuda or cpu: what the run trains on."""
    init_from: Path | None = None
    """A tag whose weights a fresh run starts from (checkpoint.init_from)."""
    init_hf: Path | None = None
    """A Hugging Face model directory a fresh run starts from (model.init_from)."""
    layout: Layout = field(default_factory=Layout)
    """Where the ranks sit: tensor x pipeline x sequence x data parallel."""

    @property
    def coords(self) -> dict[str, int]:
        """This rank's place on every axis of the layout."""
        return self.layout.coords(self.env.rank)

    @property
    def reads_init_weights(self) -> bool:
        """Whether every rank reads starting weights (either init_from) in a new run."""
        return self.resume is None and (self.init_from is not None or self.init_hf is not None)

    @cached_property
    def reads_whole_init_weights(self) -> bool:
        """Whether each rank puts the init weights together whole before it cuts its part: a
        tensor- or pipeline-parallel tag (a ZeRO checkpoint and Hugging Face safetensors are
        read a tensor at a time)."""
        if not self.reads_init_weights or self.init_from is None:
            return False
        meta = store.read_meta(self.init_from)
        return meta.tensor_parallel > 1 or meta.pipeline_parallel > 1

    @cached_property
    def startup_host_memory(self) -> float:
        """Host memory this node's ranks take while they build the model (memory.py)."""
        n = self.env.local_world_size
        return startup_host_bytes(self.spec.model, n, self.reads_whole_init_weights)

    def summary(self) -> str:
        m, e = self.spec.model, self.engine
        lines = [
            f"run {self.spec.name} -> {self.spec.run_dir}",
            f"model: {m.n_layer} layers, {m.n_head} heads{self._family()}, {m.n_embd} wide, "
            f"block {m.block_size}, vocab {m.vocab_size} (tokenizer {self.data.vocab_size})",
            self.data.describe(),
            f"engine: ZeRO stage {e.zero_stage}, {self.env.world_size} rank(s) on "
            f"{self.device} ({self._ranks_line()}){self._layout_line()}, {e.precision}, "
            f"batch {e.train_batch_size} sequences = "
            f"{e.train_batch_size * m.block_size:,} tokens/step",
            self._memory_line(),
            f"resume: {self._resume_line()}",
        ]
        return "\n".join(lines)

    def _family(self) -> str:
        """The block's choices where they are not GPT-2's."""
        m = self.spec.model
        parts = [f"{m.kv_heads} kv"] if m.kv_heads != m.n_head else []
        parts += [v for v, gpt2 in ((m.positions, "learned"), (m.norm, "layernorm"),
                                    (m.mlp, "gelu")) if v != gpt2]  # fmt: skip
        parts += [] if m.tie_embeddings else ["untied"]
        return f" ({', '.join(parts)})" if parts else ""

    def _layout_line(self) -> str:
        return f", {self.layout.describe()}" if self.layout.model_parallel > 1 else ""

    def _ranks_line(self) -> str:
        env = self.env
        nodes = -(-env.world_size // env.local_world_size)
        return f"{env.local_world_size} per node, {nodes} node(s), started by {env.launcher}"

    def _memory_line(self) -> str:
        est = self.memory
        total = est.total(self.spec.model.activation_checkpointing != "none")
        host = f", host {est.cpu / GIB:.2f}" if est.cpu else ""
        step = f" + {est.step_grads / GIB:.2f} fp32 at the step" if est.step_grads else ""
        return (
            f"memory estimate per device: {total / GIB:.2f} GiB (params {est.params / GIB:.2f}, "
            f"grads {est.grads / GIB:.2f}{step}, optimizer {est.optimizer / GIB:.2f}{host}; "
            "zerolaunch check for every stage)"
        )

    def _resume_line(self) -> str:
        if self.resume is None and self.init_from is not None:
            return f"fresh start from the weights of {self.init_from} (checkpoint.init_from)"
        if self.resume is None and self.init_hf is not None:
            return f"fresh start from the Hugging Face model {self.init_hf} (model.init_from)"
        if self.resume is None:
            return "fresh start"
        if not self.resume.universal:
            return str(self.resume.tag_dir)
        m = self.resume.meta
        split = "".join(
            f", {size} {axis} parallel"
            for axis, size in (("tensor", m.tensor_parallel), ("pipeline", m.pipeline_parallel))
            if size > 1
        )
        return (
            f"{self.resume.tag_dir} (written by {m.world_size} rank(s) at ZeRO stage "
            f"{m.zero_stage}{split}: loading it in DeepSpeed's universal format)"
        )


def _resolve_model(spec: RunSpec, data: DataPlan) -> RunSpec:
    vocab = spec.model.vocab_size
    if vocab is None:  # each tensor-parallel rank's slice of the vocabulary a multiple of 64 too
        vocab = padded_vocab(data.vocab_size, VOCAB_MULTIPLE * spec.parallel.tensor)
    elif vocab < data.vocab_size and spec.model.init_from:
        raise UserError(
            f"model.init_from={spec.model.init_from} has {vocab} embedding rows, but the "
            f"tokenizer of {data.sources[0].prefix} has {data.vocab_size} ids: prepare the data "
            f"with the checkpoint's tokenizer (prepare --tokenizer hf:{spec.model.init_from})"
        )
    elif vocab < data.vocab_size:
        raise UserError(
            f"model.vocab_size={vocab} is smaller than the tokenizer's vocabulary "
            f"({data.vocab_size} ids in {data.sources[0].prefix}); set model.vocab_size to at "
            f"least {data.vocab_size}, or null to take it from the dataset"
        )
    return replace(spec, model=replace(spec.model, vocab_size=vocab))


def _check_prompt(spec: RunSpec, tokenizer: Tokenizer, warnings: list[str]) -> RunSpec:
    """Fail now, not after hours of training, if the end-of-run sample cannot be encoded; a
    tokenizer without text (vocab:SIZE:eod=ID) turns the sample off, with a warning."""
    if spec.sample.max_new_tokens == 0:
        return spec
    if not has_text(tokenizer):
        warnings.append(
            f"sampling is off (sample.max_new_tokens=0): data.tokenizer={spec.data.tokenizer} "
            "gives only a vocabulary size, no text; set it to the tokenizer the data was made "
            "with (tiktoken:NAME, sentencepiece:MODEL_FILE or hf:PATH) to sample"
        )
        return replace(spec, sample=replace(spec.sample, max_new_tokens=0))
    try:
        ids = tokenizer.encode(spec.sample.prompt)
    except ValueError as e:
        raise UserError(f"sample.prompt={spec.sample.prompt!r}: {e}") from e
    if not ids:
        raise UserError("sample.prompt is empty; give text to continue or sample.max_new_tokens=0")
    return spec


OWN_SPLIT = "data.val"
"""The value of an eval.sets entry that names the run's own val split."""


def open_data(spec: RunSpec, is_builder: bool = True) -> DataPlan:
    """Open every source, check they share a tokenizer and can fill samples of block_size.
    Datasets made elsewhere have their token ids scanned once (cached beside the sample index:
    the builder, local rank 0, scans while the others wait)."""
    d, seq, seed = spec.data, spec.model.block_size, spec.train.seed
    try:
        declared = declared_tokenizer(d.tokenizer) if d.tokenizer else None
    except TokenizerError as e:
        message = str(e).removeprefix(f"--tokenizer {d.tokenizer}: ")  # prepare's flag
        raise UserError(f"data.tokenizer={d.tokenizer}: {message}") from e
    need_val = spec.eval.interval > 0
    sets = spec.eval.sets or {"val": OWN_SPLIT}
    own_split = need_val and OWN_SPLIT in sets.values()
    try:
        train = [open_source(s.path, s.weight, declared) for s in d.train]
        val = None
        if d.val is not None:
            val = [open_source(s.path, s.weight, declared) for s in d.val]
        tokenizer = run_tokenizer(train + (val or []))
        check_foreign_ids(train + (val or []), tokenizer, d.index_cache, is_builder)
        train_ranges, val_ranges = split_ranges(train, val, d.val_fraction, own_split)
        train_samples = build_samples(train_ranges, train, seq, seed, d.index_cache)
        own = None
        if val_ranges is not None:
            own = build_samples(val_ranges, val or train, seq, seed, d.index_cache)
        val_sets = {}
        if need_val:
            named = {name: p for name, p in sets.items() if p != OWN_SPLIT}
            opened = _open_val_sets(named, train[0], tokenizer, declared, spec, is_builder)
            val_sets = {n: own if p == OWN_SPLIT else opened[n] for n, p in sets.items()}
    except DataError as e:
        raise UserError(f"data: {e}") from e
    monitor = (spec.eval.monitor or next(iter(sets))) if val_sets else None
    plan = DataPlan(train, tokenizer, train_samples, val_sets, monitor, identity(tokenizer))
    plan.tasks = _load_tasks(spec, tokenizer)
    return plan


def _open_val_sets(
    sets: dict[str, str],
    first: Source,
    tokenizer: Tokenizer,
    declared: Tokenizer | None,
    spec: RunSpec,
    is_builder: bool,
) -> dict[str, BlendedSamples]:
    """eval.sets' datasets, each read whole, each tokenized as the training data is."""
    problems, opened = [], {}
    whose = f"the training data ({first.prefix})"
    shape = (spec.model.block_size, spec.train.seed, spec.data.index_cache, is_builder)
    for name, prefix in sets.items():
        try:
            opened[name] = open_whole(prefix, tokenizer, declared, whose, *shape)
        except DataError as e:
            problems.append(f"eval.sets.{name}: {e}")
    if problems:
        raise UserError("\n".join(problems), problems)
    return opened


def open_whole(
    prefix: str,
    tokenizer: Tokenizer,
    declared: Tokenizer | None,
    whose: str,
    seq_len: int,
    seed: int,
    index_cache: str | None,
    is_builder: bool,
) -> BlendedSamples:
    """A dataset read whole, for evaluation: refused (DataError) unless it was tokenized with
    `tokenizer`, `whose` tokenizer it is (for the message)."""
    source = open_source(prefix, 1.0, declared)
    theirs, mine = identity(run_tokenizer([source])), identity(tokenizer)
    if not same_identity(theirs, mine):
        raise DataError(
            f"{source.prefix} was tokenized with {describe_identity(theirs)}, but {whose} with "
            f"{describe_identity(mine)}: its loss would read token ids as other text. Prepare "
            f"it with the tokenizer of {whose}"
        )
    check_foreign_ids([source], tokenizer, index_cache, is_builder)
    whole = [DocumentRange(source.dataset, 0, source.dataset.num_documents)]
    return build_samples(whole, [source], seq_len, seed, index_cache)


def _load_tasks(spec: RunSpec, tokenizer: Tokenizer) -> list[Task]:
    """eval.tasks read, checked and tokenized now: a bad line stops the run before it starts."""
    e = spec.eval
    if not e.tasks:
        return []
    if not has_text(tokenizer):
        raise UserError(
            f"eval.tasks: data.tokenizer={spec.data.tokenizer} gives only a vocabulary size, no "
            "text to encode a task's examples with; set it to the tokenizer the data was made "
            "with (tiktoken:NAME, sentencepiece:MODEL_FILE or hf:PATH), or remove eval.tasks"
        )
    return load_tasks(e.tasks, tokenizer, spec.model.block_size, e.tasks_limit)


def _attempt(problems: list[str], check):
    """Run one independent check; a UserError adds its problems to the list."""
    try:
        return check()
    except UserError as e:
        problems.extend(e.problems)
        return None


def engine_settings(
    spec: RunSpec,
    spec_path: Path | None,
    ds_path: Path,
    world_size: int,
    device: str,
    overrides: tuple[str, ...] = (),
) -> tuple[EngineSettings, list[str]]:
    """The DeepSpeed JSON at ds_path, checked against the spec (and the --set `overrides` it
    was loaded with) and resolved for this job; and warnings about it."""
    return resolve_engine(
        load_ds_config(ds_path),
        spec.train,
        world_size,
        paths=(display_path(spec_path or DEFAULT_SPEC), display_path(ds_path)),
        device_type=device,
        bf16_supported=bf16_supported(device),
        overridden=frozenset(item.partition("=")[0].strip() for item in overrides),
    )


def prepare_run(
    spec_path: Path | None,
    ds_path: Path,
    overrides: list[str],
    env: DistEnv | None = None,
    device: str | None = None,
    damaged: dict[Path, str] | None = None,
) -> RunPlan:
    """Load and cross-check every input; raises one UserError listing every problem found.
    `damaged`: tags a content check found damaged (skipped by resume: auto)."""
    spec = load_spec(spec_path, overrides)  # everything else reads the spec
    env = env or detect_env()
    device = device or device_type()
    problems = layout_problems(spec.parallel, env.world_size, spec.model)
    layout = Layout.of(spec.parallel, env.world_size)
    engine, warnings = _attempt(
        problems,
        lambda: engine_settings(spec, spec_path, ds_path, layout.data, device, overrides),
    ) or (None, [])
    if engine is not None:
        problems += _zero_problems(layout, engine)
        if layout.pipeline > 1 and engine.grad_accum_steps < 4 * layout.pipeline:
            warnings.append(pipeline_bubble_warning(layout.pipeline, engine.grad_accum_steps))
    if layout.tensor > 1 and env.local_world_size % layout.tensor:
        warnings.append(
            f"parallel.tensor={layout.tensor} does not divide the {env.local_world_size} rank(s) "
            "per node: some tensor-parallel groups span nodes, and every layer all-reduces over "
            "the network. Launch a multiple of parallel.tensor ranks per node"
        )
    data = _attempt(problems, lambda: open_data(spec, is_builder=env.local_rank == 0))
    if data is not None:
        spec = _attempt(problems, lambda: _resolve_model(spec, data)) or spec
        spec = _attempt(problems, lambda: _check_prompt(spec, data.tokenizer, warnings)) or spec
    resume, init, init_hf = None, None, None
    if engine is not None and spec.model.vocab_size is not None:
        found = _attempt(problems, lambda: _resume(spec, env, engine, damaged or {}, layout))
        if found is not None:
            resume, skipped = found
            warnings += skipped
    if data is not None and not problems:
        _attempt(problems, lambda: _check_tokenizer(spec, resume, data))
        if resume is None and spec.checkpoint.init_from:
            init = _attempt(problems, lambda: _init_from(spec, data, warnings))
        if resume is None and spec.model.init_from:
            init_hf = _attempt(problems, lambda: _init_hf(spec, data, warnings))
    if problems:
        raise combined(problems)
    if resume is not None and resume.universal:
        engine = engine.loading_universal()
    run_id = resume.meta.run_id if resume else secrets.token_hex(6)
    memory = estimate(spec.model, engine, layout.tensor, layout.sequence, layout.pipeline)
    plan = RunPlan(
        spec, engine, env, data, resume, warnings, run_id, memory, device, init, init_hf, layout
    )
    warnings += _startup_warning(plan)
    return plan


def _startup_warning(plan: RunPlan) -> list[str]:
    """Whether this node's memory holds what its ranks build (or read) at start."""
    import psutil

    available, n = psutil.virtual_memory().available, plan.env.local_world_size
    need = plan.startup_host_memory
    warning = startup_memory_warning(need, available, n, plan.reads_whole_init_weights)
    return [warning] if warning else []


def _zero_problems(layout: Layout, engine: EngineSettings) -> list[str]:
    """ZeRO stages the layout cannot take, every one."""
    problems = []
    if layout.pipeline > 1 and engine.zero_stage >= 2:
        problems.append(
            f"parallel.pipeline={layout.pipeline} with ZeRO stage {engine.zero_stage}: "
            "DeepSpeed's pipeline engine takes ZeRO stage 0 or 1 (stages 2 and 3 would reduce or "
            "gather every parameter in each of the micro-batches the schedule interleaves); use "
            "ds_configs/zero1.json (each data-parallel rank keeps 1/data of the optimizer states)"
        )
    if layout.tensor > 1 and engine.zero_stage == 3:
        problems.append(
            f"parallel.tensor={layout.tensor} with ZeRO stage 3: ZeRO-3 would partition the "
            "tensor-parallel shards again, and neither DeepSpeed's zero_to_fp32 nor its universal "
            "checkpoints can put such a checkpoint back together; use ZeRO-1 or 2 (ZeRO-3's "
            "parameter sharding is what tensor parallelism already does within the layer)"
        )
    return problems


def pipeline_bubble_warning(pipeline: int, micro_batches: int) -> str:
    """1F1B keeps each stage idle (p - 1) / (m + p - 1) of a step (Narayanan et al. 2021)."""
    bubble = (pipeline - 1) / (micro_batches + pipeline - 1)
    return (
        f"parallel.pipeline={pipeline} with {micro_batches} micro-batch(es) per step "
        f"(train.grad_accum_steps): each stage idles {bubble:.0%} of every step in the pipeline "
        f"bubble; {4 * pipeline} or more micro-batches keep it under "
        f"{(pipeline - 1) / (5 * pipeline - 1):.0%}"
    )


def _resume(
    spec: RunSpec,
    env: DistEnv,
    engine: EngineSettings,
    damaged: dict[Path, str],
    layout: Layout,
) -> tuple[Resume | None, list[str]]:
    tag_dir, warnings = store.resolve_resume(spec.checkpoint.resume, spec.run_dir, damaged)
    existing = store.list_tags(store.checkpoint_dir(spec.run_dir))
    if tag_dir is None and damaged:
        raise UserError(
            f"no checkpoint of {spec.run_dir} is intact: " + "; ".join(warnings) + ". Restore "
            "one from a backup, or start a new run in another out_dir (or name)"
        )
    if tag_dir is None and existing:
        raise UserError(
            f"{spec.run_dir} already holds checkpoints of an earlier run (newest "
            f"{existing[-1][1]}) and checkpoint.resume=none would start over on top of them. "
            "Continue that run with checkpoint.resume=auto, or pick a new out_dir (or name)."
        )
    if tag_dir is None:
        return None, warnings
    meta = store.check_compatible(tag_dir, spec.model)
    _check_layout(tag_dir, meta, layout)
    universal = needs_universal(
        meta, env.world_size, engine.zero_stage, layout.tensor, layout.pipeline
    )
    if meta.consumed_samples != meta.step * engine.train_batch_size:
        warnings.append(
            f"{tag_dir} was trained with {meta.consumed_samples // max(meta.step, 1)} sequences "
            f"per step and this run takes {engine.train_batch_size}: step s reads samples "
            f"[s x {engine.train_batch_size}, ...), so some samples are read again or skipped. "
            "Keep micro_batch_size x grad_accum_steps x ranks equal to continue the data order "
            "exactly"
        )
    return Resume(tag_dir, meta, universal), warnings


def _check_layout(tag_dir: Path, meta: CheckpointMeta, layout: Layout) -> None:
    """A checkpoint moves between tensor-, sequence- and pipeline-parallel sizes (and world
    sizes) through DeepSpeed's universal format (sequence ranks hold whole weights: to ZeRO they
    are more data-parallel ranks), if it records how its parameters split."""
    if not meta.parallel and (layout.tensor > 1 or layout.pipeline > 1):
        raise UserError(
            f"{tag_dir} was written before zerolaunch recorded how each parameter splits over "
            f"tensor-parallel ranks and pipeline stages, so it cannot be resumed at "
            f"parallel.tensor={layout.tensor}, parallel.pipeline={layout.pipeline}: resume it "
            "with both 1 (and save a checkpoint), or start a new run from its weights with "
            f"checkpoint.init_from={tag_dir} and another out_dir"
        )


def _check_tokenizer(spec: RunSpec, resume: Resume | None, data: DataPlan) -> None:
    """A checkpoint continues only with the tokenizer it was trained with: the one its
    metadata records, or (tags from before it did) its run directory's tokenizer.json. A run
    directory holding checkpoints never has its tokenizer.json replaced by another."""
    if resume is not None:
        _check_resume_tokenizer(resume, data)
    own = spec.run_dir / "tokenizer.json"
    holds = own.exists() and store.list_tags(store.checkpoint_dir(spec.run_dir))
    if holds and json.loads(own.read_text()) != data.tokenizer.describe():
        raise UserError(
            f"{spec.run_dir} holds checkpoints of a run tokenized as {own} says, not as "
            f"{data.sources[0].prefix} is: pick another out_dir (or name) for this data"
        )


def _check_resume_tokenizer(resume: Resume, data: DataPlan) -> None:
    mine, recorded = data.tokenizer_identity, resume.meta.tokenizer
    if recorded:
        same, theirs = same_identity(recorded, mine), describe_identity(recorded)
    else:
        file = resume.tag_dir.parent.parent / "tokenizer.json"
        if not file.exists():
            return
        described = json.loads(file.read_text())
        same = described == data.tokenizer.describe()
        theirs = f"{described.get('type')} {described.get('name') or described.get('model', '')}"
    if same:
        return
    raise UserError(
        f"checkpoint {resume.tag_dir} was trained with the tokenizer {theirs}, but "
        f"{data.sources[0].prefix} is tokenized with {describe_identity(mine)}: resuming would "
        "read its token ids as other text. Resume with the data it was trained on, or start a "
        f"new run from its weights: checkpoint.init_from={resume.tag_dir} with another out_dir "
        "(or name)"
    )


def _init_from(spec: RunSpec, data: DataPlan, warnings: list[str]) -> Path:
    """The tag a fresh run starts from: complete, of this model's shape (any tokenizer)."""
    tag = Path(spec.checkpoint.init_from)
    problem = store.verify(tag) if tag.is_dir() else "no such directory"
    if problem:
        raise UserError(
            f"checkpoint.init_from={spec.checkpoint.init_from}: {problem}. Give a complete tag "
            "directory, e.g. runs/NAME/checkpoints/global_step1000 (zerolaunch ckpt list RUN)"
        )
    meta = store.check_compatible(tag, spec.model)
    if store.diverged(meta):
        raise UserError(
            f"checkpoint.init_from={tag}: its losses are not finite (saved after training "
            "diverged); start from an earlier tag"
        )
    if meta.tokenizer and not same_identity(meta.tokenizer, data.tokenizer_identity):
        warnings.append(
            f"checkpoint.init_from: {tag} was trained with {describe_identity(meta.tokenizer)}, "
            f"this run reads {describe_identity(data.tokenizer_identity)}: its embeddings start "
            "from rows that meant other tokens"
        )
    return tag


def _init_hf(spec: RunSpec, data: DataPlan, warnings: list[str]) -> Path:
    """The Hugging Face directory a fresh run starts from: every shard present (its shape was
    merged into the spec when it was loaded); a warning when the data's tokenizer is not the
    one its embeddings were trained for."""
    directory = Path(spec.model.init_from)
    if spec.checkpoint.init_from:
        raise UserError(
            f"model.init_from={directory} and checkpoint.init_from={spec.checkpoint.init_from} "
            "both give the first weights; keep one"
        )
    hf.weight_files(directory)
    if not _same_tokenizer(directory, data.tokenizer_identity):
        warnings.append(
            f"model.init_from: {directory} comes with its own tokenizer, but the data is "
            f"tokenized with {describe_identity(data.tokenizer_identity)}: its embeddings start "
            f"from rows that meant other tokens (prepare --tokenizer hf:{directory} to match)"
        )
    return directory


def _same_tokenizer(directory: Path, mine: dict) -> bool:
    """Whether a Hugging Face directory's tokenizer is the data's: the one zerolaunch exported
    (its description beside the files), or the very tokenizer.json the data was prepared with;
    true when the directory has none."""
    exported, theirs = directory / hf.TOKENIZER_FILE, directory / "tokenizer.json"
    if exported.is_file():
        try:
            tokenizer = load_tokenizer(json.loads(exported.read_text()), directory)
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return same_identity(identity(tokenizer), mine)
    if theirs.is_file():
        digest = hashlib.sha256(theirs.read_bytes()).hexdigest()
        return mine.get("type") == "hf" and mine.get("sha256") == digest
    return True


def write_run_files(plan: RunPlan) -> None:
    """The resolved spec, the final DeepSpeed config and the tokenizer, beside the checkpoints
    (rank 0, once the plan is known to be good: the first files a run writes)."""
    import yaml

    from data_pipeline.tokenizers import copy_tokenizer_files
    from launcher.config.load import spec_to_dict

    run_dir = plan.spec.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(spec_to_dict(plan.spec), sort_keys=False))
    (run_dir / "ds_config.json").write_text(json.dumps(plan.engine.ds_config, indent=2))
    tokenizer = plan.data.tokenizer
    (run_dir / "tokenizer.json").write_text(json.dumps(tokenizer.describe(), ensure_ascii=False))
    copy_tokenizer_files(tokenizer, run_dir)
