"""Hugging Face in and out: transformers' GPT-2 and Llama weights trained from (model.init_from),
our checkpoints exported as either layout (sharded, bf16), and the same logits, loss and greedy
text on both sides. Every model and tokenizer is made here from a config: nothing downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, corpus_documents, overrides, read_metrics, run

from launcher.checkpoints import hf
from launcher.checkpoints.hf_layout import read_config
from launcher.config.load import SpecError, load_spec
from launcher.errors import UserError
from model.gpt import GPT, GPTConfig

transformers = pytest.importorskip("transformers")  # in the dev extra: present in CI

PROMPT = "What is an LLM?"
VOCAB = 384
LLAMA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             rope_theta=50000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)  # fmt: skip
GPT2 = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights far from their initial values (norms included), so a swapped tensor shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A BPE tokenizer trained on the test corpus, a Llama (grouped-query, untied, saved in
    shards with an index) and a GPT-2, both of its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("hf")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus_documents(), trainer)
    dirs = {}
    for name, config, cls, shard in (
        ("llama", transformers.LlamaConfig(**LLAMA), transformers.LlamaForCausalLM, "60KB"),
        ("gpt2", transformers.GPT2Config(**GPT2), transformers.GPT2LMHeadModel, "5GB"),
    ):
        config.bos_token_id = config.eos_token_id = tokenizer.token_to_id("<|endoftext|>")
        model = randomised(cls(config), seed=len(name))
        model.save_pretrained(root / name, max_shard_size=shard)
        tokenizer.save(str(root / name / "tokenizer.json"))
        config_file = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}
        (root / name / "tokenizer_config.json").write_text(json.dumps(config_file))
        dirs[name] = root / name
    return dirs


def ours_from(directory: Path) -> GPT:
    model = GPT(GPTConfig(**read_config(directory)))
    model.load_state_dict(hf.load_state(directory, model.config))
    return model.eval()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_imported_weights_give_transformers_logits(hf_dirs: dict[str, Path], name: str) -> None:
    directory = hf_dirs[name]
    if name == "llama":
        assert (directory / hf.INDEX).exists()  # sharded: read through the index
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    tokens = torch.randint(0, VOCAB, (3, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (theirs(tokens).logits - ours_from(directory)(tokens)[0]).abs().max().item()
    assert diff < 1e-4


@pytest.fixture(scope="module")
def hf_data(hf_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test corpus tokenized with the Llama directory's tokenizer (prepare --tokenizer hf:)."""
    root = tmp_path_factory.mktemp("hfdata")
    for i, text in enumerate(corpus_documents()):
        (root / f"doc{i}.txt").write_text(text)
    out = root / "data" / "bpe"
    run([PYTHON, "-m", "data_pipeline.prepare", "--input", str(root), "--tokenizer",
         f"hf:{hf_dirs['llama']}", "--val-fraction", "0.2", "--out", str(out)])  # fmt: skip
    return out


def llama_items(hf_dirs: dict[str, Path], hf_data: Path, out: Path) -> list[str]:
    return [
        f"model.init_from={hf_dirs['llama']}",
        "model.dropout=0.0",
        f"data.train={hf_data}",
        f"out_dir={out}",
        "train.micro_batch_size=4",
        "train.max_steps=3",
        "train.lr=1e-3",
        "train.warmup_steps=1",
        "train.log_interval=1",
        "eval.interval=0",
        "checkpoint.interval=3",
        "sample.max_new_tokens=0",
    ]


@pytest.fixture(scope="module")
def llama_run(
    hf_dirs: dict[str, Path], hf_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """One rank trained 3 steps from the Llama directory's weights."""
    out = tmp_path_factory.mktemp("llama") / "run"
    spec = bare_spec(out.parent)
    cmd = [PYTHON, "launcher/run.py", "--spec", str(spec), "--ds_config", "ds_configs/zero1.json"]
    result = run([*cmd, *overrides(*llama_items(hf_dirs, hf_data, out))])
    assert f"fresh start from the Hugging Face model {hf_dirs['llama']}" in result.stdout
    assert "comes with its own tokenizer" not in result.stderr  # the data was prepared with it
    return out


def test_training_starts_from_the_hf_weights_with_transformers_loss(
    hf_dirs: dict[str, Path], hf_data: Path, llama_run: Path
) -> None:
    from launcher.runtime.distributed import DistEnv
    from launcher.training.plan import prepare_run
    from launcher.training.step import Batches

    saved = load_spec(llama_run / "spec.yaml")  # the shape came from config.json
    assert (saved.model.n_layer, saved.model.n_kv_head, saved.model.rope_theta) == (2, 2, 5e4)
    assert (saved.model.positions, saved.model.tie_embeddings) == ("rope", False)
    items = llama_items(hf_dirs, hf_data, llama_run.parent / "again")
    spec = bare_spec(llama_run.parent)
    plan = prepare_run(spec, Path("ds_configs/zero1.json"), overrides(*items)[1::2],
                       env=DistEnv(0, 0, 1, 1), device="cpu")  # fmt: skip
    plan.data.train.prepare(plan.engine.train_batch_size, is_builder=True)
    x, y = Batches(plan.data.train, 4, 1, 1, 0, torch.device("cpu")).train(0, 0)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["llama"]).eval()
    with torch.no_grad():
        expected = theirs(x, labels=y, shift_labels=y).loss.item()
    first = next(m for m in read_metrics(llama_run) if m.get("step") == 1)
    assert first["Loss/train"] == pytest.approx(expected, abs=1e-5)


def test_export_is_a_transformers_model_both_ways(llama_run: Path, tmp_path: Path) -> None:
    """Sharded fp32 and bf16 exports load in transformers with our logits; its tokenizer files
    encode our ids; greedy generation of the prompt is ours token for token; and the export
    trains again (model.init_from) from exactly the same weights."""
    from launcher.checkpoints.models import load_model_and_tokenizer

    out = tmp_path / "fp32"
    cmd = [PYTHON, "-m", "launcher.export", "--run", str(llama_run), "--out"]
    run([*cmd, str(out), "--max-shard-size", "50KB"])
    index = json.loads((out / hf.INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] is not None
    ours, tokenizer, _ = load_model_and_tokenizer(llama_run, None, torch.device("cpu"))
    ours.eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    tokens = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (theirs(tokens).logits - ours(tokens)[0]).abs().max().item() < 1e-4
    again = ours_from(out)  # export -> init_from's reader: the very same weights
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(),
                                                 ours.state_dict().values()))  # fmt: skip

    auto = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer.encode(PROMPT)
    assert auto(PROMPT, add_special_tokens=False)["input_ids"] == ids
    assert auto.eos_token_id == tokenizer.eod_id
    prompt = torch.tensor([ids])
    mine = ours.generate(prompt, 30, temperature=0)
    greedy = theirs.generate(prompt, max_new_tokens=30, min_new_tokens=30, do_sample=False)
    assert mine.tolist() == greedy.tolist()

    half = tmp_path / "bf16"
    run([*cmd, str(half), "--dtype", "bf16"])
    assert json.loads((half / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(half, dtype=torch.bfloat16)
    with torch.no_grad():
        close = loaded.eval()(tokens).logits.float() - ours(tokens)[0]
    assert close.abs().max().item() < 0.1 and (half / "model.safetensors").stat().st_size < (
        sum(p.stat().st_size for p in out.glob("model-*.safetensors"))
    )


def bare_spec(tmp_path: Path) -> Path:
    """A spec that sets no model shape (the shipped demo's sets its own)."""
    path = tmp_path / "spec.yaml"
    path.write_text("name: from_hf\nmodel:\n  dropout: 0.0\n")
    return path


def test_bad_hf_directories_are_exit_2_naming_what_is_wrong(
    hf_dirs: dict[str, Path], hf_data: Path, tmp_path: Path
) -> None:
    spec = bare_spec(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SpecError, match="has no config.json"):
        load_spec(spec, [f"model.init_from={empty}"])
    mistral = tmp_path / "mistral"
    mistral.mkdir()
    (mistral / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"]}))
    with pytest.raises(SpecError, match="'MistralForCausalLM' is not supported"):
        load_spec(spec, [f"model.init_from={mistral}"])
    with pytest.raises(SpecError) as e:  # every disagreeing field, together
        load_spec(spec, [f"model.init_from={hf_dirs['llama']}", "model.n_layer=3",
                         "model.n_embd=64", "model.norm=layernorm"])  # fmt: skip
    assert "model.n_layer: the spec says 3, the checkpoint 2" in str(e.value)
    assert "model.norm: the spec says 'layernorm', the checkpoint 'rmsnorm'" in str(e.value)
    assert "model.bias" not in str(e.value)  # the demo spec's bias: true is not in this one
    assert "n_embd" not in str(e.value)  # it agrees
    loaded = load_spec(spec, [f"model.init_from={hf_dirs['llama']}", "model.n_layer=null"])
    assert loaded.model.n_layer == 2  # null: the checkpoint's

    broken = tmp_path / "broken"
    broken.mkdir()
    for p in hf_dirs["llama"].iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(UserError, match=f"does not have: {shard.name}"):
        hf.weight_files(broken)
    items = [f"model.init_from={broken}", f"data.train={hf_data}", f"out_dir={tmp_path / 'r'}"]
    cmd = [PYTHON, "launcher/run.py", "--spec", str(spec), "--ds_config", "ds_configs/zero1.json"]
    result = run([*cmd, *overrides(*items, "model.n_head=3")], check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model.n_head: the spec says 3, the checkpoint 4" in result.stderr
    result = run([*cmd, *overrides(*items)], check=False)
    assert result.returncode == 2 and f"does not have: {shard.name}" in result.stderr
    assert not (tmp_path / "r").exists()  # nothing written


def test_shapes_of_neither_layout_are_refused_before_export(llama_run: Path, tmp_path) -> None:
    from launcher.checkpoints.hf_layout import layout_of

    with pytest.raises(UserError, match="positions=rope, norm=layernorm.*matches neither"):
        layout_of(GPTConfig(positions="rope"))
    with pytest.raises(UserError, match="GPT2LMHeadModel has no grouped-query attention"):
        layout_of(GPTConfig(n_kv_head=2))
    cmd = [PYTHON, "-m", "launcher.export", "--run", str(llama_run), "--out", str(tmp_path / "x")]
    refused = run([*cmd, "--max-shard-size", "5 gigs"], check=False)
    assert refused.returncode == 2 and "--max-shard-size '5 gigs'" in refused.stderr
    assert not (tmp_path / "x").exists()
