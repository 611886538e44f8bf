# The two commands: `make demo` and `make test`. Both create .venv and install the pinned stack on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
CACHE := $(CURDIR)/.cache

# Offline by design; caches stay inside the repository.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HOME := $(CACHE)/hf
export MPLCONFIGDIR := $(CACHE)/matplotlib
export TORCH_EXTENSIONS_DIR := $(CACHE)/torch_extensions
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-fast lint clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[deepspeed,data,test]'
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m mnemoguard.cli demo

lint: install
	$(PY) -m ruff check mnemoguard tests scripts

test: install lint
	$(PY) -m pytest -ra --durations=15

test-fast: install
	$(PY) -m pytest -ra -m "not slow"

clean:
	rm -rf outputs .pytest_cache
