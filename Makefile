# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both build .venv themselves. torch is pinned here, not in pyproject.toml: on a CPU-only
# machine an unpinned torch pulls several GB of CUDA wheels, while GPU users keep their own.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: demo test install

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" -e ".[litgpt,dev]"
	@# litdata drags in PyPI's torchvision, which does not load beside a CPU build of torch
	@# (and breaks `import lightning` through torchmetrics); nothing here needs it.
	$(PY) -c "import torchvision" 2>/dev/null || $(PY) -m pip uninstall -y -q torchvision
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m lightning_lowprec.demo

test: install
	$(PY) -m pytest -q
