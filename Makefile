# The two commands: `make demo` and `make test`. Both build their own virtual environment
# (.venv, pinned versions from pyproject.toml) on first use.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BACKENDS := tensorflow jax torch

.PHONY: venv demo test

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[all,dev]"
	touch $@

venv: $(VENV)/.installed

# The main job on its embedded default: ConvNeXt-Atto trained on scikit-learn's digits.
demo: venv
	KERAS_BACKEND=$${KERAS_BACKEND:-torch} TF_CPP_MIN_LOG_LEVEL=3 $(VENV)/bin/keras-convnext demo

# The whole suite, once per backend.
test: venv
	@set -e; for b in $(BACKENDS); do \
		echo "=== KERAS_BACKEND=$$b"; \
		KERAS_BACKEND=$$b $(VENV)/bin/python -m pytest -q -p no:cacheprovider tests; \
	done
