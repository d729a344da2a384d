# Two commands for a fresh machine:  `make demo`  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The integration tests also run against the newest DeepSpeed release (0.19.6 is the default venv's).
DS_LATEST ?= 0.19.8
LATEST_VENV ?= .venv-ds-latest
LATEST_STAMP := $(LATEST_VENV)/.installed

.PHONY: install data demo test test-slow test-deepspeed-latest soak compare gpu-wheels clean

$(STAMP): requirements.txt requirements-data.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-data.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP) data

# Debian data packages for scripts/train.py (Fashion-MNIST, WordNet); needs root (tests skip without them).
DEB_DATA := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz /usr/share/wordnet/data.noun
data:
	@for f in $(DEB_DATA); do [ -e $$f ] || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist wordnet-base >/dev/null; \
	  else echo "WARNING: run 'sudo apt-get install -y dataset-fashion-mnist wordnet-base' (the tasks that need them skip)"; fi; \
	fi

demo: $(STAMP)
	$(BIN)/torchrun --standalone --nproc_per_node 2 scripts/demo.py

# DeepSpeed JIT-builds small ops; each venv keeps its own (0.19.6 and 0.19.8 builds are incompatible).
test: $(STAMP) data
	TORCH_EXTENSIONS_DIR=$(abspath $(VENV))/torch_extensions $(BIN)/python -m pytest -q -m "not slow and not gpu"

# The head-to-head report (results/): ~35 min on 2 cores; reruns only the runs whose settings changed.
compare: $(STAMP) data
	TORCH_EXTENSIONS_DIR=$(abspath $(VENV))/torch_extensions $(BIN)/python scripts/compare.py

# The tests beyond the default budget (~15 min on 2 cores; CI runs them after `make test`).
test-slow: $(STAMP) data
	TORCH_EXTENSIONS_DIR=$(abspath $(VENV))/torch_extensions $(BIN)/python -m pytest -q -m "slow and not gpu"

# For a GPU machine without network (benchmarks/gpu_checks.sh installs .whl/ when it is carried there):
# DeepSpeed 0.19.6 (pure Python) and the dependencies its CUDA image lacks, as Python 3.12 x86-64 wheels.
GPU_WHEELS := hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
gpu-wheels: $(STAMP)
	rm -rf .whl && mkdir -p .whl
	$(BIN)/python -m pip wheel -q --no-deps -w .whl deepspeed==0.19.6
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

# Long robustness runs (minutes to an hour), not part of `make test`.
soak: $(STAMP)
	TORCH_EXTENSIONS_DIR=$(abspath $(VENV))/torch_extensions $(BIN)/python -m pytest -q -m soak

$(LATEST_STAMP): requirements.txt pyproject.toml
	$(PY) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q torch==2.13.0
	$(LATEST_VENV)/bin/python -m pip install -q -r requirements.txt
	$(LATEST_VENV)/bin/python -m pip install -q --no-deps -r requirements-data.txt
	$(LATEST_VENV)/bin/python -m pip install -q deepspeed==$(DS_LATEST)
	$(LATEST_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $(LATEST_STAMP)

test-deepspeed-latest: $(LATEST_STAMP)
	TORCH_EXTENSIONS_DIR=$(abspath $(LATEST_VENV))/torch_extensions $(LATEST_VENV)/bin/python -m pytest -q tests/integration

clean:
	rm -rf $(VENV) $(LATEST_VENV) build *.egg-info
