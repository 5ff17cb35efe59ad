"""Downstream tasks: validation, lm-eval scoring against hand-computed and unbatched values,
ranks sharing the work (2 gloo processes), and the HellaSwag / LAMBADA converters."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data_pipeline.tokenizers import CharTokenizer
from launcher.errors import UserError, run_cli
from launcher.evaluation import convert
from launcher.evaluation.tasks import load_task, load_tasks, loglikelihoods, score
from model.gpt import GPT, GPTConfig

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
BLOCK = 64

CHOICES = [
    {"context": "The cat", "endings": ["sat", "jumped high", "ran"], "label": 0},
    {"context": "A dog", "endings": ["barked loudly", "ate"], "label": 0},
    {"context": "Birds", "endings": ["fly", "sing", "fly"], "label": 2},
    {"context": "We", "endings": ["go", "went away"], "label": 0},
    {"context": "Then, the man", "endings": ["left.", "stayed home all day."], "label": 1},
]
PASSAGES = [
    {"text": "one one"},
    {"text": "one two"},
    {"text": "the end of the story is one"},
    {"text": "they said hello"},
    {"text": "one one one"},
]
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ,.:!?'"


def tokenizer() -> CharTokenizer:
    return CharTokenizer.from_texts([ALPHABET])


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def uniform(vocab_size: int):
    """A model that knows nothing: equal logits, so every token's log-prob is -ln V."""
    return lambda x: torch.zeros(*x.shape, vocab_size)


def tiny_gpt(vocab_size: int) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=BLOCK, vocab_size=vocab_size)
    return GPT(config).eval()


def unbatched_ll(model: GPT, context: list[int], continuation: list[int]) -> float:
    """The continuation's log-likelihood from one sequence alone, as lm-eval computes it."""
    tokens = (context + continuation)[-(BLOCK + 1) :]
    logits, _ = model(torch.tensor(tokens[:-1])[None])
    logprobs = logits[0].float().log_softmax(-1)
    first = len(tokens) - len(continuation)
    return sum(logprobs[k - 1, tokens[k]].item() for k in range(first, len(tokens)))


# Scoring with a model whose outputs are known


def test_multiple_choice_uniform_model_scores_as_computed_by_hand(tmp_path):
    tok = tokenizer()
    task = load_task("mc", write_jsonl(tmp_path / "mc.jsonl", CHOICES), tok, BLOCK)
    # ll(ending) = -len(" " + ending) * ln V: the shortest ending wins acc, and ll / len(ending)
    # = -(1 + 1/len) ln V, so the longest wins acc_norm; ties go to the first.
    lengths = [[len(e) for e in ex["endings"]] for ex in CHOICES]
    shortest = [ls.index(min(ls)) for ls in lengths]
    longest = [ls.index(max(ls)) for ls in lengths]
    labels = [ex["label"] for ex in CHOICES]
    result = score(task, uniform(tok.vocab_size), 2, CPU)
    assert result["acc"] == sum(s == y for s, y in zip(shortest, labels)) / 5 == 0.4
    assert result["acc_norm"] == sum(g == y for g, y in zip(longest, labels)) / 5 == 0.4
    assert result["n"] == 5 and task.size == 5 and task.kind == "multiple_choice"


def test_last_word_uniform_model_ppl_is_vocab_to_the_mean_length(tmp_path):
    tok = tokenizer()
    task = load_task("lw", write_jsonl(tmp_path / "lw.jsonl", PASSAGES), tok, BLOCK)
    n_tokens = [len(" " + p["text"].rsplit(" ", 1)[1]) for p in PASSAGES]
    result = score(task, uniform(tok.vocab_size), 3, CPU)
    # Greedy means every target token is id 0 (argmax of equal logits): never, a word has letters.
    assert tok.encode(" ") == [0]
    assert result["acc"] == 0.0
    assert result["ppl"] == pytest.approx(tok.vocab_size ** (sum(n_tokens) / len(n_tokens)))
    assert task.kind == "last_word" and result["n"] == 5


def test_last_word_greedy_and_ppl_under_a_bigram_model(tmp_path):
    """A model that predicts "n" after "o", "e" after "n", "o" after a space and a space after
    anything else: greedy exactly for the passages whose last word is "one"."""
    tok = tokenizer()
    task = load_task("lw", write_jsonl(tmp_path / "lw.jsonl", PASSAGES), tok, BLOCK)
    nxt = {"o": "n", "n": "e", "e": " ", " ": "o"}
    table = torch.full((tok.vocab_size,), tok.encode(" ")[0])
    for a, b in nxt.items():
        table[tok.encode(a)[0]] = tok.encode(b)[0]
    lift, V = 5.0, tok.vocab_size
    bigram = lambda x: torch.nn.functional.one_hot(table[x], V).float() * lift
    hit, miss = lift - math.log(math.exp(lift) + V - 1), -math.log(math.exp(lift) + V - 1)
    expected_ll, expected_greedy = [], []
    for p in PASSAGES:
        text = p["text"]
        start = len(text.rsplit(" ", 1)[0])  # the continuation: text[start:], " " + last word
        right = [nxt.get(text[k - 1], " ") == text[k] for k in range(start, len(text))]
        expected_ll.append(sum(hit if r else miss for r in right))
        expected_greedy.append(all(right))
    assert expected_greedy == [True, False, True, False, True]
    result = score(task, bigram, 2, CPU)
    assert result["acc"] == pytest.approx(3 / 5)
    assert result["ppl"] == pytest.approx(math.exp(-sum(expected_ll) / 5))


# A real model: batched and distributed scoring against one sequence at a time


def test_gpt_scores_match_unbatched_log_likelihoods_for_any_micro_batch(tmp_path):
    tok = tokenizer()
    model = tiny_gpt(tok.vocab_size)
    forward = lambda x: model(x)[0]
    for rows, name in ((CHOICES, "mc"), (PASSAGES, "lw")):
        task = load_task(name, write_jsonl(tmp_path / f"{name}.jsonl", rows), tok, BLOCK)
        expected = [unbatched_ll(model, r.context, r.continuation) for r in task.requests]
        for micro_batch_size in (1, 3):
            ll, _ = loglikelihoods(task, forward, micro_batch_size, CPU)
            assert ll == pytest.approx(expected, abs=1e-4)
        assert score(task, forward, 1, CPU) == pytest.approx(score(task, forward, 3, CPU))


def test_context_longer_than_block_size_is_cut_from_the_left(tmp_path):
    tok = tokenizer()
    long_text = " ".join(["word"] * 40) + " end"  # 203 characters, block_size 64
    rows = [{"text": long_text}, {"text": "short one"}]
    task = load_task("long", write_jsonl(tmp_path / "long.jsonl", rows), tok, BLOCK)
    model = tiny_gpt(tok.vocab_size)
    ll, _ = loglikelihoods(task, lambda x: model(x)[0], 2, CPU)
    expected = [unbatched_ll(model, r.context, r.continuation) for r in task.requests]
    assert ll == pytest.approx(expected, abs=1e-4)
    result = score(task, uniform(tok.vocab_size), 2, CPU)
    assert result["ppl"] == pytest.approx(tok.vocab_size ** ((4 + 4) / 2))


def _distributed_worker(rank: int, tmp: str, world_size: int) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world_size
    )
    tok = tokenizer()
    model = tiny_gpt(tok.vocab_size)
    model.load_state_dict(torch.load(f"{tmp}/model.pt"))
    calls = []
    forward = lambda x: (calls.append(x.shape), model(x)[0])[1]
    out = {}
    for name in ("mc", "lw"):
        task = load_task(name, Path(tmp) / f"{name}.jsonl", tok, BLOCK)
        calls.clear()
        result = score(task, forward, 2, CPU, rank, world_size)
        ll, _ = loglikelihoods(task, forward, 2, CPU, rank, world_size)
        counts = [torch.tensor(len(calls))] * world_size
        dist.all_gather(counts, torch.tensor(len(calls)))
        # Both ranks took part in every forward (ZeRO-3 would hang otherwise).
        assert len({int(c) for c in counts}) == 1, counts
        out[name] = {"result": result, "ll": ll, "calls": len(calls)}
    Path(f"{tmp}/rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def test_two_ranks_share_the_work_and_agree_with_one(tmp_path):
    tok = tokenizer()
    write_jsonl(tmp_path / "mc.jsonl", CHOICES)  # 13 requests: 7 and 6 per rank
    write_jsonl(tmp_path / "lw.jsonl", PASSAGES)  # 5 requests: 3 and 2 (a dummy forward)
    model = tiny_gpt(tok.vocab_size)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    mp.spawn(_distributed_worker, args=(str(tmp_path), 2), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    for name in ("mc", "lw"):
        task = load_task(name, tmp_path / f"{name}.jsonl", tok, BLOCK)
        single = score(task, lambda x: model(x)[0], 3, CPU)
        ll, _ = loglikelihoods(task, lambda x: model(x)[0], 3, CPU)
        assert ranks[0][name]["result"] == pytest.approx(single)
        assert ranks[0][name]["ll"] == pytest.approx(ll, abs=1e-4)
        # 2 forward calls per score (ceil(ceil(requests / 2) / 2)), twice: score + loglikelihoods
        assert ranks[0][name]["calls"] == 2 * math.ceil(math.ceil(len(task.requests) / 2) / 2)


# Bad input: file, line and field named, every problem of a file in one error

GOOD_MC = CHOICES[0]
GOOD_LW = PASSAGES[0]
BAD_LINES = [
    ("invalid json", GOOD_MC, '{"context": "a", ', "JSON"),
    ("missing field", GOOD_MC, {"context": "a", "endings": ["b", "c"]}, "'label'"),
    ("label type", GOOD_MC, {"context": "a", "endings": ["b", "c"], "label": "1"}, "'label'"),
    ("endings type", GOOD_MC, {"context": "a", "endings": "bc", "label": 0}, "'endings'"),
    ("context type", GOOD_MC, {"context": 3, "endings": ["b", "c"], "label": 0}, "'context'"),
    ("label range", GOOD_MC, {"context": "a", "endings": ["b", "c"], "label": 2}, "'label'"),
    ("empty context", GOOD_MC, {"context": " ", "endings": ["b", "c"], "label": 0}, "'context'"),
    ("one ending", GOOD_MC, {"context": "a", "endings": ["b"], "label": 0}, "'endings'"),
    ("empty ending", GOOD_MC, {"context": "a", "endings": ["b", ""], "label": 0}, "'endings[1]'"),
    ("context chars", GOOD_MC, {"context": "a€", "endings": ["b", "c"], "label": 0}, "'context'"),
    ("ending chars", GOOD_MC, {"context": "a", "endings": ["b", "c€"], "label": 0}, "'endings[1]'"),
    ("other kind", GOOD_MC, {"text": "a b"}, "'text'"),
    ("no last word", GOOD_LW, {"text": "word"}, "'text'"),
    ("trailing space", GOOD_LW, {"text": "a word "}, "'text'"),
    ("empty text", GOOD_LW, {"text": ""}, "'text'"),
    ("text type", GOOD_LW, {"text": ["a b"]}, "'text'"),
    ("missing text", GOOD_LW, {"txt": "a b"}, "'text'"),
    ("text chars", GOOD_LW, {"text": "a b€"}, "'text'"),
]


@pytest.mark.parametrize(
    "first,bad,field", [c[1:] for c in BAD_LINES], ids=[c[0] for c in BAD_LINES]
)
def test_bad_line_names_file_line_and_field(tmp_path, first, bad, field):
    path = write_jsonl(tmp_path / "bad_task.jsonl", [first, bad, first])
    with pytest.raises(UserError) as e:
        load_task("t", path, tokenizer(), BLOCK)
    message = str(e.value)
    assert "bad_task.jsonl" in message and "line 2" in message and field in message, message
    assert len(e.value.problems) == 1


def test_empty_missing_and_unknown_kind_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    write_jsonl(tmp_path / "neither.jsonl", [{"question": "?"}])
    for name, expected in [("empty.jsonl", "empty"), ("nope.jsonl", "does not exist")]:
        with pytest.raises(UserError, match=expected) as e:
            load_task("t", tmp_path / name, tokenizer(), BLOCK)
        assert name in str(e.value)
    with pytest.raises(UserError, match="line 1.*'endings'.*'text'"):
        load_task("t", tmp_path / "neither.jsonl", tokenizer(), BLOCK)


def test_every_problem_of_every_file_in_one_error(tmp_path):
    rows = [GOOD_MC] + [{"context": "a", "endings": ["b", "c"], "label": 9}] * 12
    write_jsonl(tmp_path / "many.jsonl", rows)
    write_jsonl(tmp_path / "lw.jsonl", [GOOD_LW, {"text": "word"}])
    tasks = {"many": str(tmp_path / "many.jsonl"), "lw": str(tmp_path / "lw.jsonl")}
    with pytest.raises(UserError) as e:
        load_tasks(tasks, tokenizer(), BLOCK, None)
    message = str(e.value)
    assert len(e.value.problems) == 13
    assert "line 2" in message and "line 11" in message and "line 12" not in message
    assert "... and 2 more" in message and "lw.jsonl, line 2, field 'text'" in message
    # The limit reads only the first examples: the bad lines after them do not count.
    assert [t.size for t in load_tasks(tasks, tokenizer(), BLOCK, 1)] == [1, 1]


# Converters

HELLASWAG_ROWS = [
    {
        "ind": 4,
        "activity_label": "Removing ice from car",
        "ctx_a": "Then, the man writes over the snow covering the window of a car.",
        "ctx_b": "then",
        "ctx": "ignored",
        "endings": [", the man adds wax.", ", the man continues removing the snow."],
        "label": 1,
        "split": "val",
    },
    {
        "activity_label": "Home and Garden",
        "ctx_a": "[header] How to clean a grill [title] Heat the grill.",
        "ctx_b": "",
        "endings": ["[step] Scrub the grates.  Then rinse.", "Do nothing [title] Wait."],
        "label": "0",
    },
]


def test_hellaswag_converts_with_lm_eval_preprocessing(tmp_path):
    source = write_jsonl(tmp_path / "hellaswag_val.jsonl", HELLASWAG_ROWS)
    target = tmp_path / "out" / "hellaswag.jsonl"
    assert convert.main(["hellaswag", str(source), str(target)]) == 0
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert rows == [
        {
            "context": "Removing ice from car: Then, the man writes over the snow covering the "
            "window of a car. Then",
            "endings": [", the man adds wax.", ", the man continues removing the snow."],
            "label": 1,
        },
        {
            "context": "Home and Garden: How to clean a grill. Heat the grill.",
            "endings": [" Scrub the grates. Then rinse.", "Do nothing. Wait."],
            "label": 0,
        },
    ]
    assert load_task("hellaswag", target, tokenizer(), BLOCK).size == 2


def test_hellaswag_without_labels_is_refused_with_exit_code_2(tmp_path, capsys):
    row = {k: v for k, v in HELLASWAG_ROWS[0].items() if k != "label"}
    source = write_jsonl(tmp_path / "hellaswag_test.jsonl", [row])
    target = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: convert.main(["hellaswag", str(source), str(target)]))
    assert e.value.code == 2 and not target.exists()
    assert "hellaswag_test.jsonl, line 1, field 'label'" in capsys.readouterr().err


def test_lambada_converts_from_jsonl_by_the_cli_and_from_txt(tmp_path):
    source = write_jsonl(tmp_path / "lambada_test.jsonl", PASSAGES[:3])
    target = tmp_path / "lambada.jsonl"
    cli = [sys.executable, "-m", "launcher.evaluation.convert", "lambada", source, target]
    done = subprocess.run(cli, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "wrote 3 last-word examples" in done.stdout
    assert [json.loads(line) for line in target.read_text().splitlines()] == PASSAGES[:3]
    (tmp_path / "passages.txt").write_text("one one\n\nthey said hello\n")
    assert convert.main(["lambada", str(tmp_path / "passages.txt"), str(target)]) == 0
    assert load_task("lambada", target, tokenizer(), BLOCK).size == 2
