# Two entry points: `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is installed first and by exact version so no dependency can pull a newer (multi-GB) build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv install install-dev demo test lint image clean

$(VENV)/.installed: setup.cfg pyproject.toml sandbox/image/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -r sandbox/image/requirements.txt
	$(PIP) install -q -e ".[dev,api,ray,reference]"
	touch $@

venv install install-dev: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/etpo demo

test: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

image: $(VENV)/.installed
	$(VENV)/bin/etpo sandbox build --offline

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
