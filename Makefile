# Developer tasks for augplug.

PY ?= python3.11
# Fall back to python3 when the requested interpreter is not on PATH.
PYTHON := $(shell command -v $(PY) 2>/dev/null || command -v python3 2>/dev/null)
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: venv demo test docs datasets bench-overhead bench-quality clean distclean

venv: $(STAMP)

$(STAMP): requirements-dev.txt setup.cfg
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -r requirements-dev.txt
	@touch $(STAMP)

demo: venv
	$(VPY) -m augplug demo

test: venv
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mkdocs build --strict --quiet
	NO_ALBUMENTATIONS_UPDATE=1 $(VPY) -m pytest -q -p no:cacheprovider tests

# The documentation site (docs/, API reference from the docstrings) into site/; warnings are errors.
docs: venv
	$(VENV)/bin/mkdocs build --strict

datasets:
	bash benchmarks/get_datasets.sh

bench-overhead: venv
	$(VPY) -m benchmarks.overhead

bench-quality: venv
	$(VPY) -m benchmarks.quality

clean:
	rm -rf build dist *.egg-info .pytest_cache augplug_demo_out site
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

# Also removes the virtual environment and downloaded benchmark data.
distclean: clean
	rm -rf $(VENV) benchmarks/data
