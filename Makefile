# Fresh machine: `make demo` (the main job) and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo demo-depth demo-bev demo-all test bench-camvid clean-venv

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first, on its own, pinned: a CPU build here; never let a later step replace it.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

# the main job: segmentation DDP on generated scenes (about 4 min on 2 CPU cores)
demo: $(STAMP)
	$(PY) -m densediff.cli.main demo --out demo_out

# the other demos: depth (about 5 min), BEV maps (about 7 min), all three (about 16 min)
demo-depth: $(STAMP)
	$(PY) -m densediff.cli.main demo --task depth --out demo_out

demo-bev: $(STAMP)
	$(PY) -m densediff.cli.main demo --task bev --out demo_out

demo-all: $(STAMP)
	$(PY) -m densediff.cli.main demo --task all --out demo_out

test: $(STAMP)
	$(PY) -m ruff check --quiet src tests
	$(VENV)/bin/lint-imports    # the architecture contract in pyproject.toml
	$(PY) -m pytest tests

bench-camvid: $(STAMP)
	bash benchmarks/camvid_baseline.sh

clean-venv:
	rm -rf $(VENV)
