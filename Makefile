# Deja: the two commands are `make run` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DATA_DIR ?= data/demo
HOST ?= 127.0.0.1
PORT ?= 8000
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench demo clean system-deps screenshot

install: $(STAMP)

# Re-installs only when the project's metadata changed; torch first so nothing pulls a CUDA build.
# constraints.txt pins every dependency to the versions the suite last passed with.
$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev,ray]'
	touch $(STAMP)

run: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/deja demo --data-dir $(DATA_DIR) --if-empty
	@echo "admin key ($(DATA_DIR)/admin.key): $$(cat $(DATA_DIR)/admin.key)"
	HF_HUB_OFFLINE=1 $(VENV)/bin/deja serve --data-dir $(DATA_DIR) --host $(HOST) --port $(PORT)

# Debian's chromium and prometheus-alertmanager, for the browser and Alertmanager tests.
system-deps:
	sh scripts/system-deps.sh

test: install lint system-deps
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check kb embeddings novelty api handoff tests bench
	$(VENV)/bin/mypy

# Quality (LogHub + alert scenarios, 3 seeds, ~20 min), then speed (~20 min, wants a quiet machine).
bench: install
	HF_HUB_OFFLINE=1 $(PY) -m bench.quality --out bench/results --seeds 0 1 2
	HF_HUB_OFFLINE=1 $(PY) -m bench.perf --out bench/results

screenshot: install system-deps
	HF_HUB_OFFLINE=1 $(PY) -m bench.screenshot --out bench/results/dashboard.png

clean:
	rm -rf $(VENV) data/demo
