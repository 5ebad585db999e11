# CollaFuse: `make demo` runs a 3-client simulation on the bundled digits, `make test` the test suite.
# Both install what they need into .venv first (idempotent; quick when already done).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.collafuse-installed
TORCH  := torch==2.13.0

.PHONY: install demo test test-all test-docker test-fuzz test-faults protos lint typecheck bench-quick clean

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

# The long fuzz run (>= 1,000 malformed requests over every RPC); the default suite runs a short one.
test-fuzz: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow tests/test_fuzz.py

# Real server and client processes on loopback: SIGKILL with restarts after 5 s and 60 s, SIGTERM during
# training/sampling/uploads, a client killed mid-release, a full disk (a tmpfs: needs root, as in CI) and
# cancelled uploads (~7 min on 2 cores); the default suite runs a short one. Also a real `collafuse-sim --engine ray`
# run (~1 min: Ray's start), an audited `collafuse-sim --autoencoder` run and the
# Stable Diffusion VAE architecture end to end (~1 min each), the outcome of the eps, x0 and c2 ambient losses,
# of a hand-off margin, of classifier-free guidance and of a client started from the shared model (about a minute each).
test-faults: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow tests/test_faults.py tests/test_distributed.py tests/test_reliability_faults.py \
		tests/test_split_poisoning.py tests/test_split_quality.py tests/test_audit_latent.py tests/test_sim_ray.py \
		tests/test_latent_e2e.py tests/test_latent_outcome.py tests/test_ambient_loss_x0.py tests/test_handoff_margin.py \
		tests/test_guidance_outcome.py tests/test_local_timesteps.py tests/test_init_from_server.py

# Builds the images without a registry (installs and starts Docker as root if needed), then runs
# `docker compose up` with tiny budgets; see tests/test_docker_compose.py. CI runs it.
test-docker: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m docker tests/test_docker_compose.py

protos: install
	$(PY) protos/generate.py

lint: install
	$(PY) -m ruff check common server client deploy evaluation tests benchmarks

# The package maps collafuse.<part> onto top-level folders (pyproject's package-dir), which mypy cannot follow
# through the editable install: without this tree every `collafuse.*` import would type as Any.
MYPY_ROOT := build/mypy
typecheck: install
	rm -rf $(MYPY_ROOT) && mkdir -p $(MYPY_ROOT)/collafuse && touch $(MYPY_ROOT)/collafuse/__init__.py
	for part in common server client deploy evaluation; do ln -s ../../../$$part $(MYPY_ROOT)/collafuse/$$part; done
	ln -s ../../../protos/collafuse/v1 $(MYPY_ROOT)/collafuse/v1
	MYPYPATH=$(MYPY_ROOT) $(PY) -m mypy $(MYPY_ROOT)/collafuse tests benchmarks

bench-quick: install
	$(PY) benchmarks/cut_study.py --quick

clean:
	rm -rf runs .pytest_cache
