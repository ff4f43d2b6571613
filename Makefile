# IRIS DRS — the two commands: `make demo` and `make test`. Both bootstrap .venv themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.stamp-install
PYTEST_ARGS ?=

.PHONY: venv build test demo serve stop bench lint clean

# (Re)install when the project's metadata or the Cython sources change.
$(STAMP): pyproject.toml setup.py readout_cy/*.pyx
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip setuptools wheel "Cython>=3.0" "numpy>=1.26"
	$(PIP) install -q --no-build-isolation -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

build: $(STAMP)
	$(PIP) install -q --no-build-isolation -e . --no-deps

test: $(STAMP) build
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

demo: $(STAMP) build
	$(PY) -m iris_tasks.demo run

serve: $(STAMP) build
	$(PY) -m iris_tasks.demo serve

stop:
	$(PY) -m iris_tasks.demo stop

bench: $(STAMP) build
	$(PY) bench/run_all.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf build *.egg-info readout_cy/*.c readout_cy/*.so var
