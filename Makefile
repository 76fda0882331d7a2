# Fresh machine: `make demo` (the main job) and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo demo-depth demo-bev demo-all test test-slow test-devkit test-all bench-camvid clean-venv

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first, on its own, pinned: a CPU build here; never let a later step replace it.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[all,app]"
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

# the default suite: lint, the architecture contract, every test not marked `slow`
# (729 tests, about 5 min on 2 CPU cores; README "Tests")
test: $(STAMP)
	$(PY) -m ruff check --quiet src tests
	$(VENV)/bin/lint-imports    # the architecture contract in pyproject.toml
	$(PY) -m pytest tests -m "not slow"

# the `slow` tests: short trainings that must learn, the demos, the wheel, torch.compile ...
test-slow: $(STAMP)
	$(PY) -m pytest tests -m slow

# The nuScenes devkit cross-check (tests/test_nuscenes_devkit.py). The devkit pins numpy < 2,
# so it gets its own venv: numpy 1.x, the devkit and its dependencies are installed there, and
# everything else (torch, densediff itself) is read from .venv through a .pth file, so torch is
# not installed twice. DENSEDIFF_REQUIRE_DEVKIT=1: a missing devkit fails instead of skipping.
DEVKIT_VENV  ?= .venv-devkit
DEVKIT_STAMP := $(DEVKIT_VENV)/.installed

$(DEVKIT_STAMP): $(STAMP)
	rm -rf $(DEVKIT_VENV)
	$(PYTHON) -m venv $(DEVKIT_VENV)
	echo "import site; site.addsitedir('$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')')" \
		> "$$($(DEVKIT_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/densediff_main_venv.pth"
	$(DEVKIT_VENV)/bin/python -m pip install -q "numpy<2" "nuscenes-devkit>=1.1"
	touch $(DEVKIT_STAMP)

test-devkit: $(DEVKIT_STAMP)
	DENSEDIFF_REQUIRE_DEVKIT=1 $(DEVKIT_VENV)/bin/python -m pytest tests/test_nuscenes_devkit.py

# everything CI runs (.ci/run)
test-all: test test-slow test-devkit

bench-camvid: $(STAMP)
	bash benchmarks/camvid_baseline.sh

clean-venv:
	rm -rf $(VENV) $(DEVKIT_VENV)
