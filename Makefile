# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
WORKDIR ?= workdirs/demo

.PHONY: demo test install install-test clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: setup.py | $(VENV)/bin/python
	$(PIP) install -q -e .
	$(VENV)/bin/python -c "import alignment.train.loop"
	touch $@

$(VENV)/.installed-test: setup.py | $(VENV)/bin/python
	$(PIP) install -q -e '.[test]'
	$(VENV)/bin/python -c "import alignment.train.loop, torch, transformers"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	rm -rf $(WORKDIR)
	$(VENV)/bin/python -m alignment.main --config=configs/sft.py:tiny --workdir=$(WORKDIR)

test: install-test
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) workdirs
