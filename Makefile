# Quick start: `make demo` (synthetic faces -> prepared data -> tiny ControlNet run in runs/demo)
# and `make test`. Both create .venv and install the project on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-browser lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/controlnet-emo demo

test: $(STAMP)
	$(BIN)/pytest -q

# The app in headless Chromium (Debian's browser, driven by Playwright; nothing downloaded at
# test time). Installs the browser with apt when it is missing.
test-browser: $(STAMP)
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)
	$(BIN)/pytest -q tests/test_app_browser.py

lint: $(STAMP)
	$(BIN)/ruff check controlnet_emo conditioners tests benchmarks *.py

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py --arch tiny
	$(BIN)/python benchmarks/conditioner_speed.py

clean:
	rm -rf runs/demo
