# Two commands: `make run` and `make test`. Everything else is here for them.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Two stamps: `make run` needs the package and its dependencies only; the tests, the servers'
# clients and the online service add the extras on top (about 40 s more to install).
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed
SITE = $(VENV)/lib/python*/site-packages
TORCH_VERSION ?= 2.13.0
DATA ?= data
WORK ?= work
PATIENTS ?= 120
SEED ?= 20261126

export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow/mlflow.db
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
# Prefect's ephemeral server gets 20 s to start; two busy cores need more (CI timed out at 20 s).
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180

.PHONY: run test integration lint venv data bench clean help

help:
	@echo "make run   - set up .venv, generate the demo corpus if absent, run the pipeline flow"
	@echo "make test  - set up .venv, run the test suite (not slow, not gpu, not integration)"
	@echo "make integration - tests against real PostgreSQL, MLflow and Prefect servers"
	@echo "make lint  - ruff + mypy on dicomops/"
	@echo "make bench - run the benchmarks in benchmarks/"

venv: $(STAMP)

# pip compiles every installed module on one core; compileall compiles the same files on all of
# them, after the install (2 cores: torch and the dependencies in 100 s instead of 150 s).
# compileall's exit status is ignored as pip's compile errors are: some packages ship modules for
# newer Pythons only. `make run` compiles none of them up front: it imports about a fifth of the
# 40,000 modules its install holds (8,585 on the demo), and `run` and `data` let Python write the
# bytecode of those as they are first imported, also where PYTHONDONTWRITEBYTECODE is set (32 s of
# compileall on 2 Xeon cores saved; the pipeline, compiling as it went, took 13:01 against 13:28
# the run before, with everything compiled).
$(RUN_STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install -qq --upgrade pip
	# CPU torch first: a bare 'torch' can pull a multi-GB CUDA build.
	$(PIP) install -qq --no-compile "torch==$(TORCH_VERSION)"
	$(PIP) install -qq --no-compile -e .
	@touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(PIP) install -qq --no-compile -e ".[dev,dask,server,online]"
	@$(PY) -m compileall -qq -j 0 $(SITE) || true
	@touch $(STAMP)

# Bytecode of what is imported is written beside its source (see above): in .venv, and in the
# checkout's __pycache__ folders, which git ignores.
WRITE_BYTECODE := env -u PYTHONDONTWRITEBYTECODE

data: $(RUN_STAMP)
	$(WRITE_BYTECODE) $(PY) -m dicomops.cli data $(DATA) --patients $(PATIENTS) --seed $(SEED)

run: data
	$(WRITE_BYTECODE) $(VENV)/bin/dicomops run $(DATA) --work $(WORK)

# Two pytest-xdist workers, one per core (tests/conftest.py gives each its share of the threads):
# TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu and not integration" -p no:cacheprovider -n $(TEST_WORKERS)

# Real PostgreSQL, MLflow server and Prefect server on loopback ports, a headless Chromium on
# their UIs, an Orthanc PACS with DICOMweb, a Redis cache and the online service on Ray Serve;
# installs PostgreSQL, Chromium, Orthanc (with its DICOMweb plugin), dicom3tools, DCMTK and Redis
# from the distribution if absent. The UI screenshots
# land in $(DICOMOPS_UI_ARTIFACTS)/ui-screenshots for CI to keep.
integration: export DICOMOPS_UI_ARTIFACTS ?= $(abspath $(WORK))/integration-artifacts
integration: $(STAMP)
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || missing="postgresql"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v Orthanc >/dev/null || missing="$$missing orthanc"; \
	[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing="$$missing orthanc-dicomweb"; \
	[ -e /usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so ] || missing="$$missing orthanc-postgresql"; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	command -v storescu >/dev/null || missing="$$missing dcmtk"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	[ -z "$$missing" ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; }
	$(PY) -m pytest -m integration -p no:cacheprovider tests/integration

lint: $(STAMP)
	$(VENV)/bin/ruff check dicomops tasks flows tests benchmarks
	$(VENV)/bin/mypy dicomops

bench: $(STAMP)
	$(PY) benchmarks/synth.py
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/preprocess.py
	$(PY) benchmarks/train.py --work $(WORK)
	$(PY) benchmarks/inference.py
	$(PY) benchmarks/drift.py
	$(PY) benchmarks/pacs.py --quick
	$(PY) benchmarks/pacs_index.py --quick

clean:
	rm -rf $(WORK) .prefect mlflow/mlflow.db mlflow/artifacts
