# The two set-up commands of the README: `make serve` and `make test`. Both create .venv first.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 50051
METRICS_PORT ?= 9464
# The Triton side of the Triton tests (a real tritonserver, numpy < 2): a venv of its own.
TRITON_VENV ?= .venv-triton

.PHONY: serve test test-quick lint install install-server clean triton-env chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Serving needs the server extra only (no torch, onnx or test tools).
$(BIN)/.installed-server: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[server]'
	touch $@

# Tests, lint, training and export: everything.
$(BIN)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@ $(BIN)/.installed-server

install-server: $(BIN)/.installed-server
install: $(BIN)/.installed-test

serve: $(BIN)/.installed-server
	$(BIN)/segserve serve --model-repository model_repository --port $(PORT) --metrics-port $(METRICS_PORT)

lint: $(BIN)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

$(TRITON_VENV)/.installed: tools/triton/requirements.txt tools/triton/setup_env.sh
	bash tools/triton/setup_env.sh $(TRITON_VENV) $(PYTHON)

triton-env: $(TRITON_VENV)/.installed

# Without the Triton venv (no registry, say) the Triton tests skip and name the reason, which
# setup_env.sh leaves in $(TRITON_VENV).error; everything else still runs.
# Every tier (quick, slow, triton); plain `pytest` or `make test-quick` runs the quick one.
test: lint
	@$(MAKE) --no-print-directory triton-env || echo "Triton venv not created (see $(TRITON_VENV).error): the Triton tests will skip"
	@$(MAKE) --no-print-directory chromium
	$(BIN)/python -m pytest -m ""

# The console's browser tests (tests/test_console.py) drive the system Chromium through Playwright;
# installed with apt-get where that is usable (root), else they skip and say why.
CHROMIUM ?= /usr/bin/chromium
chromium:
	@if [ -x "$(CHROMIUM)" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium with apt-get (for tests/test_console.py)"; \
		{ DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 \
		|| { apt-get update -q >/dev/null 2>&1 \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; }; } \
		|| echo "apt-get could not install chromium: the console's browser tests will skip"; \
	else \
		echo "no $(CHROMIUM) and no root apt-get to install it: the console's browser tests will skip"; \
	fi

test-quick: $(BIN)/.installed-test
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) $(TRITON_VENV) $(TRITON_VENV).error $(TRITON_VENV).pip.log *.egg-info .pytest_cache .mypy_cache .ruff_cache
