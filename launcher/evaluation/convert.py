"""Convert published task files into the JSONL formats of eval.tasks (docs/evaluation.md).

python -m launcher.evaluation.convert hellaswag hellaswag_val.jsonl tasks/hellaswag.jsonl
python -m launcher.evaluation.convert lambada lambada_test.jsonl tasks/lambada.jsonl

hellaswag  HellaSwag rows ({activity_label, ctx_a, ctx_b, endings, label}: rowanz/hellaswag's
           hellaswag_val.jsonl, or the Hugging Face Rowan/hellaswag split saved as JSONL), with
           lm-evaluation-harness's preprocessing -> {"context", "endings", "label"}
lambada    LAMBADA passages ({"text"} JSONL: EleutherAI/lambada_openai's lambada_test.jsonl, or a
           .txt with one passage per line) -> {"text"}; the last word is the target

Nothing is written unless every row converts; bad rows are listed (file, line, field).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher.errors import UserError, run_cli

MAX_LISTED = 10
HELLASWAG_FIELDS = ("activity_label", "ctx_a", "ctx_b", "endings", "label")


def preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess`: WikiHow's bracketed markers out, spaces tidied."""
    text = text.strip()
    # NOTE (lm-eval): brackets are artifacts of the WikiHow part of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _label(value: Any, n_endings: int) -> int | None:
    """HellaSwag's label: an int, or a string of digits (Hugging Face), within the endings."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_endings:
        return None
    return value


def hellaswag_row(row: dict, where: str) -> tuple[dict | None, list[str]]:
    """One HellaSwag row in our multiple-choice format, as lm-eval's `process_docs` builds it."""
    problems = [f"{where}, field '{k}': missing" for k in HELLASWAG_FIELDS if k not in row]
    problems += [
        f"{where}, field '{k}': expected a string, got {type(row[k]).__name__}"
        for k in HELLASWAG_FIELDS[:3]
        if k in row and not isinstance(row[k], str)
    ]
    endings = row.get("endings")
    if not isinstance(endings, list) or not all(isinstance(e, str) for e in endings):
        problems.append(f"{where}, field 'endings': expected a list of strings")
    elif "label" in row and _label(row["label"], len(endings)) is None:
        problems.append(
            f"{where}, field 'label': {row['label']!r} is not an ending's index "
            f"(0 to {len(endings) - 1}); the test split has no labels: use the validation split"
        )
    if problems:
        return None, problems
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    out = {
        "context": preprocess(row["activity_label"] + ": " + ctx),
        "endings": [preprocess(e) for e in endings],
        "label": _label(row["label"], len(endings)),
    }
    empty = [i for i, e in enumerate(out["endings"]) if not e]
    problems = [f"{where}, field 'endings[{i}]': empty after preprocessing" for i in empty]
    return (None, problems) if problems else (out, [])


def lambada_row(row: dict, where: str) -> tuple[dict | None, list[str]]:
    """One LAMBADA passage; its last word (after the last space) is the target."""
    text = row.get("text")
    if not isinstance(text, str):
        what = "missing" if "text" not in row else f"expected a string, got {type(text).__name__}"
        return None, [f"{where}, field 'text': {what}"]
    context, _, last = text.rpartition(" ")
    if not context.strip() or not last.strip():
        return None, [f"{where}, field 'text': no last word after a context and a space"]
    return {"text": text}, []


def _rows(path: Path) -> list[tuple[int, Any, str | None]]:
    """(line number, value, JSON error) of each non-blank line; a .txt line is {"text": line}."""
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e})") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if path.suffix == ".txt":
            rows.append((number, {"text": line}, None))
            continue
        try:
            rows.append((number, json.loads(line), None))
        except json.JSONDecodeError as e:
            rows.append((number, None, f"invalid JSON ({e.msg}, column {e.colno})"))
    if not rows:
        raise UserError(f"{path} is empty")
    return rows


def convert(kind: str, source: Path, target: Path) -> int:
    """Convert every row of `source` into `target`; the number of examples written."""
    convert_row: Callable = hellaswag_row if kind == "hellaswag" else lambada_row
    examples, problems = [], []
    for number, value, error in _rows(source):
        where = f"{source}, line {number}"
        if error or not isinstance(value, dict):
            problems.append(f"{where}: {error or 'expected a JSON object'}")
            continue
        example, found = convert_row(value, where)
        problems += found
        examples.append(example)
    if problems:
        listed = "\n".join(f"- {p}" for p in problems[:MAX_LISTED])
        more = f"\n... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise UserError(
            f"{len(problems)} problem(s) in {source}, nothing written (is it {kind}'s format? "
            f"see --help):\n{listed}{more}",
            problems,
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in examples)
    return len(examples)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m launcher.evaluation.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("kind", choices=["hellaswag", "lambada"], help="the source's format")
    p.add_argument("source", type=Path, help="input file (.jsonl; lambada also takes .txt)")
    p.add_argument("target", type=Path, help="output JSONL, for eval.tasks: {NAME: TARGET}")
    args = p.parse_args(argv)
    n = convert(args.kind, args.source, args.target)
    shape = "multiple-choice" if args.kind == "hellaswag" else "last-word"
    print(f"wrote {n} {shape} examples to {args.target} (from {args.source})")
    return 0


if __name__ == "__main__":
    run_cli(main)
