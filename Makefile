# One command per chore; the README and CI use these same targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.8
# The stamp changes with pyproject.toml, so a second `make test` reuses the environment
# (torch included) and an edited dependency list reinstalls.
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)

.PHONY: demo test test-fast lint format bench chaos crds tools images venv clean

venv: $(STAMP)
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	$(VENV)/bin/uv pip install --python $(PY) -e '.[operator,trainer,dev]'
	@rm -f $(VENV)/.installed-*; touch $@

tools: venv  ## Debian packages (containerd, runc, buildah, ...; as root) and the test-bed binaries
	$(PY) -m testbed.tools

images: venv  ## collabtrain's images (by buildah) loaded into the real nodes' node image
	$(PY) -m testbed.nodes

# Tools (Go builds) and images (downloads, buildah) are prepared side by side: on a cold
# machine each waits on the network or one core much of the time.
test: venv  ## everything: unit, integration (real processes) and e2e tests on real nodes
	$(MAKE) -j2 tools images
	$(PY) -m pytest

test-fast: venv  ## unit tests only
	$(PY) -m pytest -m "not integration and not e2e"

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy operator/collabtrain_operator trainer-image/collabtrain_trainer testbed

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

crds: venv  ## regenerate crds/ and the chart's CRD from the pydantic models
	$(PY) -m collabtrain_operator.crdgen

demo: venv  ## the local demo: real nodes running our images, MinIO, the operator by helm
	$(MAKE) -j2 tools images
	$(PY) -m testbed.demo

bench: venv tools  ## every benchmark; tables on stdout, JSON and plots in bench/results/
	$(PY) -m bench.run_all

chaos: venv  ## seeded chaos soak on real nodes: 20 min fault-free, 20 min of faults, invariants
	$(MAKE) -j2 tools images
	$(PY) -m bench.chaos_soak $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
