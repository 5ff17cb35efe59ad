# The README's commands. `make demo` and `make test` set everything up on a fresh machine.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
DS_CONFIG  ?= ds_configs/zero2.json
DEMO_OUT   ?= runs/demo
PY         := $(VENV)/bin/python
# Ranks for the demo: one per GPU, or 2 CPU ranks on a machine without GPUs.
NPROC      ?= $(shell $(PY) -c "import torch; print(torch.cuda.device_count() or 2)")
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install data demo test bench bench-sampling bench-data bench-data-memory gpu-check lint \
	format clean

install: $(VENV)/.installed

# torch first and pinned (a plain `pip install torch` pulls a multi-GB CUDA build);
# CUDA users: make install TORCH_SPEC=torch
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

data: install
	$(VENV)/bin/zerolaunch prepare --source shakespeare --tokenizer char --val-fraction 0.1 \
		--out data/shakespeare_char

# A fresh short run each time, in $(DEMO_OUT) (the demo's own scratch directory).
demo: data
	rm -rf $(DEMO_OUT)
	deepspeed --num_gpus $(NPROC) launcher/run.py --ds_config $(DS_CONFIG) --set out_dir=$(DEMO_OUT)

test: install lint
	$(PY) -m pytest

# The CPU rows of docs/benchmarks.md: the training step against plain PyTorch (1 rank, ZeRO-0),
# 2 ranks with ZeRO-2 on the same cores, then checkpoint saves (a 1.06 GiB checkpoint: synchronous
# vs asynchronous, and the disk). JSON in $(BENCH_OUT); about 8 minutes on 2 cores.
BENCH_OUT   ?= runs/bench
BENCH_MODEL := --set model.n_layer=6 --set model.n_head=6 --set model.n_embd=384 \
	--set model.block_size=256 --set model.vocab_size=65 --set model.dropout=0.0 \
	--set train.micro_batch_size=8
SAVE_MODEL  := --set model.n_layer=10 --set model.n_head=12 --set model.n_embd=768 \
	--set model.block_size=256 --set model.vocab_size=65 --set model.dropout=0.0 \
	--set train.micro_batch_size=2
bench: install
	$(VENV)/bin/zerolaunch bench --ds_config ds_configs/zero0.json $(BENCH_MODEL) --reference \
		--steps 60 --out $(BENCH_OUT)/cpu_1rank_zero0.json
	deepspeed --num_gpus 2 launcher/bench.py --ds_config ds_configs/zero2.json $(BENCH_MODEL) \
		--steps 30 --out $(BENCH_OUT)/cpu_2rank_zero2.json
	$(VENV)/bin/zerolaunch bench --ds_config ds_configs/zero1.json $(SAVE_MODEL) --steps 3 \
		--warmup 1 --saves $(BENCH_OUT) --save-steps 4 --out $(BENCH_OUT)/cpu_saves_zero1.json

# Generation speed without and with the KV cache (docs/benchmarks.md, "Sampling"): 300 tokens
# from random-weight GPT-2 124M and Llama-style 124M models, one process; about 4 minutes on 2 cores.
bench-sampling: install
	$(VENV)/bin/zerolaunch bench --sampling gpt2-124m --out $(BENCH_OUT)/cpu_sampling_gpt2.json
	$(VENV)/bin/zerolaunch bench --sampling llama-124m --out $(BENCH_OUT)/cpu_sampling_llama.json

# On a GPU machine (it has its own CUDA torch; nothing is installed into .venv): the prepared
# check of tests/gpu/check.sh, every figure as JSON in $(GPU_OUT). Prepare the corpus first.
GPU_OUT ?= runs/gpu-check
gpu-check:
	bash tests/gpu/check.sh $(GPU_OUT)

# Data pipeline throughput (prints JSON): prepare vs the raw tokenizer, and the loader.
bench-data: install
	$(PY) -m data_pipeline.bench

# Memory of preparing multi-GB inputs (docs/data.md, "Memory"): a .txt with a separator, a .jsonl
# and a .parquet of 512 MB row groups, BENCH_DATA_GB of text each (written under /tmp one at a
# time and deleted after: about 2.2 x BENCH_DATA_GB GB of disk), each prepared by the CLI while
# its process tree is sampled; against the raw tokenizer. About 12 minutes for 2 GB on 2 cores.
BENCH_DATA_GB ?= 2
bench-data-memory: install
	$(PY) -m data_pipeline.bench --memory --gb $(BENCH_DATA_GB)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf runs .pytest_cache .ruff_cache *.egg-info
