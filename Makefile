# Everything a fresh machine needs: `make test` builds the venv, provisions the ComfyUI host
# and runs the linter and the tests. A second run only checks stamps.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEV_STAMP := $(VENV)/.dev-requirements-installed
HOST_STAMP := .comfyui/.provisioned-0.3.75
PYTEST_ARGS ?=
# pytest-xdist workers: the suite runs in two processes (a 2-core machine: ~27 min alone, see README "Run the tests").
# `make test PYTEST_WORKERS=0` runs it in one.
PYTEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder
DEMO_ARGS ?=
CHROMIUM := /usr/bin/chromium

.PHONY: test test-all lint host venv browser clean-host demo

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEV_STAMP): requirements-dev.txt requirements.txt | $(PY)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(DEV_STAMP)

host: $(DEV_STAMP)
	$(PY) scripts/provision_host.py

lint: $(DEV_STAMP)
	$(PY) -m ruff check .

# Debian's Chromium for the browser tests (Playwright drives it; it never downloads a browser).
$(CHROMIUM):
	@if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
		echo "The browser tests need Debian's Chromium at $(CHROMIUM): run 'sudo apt-get install chromium'."; \
		exit 1; fi
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium

browser: $(CHROMIUM) $(DEV_STAMP)

test: lint host browser
	$(PYTEST) $(PYTEST_ARGS)

# Also the slow tests: full-width Flux and full-size SDXL through ComfyUI's real loaders.
test-all: lint host browser
	$(PYTEST) --run-slow $(PYTEST_ARGS)

# A tiny LoRA training run in a live ComfyUI with this pack (README, "Demo"). ComfyUI keeps running
# until Ctrl+C; `make demo DEMO_ARGS=--exit` stops it when the run is done.
demo: host
	$(PY) scripts/demo.py $(DEMO_ARGS)

clean-host:
	rm -rf .comfyui
