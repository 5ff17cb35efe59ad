"""Downstream tasks from local JSONL files, scored as lm-evaluation-harness (v0.4) scores them.

Two kinds, inferred per file from its first example (docs/evaluation.md):

    multiple_choice   {"context": str, "endings": [str, ...], "label": int}   acc, acc_norm
    last_word         {"text": str}  (the target is the last word)            acc, ppl

Each choice is one request (context, continuation) whose log-likelihood is the sum of the
log-probabilities of the continuation's tokens. Under ZeRO-3 every rank takes part in every
forward, so the ranks share the requests and all make the same number of forward calls.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from launcher.errors import UserError
from launcher.evaluation.val_loss import rank_share

MULTIPLE_CHOICE = "multiple_choice"
LAST_WORD = "last_word"
MAX_LISTED = 10
"""Problems listed per file in an error message; the rest are counted."""
TARGET_DELIMITER = " "
"""Between a multiple-choice context and each ending (lm-eval's default target_delimiter)."""

FORMAT_HELP = {
    MULTIPLE_CHOICE: 'each line {"context": str, "endings": [str, ...], "label": int}',
    LAST_WORD: 'each line {"text": str}',
}


@dataclass
class Request:
    """One scored continuation: token ids of the context and of the continuation after it."""

    context: list[int]
    continuation: list[int]


@dataclass
class Task:
    """A tokenized task: `requests` holds every choice of every example, in order."""

    name: str
    path: Path
    kind: str
    """multiple_choice | last_word."""
    block_size: int
    """Longest sequence fed to the model; longer contexts lose their first tokens."""
    requests: list[Request] = field(default_factory=list)
    choice_chars: list[list[int]] = field(default_factory=list)
    """Per example, the characters of each ending (acc_norm's divisor; one entry for last_word)."""
    labels: list[int] = field(default_factory=list)
    """Per example, the index of the right ending (0 for last_word)."""

    @property
    def size(self) -> int:
        """Number of examples."""
        return len(self.choice_chars)


@dataclass
class _Example:
    """One validated line: the requests' strings before tokenization, with their fields."""

    line: int
    pairs: list[tuple[str, str, str]]
    """(context, continuation, field name) per choice."""
    choice_chars: list[int]
    label: int


# Reading and validation


def _read_lines(path: Path, limit: int | None) -> list[tuple[int, str]]:
    """(1-based line number, text) of the non-blank lines, at most `limit` of them."""
    if not path.exists():
        raise UserError(f"{path} does not exist: give an existing JSONL file in eval.tasks")
    if not path.is_file():
        raise UserError(f"{path} is not a file: give a JSONL file (one example a line)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e}): save it as UTF-8 JSONL") from None
    lines = [(i, s) for i, s in enumerate(text.splitlines(), start=1) if s.strip()]
    if not lines:
        raise UserError(
            f"{path} is empty: write one example per line "
            f"({FORMAT_HELP[MULTIPLE_CHOICE]}, or {FORMAT_HELP[LAST_WORD]})"
        )
    return lines if limit is None else lines[:limit]


def _infer_kind(obj: Any) -> str | None:
    if isinstance(obj, dict) and "endings" in obj:
        return MULTIPLE_CHOICE
    if isinstance(obj, dict) and "text" in obj:
        return LAST_WORD
    return None


def _kind_problem(path: Path, line: int) -> str:
    return (
        f"{path}, line {line}: the first example has neither an 'endings' field (multiple "
        f"choice: {FORMAT_HELP[MULTIPLE_CHOICE]}) nor a 'text' field (last word: "
        f"{FORMAT_HELP[LAST_WORD]}); write one of these formats"
    )


def _check_string(obj: dict, key: str, where: str, problems: list[str]) -> str | None:
    if key not in obj:
        problems.append(f"{where}, field '{key}': missing; add it")
        return None
    value = obj[key]
    if not isinstance(value, str):
        problems.append(f"{where}, field '{key}': expected a string, got {type(value).__name__}")
        return None
    return value


def _multiple_choice(obj: dict, where: str, line: int) -> tuple[_Example | None, list[str]]:
    problems: list[str] = []
    context = _check_string(obj, "context", where, problems)
    if context is not None and not context.strip():
        problems.append(f"{where}, field 'context': empty; give the text the endings continue")
    endings = obj.get("endings")
    if "endings" not in obj:
        problems.append(f"{where}, field 'endings': missing; add the list of candidate endings")
    elif not isinstance(endings, list) or not all(isinstance(e, str) for e in endings):
        problems.append(
            f"{where}, field 'endings': expected a list of strings, got {endings!r:.60}"
        )
        endings = None
    elif len(endings) < 2:
        problems.append(f"{where}, field 'endings': {len(endings)} ending(s); give at least 2")
        endings = None  # the label's range is unknown
    else:
        for i, ending in enumerate(endings):
            if not ending.strip():
                problems.append(f"{where}, field 'endings[{i}]': empty; every ending needs text")
    label = obj.get("label")
    if "label" not in obj:
        problems.append(f"{where}, field 'label': missing; add the 0-based index of the ending")
    elif not isinstance(label, int) or isinstance(label, bool):
        problems.append(f"{where}, field 'label': expected an integer, got {label!r:.40}")
    elif endings is not None and not 0 <= label < len(endings):
        problems.append(
            f"{where}, field 'label': {label} is out of range; it is the 0-based index of the "
            f"right ending, 0 to {len(endings) - 1}"
        )
    if problems:
        return None, problems
    pairs = [(context, TARGET_DELIMITER + e, f"endings[{i}]") for i, e in enumerate(endings)]
    return _Example(line, pairs, [len(e) for e in endings], label), []


def _last_word(obj: dict, where: str, line: int) -> tuple[_Example | None, list[str]]:
    problems: list[str] = []
    text = _check_string(obj, "text", where, problems)
    if text is None:
        return None, problems
    # lm-eval's lambada_openai: context = text.rsplit(" ", 1)[0], target = " " + last word.
    parts = text.rsplit(" ", 1)
    if len(parts) < 2 or not parts[1].strip() or not parts[0].strip():
        what = "empty" if not text.strip() else "has no last word after a context and a space"
        problems.append(
            f"{where}, field 'text': {what}; give a passage whose last word (after the last "
            "space) is the target"
        )
        return None, problems
    return _Example(line, [(parts[0], " " + parts[1], "text")], [len(parts[1])], 0), []


def _parse(
    path: Path, lines: list[tuple[int, str]]
) -> tuple[str | None, list[_Example], list[str]]:
    """The file's kind, its valid examples and every problem of its lines."""
    kind: str | None = None
    examples: list[_Example] = []
    problems: list[str] = []
    for line, raw in lines:
        where = f"{path}, line {line}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: invalid JSON ({e.msg}, column {e.colno}); fix the line")
            continue
        if not isinstance(obj, dict):
            problems.append(f"{where}: expected a JSON object, got {type(obj).__name__}")
            continue
        if kind is None:
            kind = _infer_kind(obj)
            if kind is None:
                return None, [], [*problems, _kind_problem(path, line)]
        if _infer_kind(obj) not in (kind, None):
            other = "text" if kind == MULTIPLE_CHOICE else "endings"
            problems.append(
                f"{where}, field '{other}': a {_infer_kind(obj)} example in a {kind} file (as "
                "its first example says); every line must be one kind: one file per kind"
            )
            continue
        check = _multiple_choice if kind == MULTIPLE_CHOICE else _last_word
        example, found = check(obj, where, line)
        problems += found
        if example is not None:
            examples.append(example)
    return kind, examples, problems


# Tokenization


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: trailing spaces of the context go to the continuation; the
    continuation's tokens are those of the whole text after the context's tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = list(tokenizer.encode(context + continuation))
    context_enc = list(tokenizer.encode(context))
    return context_enc, whole[len(context_enc) :]


def _tokenize(
    example: _Example, path: Path, tokenizer: Any, block_size: int
) -> tuple[list[Request], list[str]]:
    requests: list[Request] = []
    problems: list[str] = []
    # The context is shared by every ending: a problem there is named once, as its own field.
    context_field = "context" if len(example.pairs) > 1 else example.pairs[0][2]
    try:
        tokenizer.encode(example.pairs[0][0])
    except ValueError as e:
        return [], [
            f"{path}, line {example.line}, field '{context_field}': cannot be tokenized: {e}"
        ]
    for context, continuation, field_name in example.pairs:
        where = f"{path}, line {example.line}, field '{field_name}'"
        try:
            context_enc, continuation_enc = encode_pair(tokenizer, context, continuation)
        except ValueError as e:
            problems.append(f"{where}: cannot be tokenized: {e}")
            continue
        if not continuation_enc:
            problems.append(f"{where}: no tokens of its own after the context's; reword it")
        elif len(continuation_enc) > block_size:
            problems.append(
                f"{where}: {len(continuation_enc)} tokens, more than block_size={block_size}; "
                "shorten it (only the context may be cut)"
            )
        requests.append(Request(context_enc, continuation_enc))
    return requests, problems


def _listing(header: str, problems: list[str]) -> str:
    shown = "\n".join(f"- {p}" for p in problems[:MAX_LISTED])
    more = f"\n... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return f"{header}:\n{shown}{more}"


def load_task(
    name: str, path: Path, tokenizer: Any, block_size: int, limit: int | None = None
) -> Task:
    """Read, validate and tokenize a task file (first `limit` examples); UserError on bad input."""
    path = Path(path)
    try:
        kind, examples, problems = _parse(path, _read_lines(path, limit))
    except UserError as e:
        raise UserError(f"task '{name}': {e}") from None
    task = Task(name, path, kind or MULTIPLE_CHOICE, block_size)
    for example in examples:
        requests, found = _tokenize(example, path, tokenizer, block_size)
        problems += found
        task.requests += requests
        task.choice_chars.append(example.choice_chars)
        task.labels.append(example.label)
    if problems:
        header = f"task '{name}': {len(problems)} problem(s) in {path}"
        raise UserError(_listing(header, problems), problems)
    if task.size == 0:
        raise UserError(f"task '{name}': no examples in {path} (tasks_limit={limit})")
    return task


def load_tasks(
    tasks: dict[str, str], tokenizer: Any, block_size: int, limit: int | None
) -> list[Task]:
    """Every task, every problem of every file gathered into one UserError."""
    loaded: list[Task] = []
    messages: list[str] = []
    problems: list[str] = []
    for name, path in tasks.items():
        try:
            loaded.append(load_task(name, Path(path), tokenizer, block_size, limit))
        except UserError as e:
            messages.append(str(e))
            problems += e.problems
    if messages:
        raise UserError("\n".join(messages), problems)
    return loaded


# Scoring


def _offsets(task: Task) -> list[int]:
    """Index of each example's first request (and the total at the end)."""
    return np.concatenate([[0], np.cumsum([len(c) for c in task.choice_chars])]).tolist()


def _window(request: Request, block_size: int) -> tuple[list[int], int]:
    """Tokens fed to the model (the last block_size + 1 of context + continuation, less the
    last, as lm-eval does) and the number of continuation tokens at its end."""
    tokens = (request.context + request.continuation)[-(block_size + 1) :][:-1]
    return tokens, len(request.continuation)


def _score_batch(
    windows: list[tuple[list[int], int]],
    targets: list[list[int]],
    forward: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-likelihood (float64) and greedy flag of each request of one micro-batch."""
    width = max(len(tokens) for tokens, _ in windows)
    x = torch.zeros(len(windows), width, dtype=torch.long)
    scored = torch.zeros(len(windows), width, dtype=torch.bool)
    target = torch.zeros(len(windows), width, dtype=torch.long)
    for row, ((tokens, n_cont), cont) in enumerate(zip(windows, targets)):
        x[row, : len(tokens)] = torch.tensor(tokens)
        scored[row, len(tokens) - n_cont : len(tokens)] = True
        target[row, len(tokens) - n_cont : len(tokens)] = torch.tensor(cont)
    logits = forward(x.to(device))
    scored, target = scored.to(logits.device), target.to(logits.device)
    # Only the continuation's positions: a [B, T, V] float32 copy would be large for big vocabs.
    logprobs = logits[scored].float().log_softmax(-1)
    wanted = target[scored]
    token_ll = logprobs.gather(1, wanted[:, None]).squeeze(1).double()
    missed = (logprobs.argmax(-1) != wanted).double()
    rows = torch.arange(len(windows), device=logits.device)[:, None].expand_as(scored)[scored]
    ll = torch.zeros(len(windows), dtype=torch.float64, device=logits.device)
    misses = torch.zeros_like(ll)
    return ll.index_add_(0, rows, token_ll), misses.index_add_(0, rows, missed) == 0


def _longest_first(task: Task) -> list[int]:
    """Request indices, longest first (as lm-eval sorts); dealt out in turn over the ranks,
    every rank gets a share of long and short ones."""
    lengths = [len(r.context) + len(r.continuation) for r in task.requests]
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


@torch.no_grad()
def loglikelihoods(
    task: Task,
    forward: Callable[[torch.Tensor], torch.Tensor],
    micro_batch_size: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    group: Any = None,
) -> tuple[list[float], list[bool]]:
    """Log-likelihood and greedy flag of every request of the task, on every rank. `rank` and
    `world_size` are within `group` (None: every rank), over which the results are summed."""
    total, order = len(task.requests), _longest_first(task)
    # Every rank makes as many forward calls as the rank with the most requests.
    batches, most = rank_share(total, rank, world_size, micro_batch_size)
    ll = torch.zeros(total, dtype=torch.float64, device=device)
    greedy = torch.zeros(total, dtype=torch.float64, device=device)
    for b in range(most):
        if b >= len(batches):
            forward(torch.zeros(1, 1, dtype=torch.long, device=device))  # results discarded
            continue
        chunk = [order[i] for i in batches[b]]
        windows = [_window(task.requests[i], task.block_size) for i in chunk]
        targets = [task.requests[i].continuation for i in chunk]
        batch_ll, batch_greedy = _score_batch(windows, targets, forward, device)
        index = torch.tensor(chunk, device=device)
        ll[index] = batch_ll.to(device)
        greedy[index] = batch_greedy.to(device, torch.float64)
    if world_size > 1:
        # Each request was scored on one rank and is zero elsewhere: the sum is exact.
        dist.all_reduce(ll, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(greedy, op=dist.ReduceOp.SUM, group=group)
    return ll.cpu().tolist(), [g > 0.5 for g in greedy.cpu().tolist()]


@torch.no_grad()
def score(
    task: Task,
    forward: Callable[[torch.Tensor], torch.Tensor],
    micro_batch_size: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    group: Any = None,
) -> dict[str, float]:
    """`forward(x)` takes a LongTensor [B, T] on `device` and returns logits [B, T, V]; the
    requests are shared by the `world_size` ranks of `group` (None: every rank).

    Every rank must call this (with the same task); each returns the same metrics: acc and
    acc_norm (multiple_choice) or acc and ppl (last_word), and n, the number of examples."""
    ll, greedy = loglikelihoods(task, forward, micro_batch_size, device, rank, world_size, group)
    return metrics(task, ll, greedy)


def metrics(task: Task, ll: list[float], greedy: list[bool]) -> dict[str, float]:
    """lm-eval's metrics from per-request log-likelihoods and greedy flags."""
    offsets = _offsets(task)
    if task.kind == LAST_WORD:
        return {
            "acc": float(np.mean(greedy)),
            "ppl": math.exp(-float(np.mean(ll))),
            "n": task.size,
        }
    correct, correct_norm = [], []
    for example, label in enumerate(task.labels):
        lls = np.array(ll[offsets[example] : offsets[example + 1]])
        chars = np.array(task.choice_chars[example], dtype=np.float64)
        correct.append(float(np.argmax(lls) == label))
        correct_norm.append(float(np.argmax(lls / chars) == label))
    return {
        "acc": float(np.mean(correct)),
        "acc_norm": float(np.mean(correct_norm)),
        "n": task.size,
    }
