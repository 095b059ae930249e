# Quick start: `make demo` segments a case, `make test` runs the test suite.
# Both create .venv when it is missing and install the package with its test tools and the
# optional --prepare packages (deepbet: about 130 MB with pandas, a few seconds; torch stays the CPU build).
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch keeps the install small; override for a GPU build.
TORCH_SPEC ?= torch==2.13.0
SHARED ?= ../shared/data/brats_samples
DEMO_CASE := $(SHARED)/HunorLaczko_IPCV-TRDP_BraTS_2020/example/BraTS20_Training_001
OUT ?= out/demo

.PHONY: install demo test lint

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[train,dev,prepare]"
	touch $@

install: $(VENV)/.installed

demo: install
	@if [ -n "$(CASE)" ]; then case="$(CASE)"; \
	elif [ -d "$(DEMO_CASE)" ]; then case="$(DEMO_CASE)"; \
	else echo "No CASE given and $(SHARED) is absent: segmenting a synthetic phantom (shows the pipeline running, not the model's accuracy)."; \
	  $(PY) -m KANTumorSegLib.phantom out/phantom && case=out/phantom; fi; \
	$(VENV)/bin/kantumorseg segment "$$case" -o $(OUT) --overwrite

test: install
	$(PY) -m pytest -q Testing

lint: install
	$(VENV)/bin/ruff check .
