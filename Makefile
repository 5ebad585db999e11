# CollaFuse: `make demo` runs a 3-client simulation on the bundled digits, `make test` the test suite.
# Both install what they need into .venv first (idempotent; quick when already done).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.collafuse-installed
TORCH  := torch==2.13.0

.PHONY: install demo test test-all protos lint bench-quick clean

install: $(STAMP)

# torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: install
	$(PY) -m collafuse.deploy.sim --out runs/demo

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-all: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m ''

protos: install
	$(PY) protos/generate.py

lint: install
	$(PY) -m ruff check common server client deploy tests benchmarks

bench-quick: install
	$(PY) benchmarks/cut_study.py --quick

clean:
	rm -rf runs .pytest_cache
