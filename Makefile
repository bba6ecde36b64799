# The two commands: `make demo` and `make test` (`make test-all` adds the tests marked slow). All build
# their own virtual environment (.venv, pinned versions from pyproject.toml) on first use.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BACKENDS := tensorflow jax torch

.PHONY: venv demo test test-all

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[all,dev]"
	touch $@

venv: $(VENV)/.installed

# The main job on its embedded default: ConvNeXt-Atto trained on scikit-learn's digits.
demo: venv
	KERAS_BACKEND=$${KERAS_BACKEND:-torch} TF_CPP_MIN_LOG_LEVEL=3 $(VENV)/bin/keras-convnext demo

# The suite without the tests marked slow (what CI runs), once per backend, the three backends side by side: most of a test's time is
# single-threaded (tracing, XLA compiles, Python), so even on 2 cores this is much faster than in turn
# (docs/testing.md has the figures).
# Each backend's log is printed whole when all are done, ending in its 20 slowest tests (the list
# tests/conftest.py marks slow is checked against them); `make test BACKENDS=torch` runs one.
TESTS ?= tests
PYTEST_ARGS ?=
MARKS ?= -m "not slow"
# JAX's run, the longest (XLA compiling each test's models, one core at a time), is split between
# JAX_WORKERS pytest-xdist processes, whole files to a worker; the shared compilation cache and XLA flags
# are set by tests/conftest.py in the parent before the workers start. JAX_WORKERS=1 runs it in one process.
JAX_WORKERS ?= 2
test: venv
	@mkdir -p .test-logs; \
	for b in $(BACKENDS); do \
		echo "=== KERAS_BACKEND=$$b started $$(date +%T)"; \
		shards=""; [ $$b = jax ] && [ $(JAX_WORKERS) -gt 1 ] && shards="-n $(JAX_WORKERS) --dist loadfile"; \
		( KERAS_BACKEND=$$b $(VENV)/bin/python -m pytest -q -p no:cacheprovider --durations=20 $$shards $(MARKS) $(PYTEST_ARGS) $(TESTS) > .test-logs/$$b.log 2>&1; \
		  echo $$? > .test-logs/$$b.rc; echo "=== KERAS_BACKEND=$$b finished $$(date +%T)" ) & \
	done; \
	wait; status=0; \
	for b in $(BACKENDS); do \
		echo "=== KERAS_BACKEND=$$b"; cat .test-logs/$$b.log; \
		[ "$$(cat .test-logs/$$b.rc)" = 0 ] || { echo "=== KERAS_BACKEND=$$b FAILED"; status=1; }; \
	done; \
	exit $$status

# The whole suite: also the tests marked slow (tests/conftest.py: the digits training runs, the full-size
# builds, the multi-process kill tests).
test-all:
	@$(MAKE) --no-print-directory test MARKS=
