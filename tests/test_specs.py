"""Every shipped spec loads, has its model's published parameter count, and `zerolaunch check`
prints its memory table with the DeepSpeed config its own header comment names."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, ZEROLAUNCH, overrides

from launcher.config.load import load_spec
from launcher.errors import UserError
from model.gpt import count_params

SPECS = REPO / "launcher" / "specs"
# name: (published vocabulary, published parameter count)
PUBLISHED = {
    "gpt2_124m": (50257, 124_439_808),
    "gpt2_350m": (50257, 354_823_168),
    "gpt2_774m": (50257, 774_030_080),
    "gpt2_1.5b": (50257, 1_557_611_200),
    "tinyllama_1.1b": (32000, 1_100_048_384),
    "llama2_7b": (32000, 6_738_415_616),
}


def test_every_shipped_spec_is_tested_here() -> None:
    shipped = {p.stem for p in SPECS.glob("*.yaml")}
    assert shipped == {*PUBLISHED, "shakespeare_char"}


@pytest.mark.parametrize("name", PUBLISHED)
def test_spec_loads_with_the_published_parameter_count(name: str) -> None:
    spec = load_spec(SPECS / f"{name}.yaml")
    assert spec.name == name and spec.model.vocab_size is None  # the tokenizer's, padded
    assert [s.path for s in spec.data.train] == ["data/MY_CORPUS"]  # the placeholder
    vocab, published = PUBLISHED[name]
    spec = load_spec(SPECS / f"{name}.yaml", [f"model.vocab_size={vocab}"])
    assert count_params(spec.model) == published
    assert load_spec(Path(name), [f"model.vocab_size={vocab}"]) == spec  # --spec NAME finds it


def test_an_unknown_spec_name_lists_the_shipped_ones() -> None:
    with pytest.raises(UserError, match="does not exist.*shipped spec's name.*gpt2_124m"):
        load_spec(Path("gpt2_125m"))


# The published models' config.json shape values (Hugging Face: gpt2, gpt2-medium, gpt2-large,
# gpt2-xl, TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T, meta-llama/Llama-2-7b-hf).
GPT2 = dict(n_positions=1024, vocab_size=50257, layer_norm_epsilon=1e-5)
LLAMA = dict(vocab_size=32000, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
HF_CONFIGS = {
    "gpt2_124m": ("GPT2", dict(GPT2, n_layer=12, n_embd=768, n_head=12)),
    "gpt2_350m": ("GPT2", dict(GPT2, n_layer=24, n_embd=1024, n_head=16)),
    "gpt2_774m": ("GPT2", dict(GPT2, n_layer=36, n_embd=1280, n_head=20)),
    "gpt2_1.5b": ("GPT2", dict(GPT2, n_layer=48, n_embd=1600, n_head=25)),
    "tinyllama_1.1b": ("Llama", dict(LLAMA, num_hidden_layers=22, hidden_size=2048,
                                     num_attention_heads=32, num_key_value_heads=4,
                                     intermediate_size=5632, max_position_embeddings=2048)),
    "llama2_7b": ("Llama", dict(LLAMA, num_hidden_layers=32, hidden_size=4096,
                                num_attention_heads=32, num_key_value_heads=32,
                                intermediate_size=11008, max_position_embeddings=4096)),
}  # fmt: skip


@pytest.mark.parametrize("name", PUBLISHED)
def test_spec_agrees_with_the_published_model(name: str, tmp_path: Path) -> None:
    """transformers builds the published shape with the published count, and the spec accepts
    its config.json as model.init_from (every shape field it sets agrees)."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    family, values = HF_CONFIGS[name]
    config = getattr(transformers, f"{family}Config")(**values)
    head = "LMHeadModel" if family == "GPT2" else "ForCausalLM"
    with torch.device("meta"):
        model = getattr(transformers, f"{family}{head}")(config)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name][1]
    config.save_pretrained(tmp_path)  # config.json: all that loading a spec reads of it
    spec = load_spec(SPECS / f"{name}.yaml", [f"model.init_from={tmp_path}"])
    assert count_params(spec.model) == PUBLISHED[name][1]


def documented_ds_config(name: str) -> str:
    """The DeepSpeed JSON the spec's header comment trains it with."""
    found = re.search(r"--ds_config (ds_configs/\S+\.json)", (SPECS / f"{name}.yaml").read_text())
    assert found, f"{name}.yaml: its header shows no --ds_config"
    return found.group(1)


@pytest.fixture(scope="module")
def checks(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """`zerolaunch check` of every spec for 8 GPUs of 80 GB, all started at once (a few
    seconds each, mostly imports); name -> (exit code, stdout, stderr)."""
    out = tmp_path_factory.mktemp("runs")
    procs = {}
    for name, (vocab, _) in PUBLISHED.items():
        items = [f"data.train={tiny_data}", f"model.vocab_size={vocab}", f"out_dir={out / name}"]
        cmd = [ZEROLAUNCH, "check", "--spec", str(SPECS / f"{name}.yaml"),
               "--ds_config", documented_ds_config(name), "--world-size", "8",
               "--device", "cuda", "--device-memory", "80GB", *overrides(*items)]  # fmt: skip
        procs[name] = subprocess.Popen(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE)  # fmt: skip
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        results[name] = (proc.returncode, stdout, stderr)
    return results


@pytest.mark.parametrize("name", PUBLISHED)
def test_check_prints_the_memory_table_of_every_stage(checks: dict, name: str) -> None:
    code, out, err = checks[name]
    assert code == 0, err
    vocab, published = PUBLISHED[name]
    assert f"parameters: {published:,} |" in out and "precision: bf16" in out
    stage = int(re.search(r"zero(\d)", documented_ds_config(name)).group(1))
    rows = {line.split()[0]: line for line in out.splitlines() if re.match(r"[0-3] ", line)}
    assert sorted(rows) == ["0", "1", "2", "3"]
    assert rows[str(stage)].endswith("fits <- configured"), rows[str(stage)]
    assert "GiB per device" in out and "DeepSpeed's estimate_zero" in out
