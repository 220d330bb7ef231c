# The two commands a newcomer runs: `make demo` and `make test`. Both install what they need.
PYTHON ?= /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: deps venv demo demo-stop test test-unit lint bench deb

deps:
	./scripts/install-deps.sh

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,libvirt]' ruff
	touch $@

venv: $(VENV)/.installed

demo: deps venv
	./scripts/demo.sh

demo-stop:
	./scripts/demo.sh stop

test: deps venv
	$(PY) -m pytest -ra $(PYTEST_ARGS)

# Fast feedback while editing: no real components.
test-unit: venv
	$(PY) -m pytest -ra -m 'not integration' $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .

bench: deps venv
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

# kumo-agent and kumo-controller .debs into build/deb/.
deb:
	./scripts/deps/60-debbuild.sh
	./packaging/build-deb.sh
