# The two commands a newcomer runs: `make demo` and `make test`. Both install what they need.
PYTHON ?= /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
# The same suite on Debian 12's python3-* packages (what the .debs run on), test tools
# included: only kumo itself is pip-installed, without dependencies.
DEBVENV := .venv-debian
DEBPY := $(DEBVENV)/bin/python

.PHONY: deps venv venv-debian demo demo-stop test test-pypi test-debian test-unit lint bench deb image

deps:
	./scripts/install-deps.sh

# wheel: the tests pip-install tests/example_plugin with the venv's own setuptools (no
# download), and Debian's setuptools 66 builds a wheel only with it; the Debian venv has
# Debian's python3-wheel.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,libvirt,postgresql]' ruff wheel
	touch $@

venv: $(VENV)/.installed

$(DEBVENV)/.installed: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(DEBVENV)
	$(DEBPY) -m pip install --quiet --no-deps -e .
	$(DEBPY) -c 'import aiohttp; assert aiohttp.__file__.startswith("/usr/lib/python3/"), aiohttp.__file__'
	touch $@

venv-debian: $(DEBVENV)/.installed

demo: deps venv
	./scripts/demo.sh

demo-stop:
	./scripts/demo.sh stop

# The slowest tests are listed at the end of each leg: CI's whole run must stay under 45 minutes.
DURATIONS := --durations=15

test: deps
	$(MAKE) test-pypi test-debian

test-pypi: venv
	$(PY) -m pytest -ra $(DURATIONS) $(PYTEST_ARGS)

# The controllers of this leg keep their state in PostgreSQL: the whole suite runs on both
# stores, but for the tests marked one_leg (pyproject.toml says why they may run once).
test-debian: venv-debian
	KUMO_TEST_DATABASE=postgresql $(DEBPY) -m pytest -ra $(DURATIONS) -m 'not one_leg' $(PYTEST_ARGS)

# Fast feedback while editing: no real components.
test-unit: venv
	$(PY) -m pytest -ra -m 'not integration' $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .

bench: deps venv
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

# Kumo's Debian 12 image with cloud-init (rootfs tarball and disk), cached by recipe.
image: deps
	./scripts/build-image.sh

# kumo-agent and kumo-controller .debs into build/deb/.
deb:
	./scripts/deps/60-debbuild.sh
	./packaging/build-deb.sh
