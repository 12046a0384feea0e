# Quick start: `make demo` (synthetic faces -> prepared data -> tiny ControlNet run in runs/demo)
# and `make test`. Both create .venv and install the project on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/controlnet-emo demo

test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check controlnet_emo conditioners tests benchmarks *.py

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py --arch tiny
	$(BIN)/python benchmarks/conditioner_speed.py

clean:
	rm -rf runs/demo
