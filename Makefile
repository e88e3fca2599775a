# Two commands for a newcomer: `make demo` and `make test`.  Both create or refresh .venv/ first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test test-unit test-integration lint venv clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# pip's cache (~/.cache/pip) keeps the large PyTorch wheel between fresh clones on one machine.
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/liquidstream demo --out demo-output

test: $(STAMP)
	$(PY) -m pytest -q

test-unit: $(STAMP)
	$(PY) -m pytest -q -m "not integration"

test-integration: $(STAMP)
	$(PY) -m pytest -q -m integration

lint: $(STAMP)
	$(VENV)/bin/ruff check operators pipeline liquidstream tests benchmarks
	$(VENV)/bin/mypy  # files = ["liquidstream"] in pyproject.toml: both packages under their installed names

clean:
	rm -rf demo-output .pytest_cache .mypy_cache .ruff_cache
