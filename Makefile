# Quorum: two commands on a fresh machine with Python 3.11 -> `make demo`, `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Where a machine keeps a local CPU build of torch (this workplace does); elsewhere pip takes
# the ordinary torch from the index.
TORCH_WHEEL := $(firstword $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl))
TORCH_REQ := $(if $(TORCH_WHEEL),torch==2.13.0,torch>=2.2)

.PHONY: demo test test-services install install-dev install-bench lint bench clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	touch $@

$(VENV)/.torch: $(VENV)/.created
	$(PIP) install -q "$(TORCH_REQ)"
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -e ".[server]"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

demo: install
	$(PY) manage.py migrate --noinput -v 0
	$(PY) manage.py demo $(DEMO_ARGS)

# The production-profile services suite (tests/services) runs in its own pytest process, whose
# settings are the production profile from the start: PostgreSQL (pytest-django creates and drops
# quorum_test_<pid>), Redis (the suite claims and flushes one database number), Celery. It skips,
# saying why, only when PostgreSQL or Redis is unreachable (.ci/run starts both).
SERVICES_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/postgres
SERVICES_REDIS_URL ?= redis://127.0.0.1:6379/0
SERVICES_ENV := QUORUM_PROFILE=production DATABASE_URL=$(SERVICES_DATABASE_URL) \
	REDIS_URL=$(SERVICES_REDIS_URL) CELERY_BROKER_URL=$(SERVICES_REDIS_URL) \
	SECRET_KEY=services-suite-throwaway-key-not-a-secret-0123456789abcdef

# The main suite runs in PYTEST_WORKERS processes (pytest-xdist), a test file per process at a
# time (--dist loadfile: a file's shared federation or demo run stays one fixture); e2e and
# browser tests wait on their agents' and the browser's processes, so 2 workers suit 2 cores.
PYTEST_WORKERS ?= 2

test: install-dev
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not services" $(PYTEST_ARGS)
	$(SERVICES_ENV) $(PY) -m pytest -q -rs tests/services $(SERVICES_PYTEST_ARGS)

test-services: install-dev
	$(SERVICES_ENV) $(PY) -m pytest -q -rs tests/services $(SERVICES_PYTEST_ARGS)

lint: install-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# `make bench` runs in its own venv (.venv-bench) with the peers (Flower) installed beside us, so
# that the peers' pins never touch the venv the tests run in. bench/run_all.py runs every
# benchmark in turn, prints its tables and writes JSON under bench/results/ (not committed).
BENCH_VENV ?= .venv-bench
BPY := $(BENCH_VENV)/bin/python

$(BENCH_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BPY) -m pip install -q --upgrade pip setuptools wheel
	$(BPY) -m pip install -q "$(TORCH_REQ)"
	$(BPY) -m pip install -q -e ".[bench]"
	touch $@

install-bench: $(BENCH_VENV)/.installed

# The test venv too: bench/load.py starts the production stack (Celery) from it, since Flower's
# pins leave .venv-bench with a Celery that cannot talk to Redis.
bench: $(BENCH_VENV)/.installed $(VENV)/.installed-dev
	$(BPY) bench/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) var .pytest_cache
