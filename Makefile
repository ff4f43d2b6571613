# IRIS DRS — the two commands: `make demo` and `make test`. Both bootstrap .venv themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.stamp-install
PYTEST_ARGS ?=

.PHONY: venv build browser test demo serve stop cluster cluster-stop bench bench-latency lint clean

# (Re)install when the project's metadata, the pins or the Cython sources change.
# constraints.txt pins the versions the suite was last run with: without it pip's resolver can
# backtrack into ancient provider releases that no longer build.
$(STAMP): pyproject.toml setup.py constraints.txt readout_cy/*.pyx readout_cy/src/*
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip setuptools wheel
	$(PIP) install -q -c constraints.txt Cython numpy
	$(PIP) install -q -c constraints.txt --no-build-isolation -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

build: $(STAMP)
	$(PIP) install -q --no-build-isolation -e . --no-deps

# The browser test needs Debian's chromium; install it when we can (root + apt), else it skips.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
	      || echo "chromium could not be installed: the browser test will skip"; \
	  else echo "chromium not installed (needs root + apt): the browser test will skip"; fi; }

test: $(STAMP) build browser
	$(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

demo: $(STAMP) build
	$(PY) -m iris_devstack.demo run

serve: $(STAMP) build
	$(PY) -m iris_devstack.demo serve

stop:
	$(PY) -m iris_devstack.demo stop

cluster: $(STAMP) build
	$(PY) -m iris_devstack cluster start --pin

cluster-stop:
	$(PY) -m iris_devstack cluster stop

# Figures are ratios measured within one run; see the README's benchmark table.
bench: $(STAMP) build
	$(PY) bench/bench_readout.py
	$(PY) bench/bench_masters.py
	$(PY) bench/bench_ifs.py
	$(PY) bench/bench_steps.py

bench-latency: $(STAMP) build
	$(PY) bench/bench_latency.py --frames 20 --size 4096

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf build *.egg-info readout_cy/*.c readout_cy/*.so var
