# Fresh machine: `make demo` (the main job) and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench-camvid clean-venv

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first, on its own, pinned: a CPU build here; never let a later step replace it.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m densediff.cli.main demo --out demo_out

test: $(STAMP)
	$(PY) -m ruff check --quiet src tests
	$(PY) -m pytest tests

bench-camvid: $(STAMP)
	bash benchmarks/camvid_baseline.sh

clean-venv:
	rm -rf $(VENV)
