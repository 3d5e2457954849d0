# The two commands a newcomer needs: `make demo` and `make test`.
# Both install what is missing into the active Python environment (no new venv per clone).
PYTHON ?= python
PIP := $(PYTHON) -m pip
# This clone's code first, whatever the shared environment's editable install points at (another
# clone of the project, say): every command below imports $(CURDIR)/src.
export PYTHONPATH := $(CURDIR)/src$(if $(PYTHONPATH),:$(PYTHONPATH))
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true
export PYTHONWARNINGS ?= ignore::DeprecationWarning

.PHONY: install install-test demo train explain test test-slow lint bench where FORCE

# pip is pinned to the torch/torchvision pair that installs from local disk here; the stamp files
# make a second `make` instant, unless the editable install points at another clone (then the
# install step runs again and points it here).
HERE := $(shell $(PYTHON) scripts/ensure_deps.py --points-here >/dev/null 2>&1 && echo yes)
install: .stamps/install
.stamps/install: pyproject.toml $(if $(HERE),,FORCE)
	@mkdir -p .stamps
	@$(PYTHON) scripts/ensure_deps.py
	@touch $@
FORCE:

# Which attncam the commands import (this clone's src/attncam).
where:
	@$(PYTHON) -c "import attncam; print(attncam.__file__)"

install-test: .stamps/install-test
.stamps/install-test: pyproject.toml .stamps/install
	@$(PYTHON) scripts/ensure_deps.py --test
	@touch $@

# The main job on the built-in data: fine-tune, then explain the best checkpoint. Each demo writes
# to its own folder outputs/demo/<time>/{train,explain}.
DEMO_DIR ?= outputs/demo/$(shell date +%Y-%m-%d_%H-%M-%S)
demo: install
	$(PYTHON) train.py experiment=demo hydra.run.dir=$(DEMO_DIR)/train
	$(PYTHON) explain.py experiment=demo_explain ckpt=$(DEMO_DIR)/train/checkpoints/best.ckpt \
		hydra.run.dir=$(DEMO_DIR)/explain
	@echo "demo written to $(DEMO_DIR): train/results.json, explain/metrics.md, explain/figures/"

test: install-test
	$(PYTHON) -m pytest -q -p no:cacheprovider

test-slow: install-test
	$(PYTHON) -m pytest -q -m slow

# Explanation, metrics and training benchmarks, side by side in one run -> benchmarks/RESULTS.md.
bench: install-test
	$(PYTHON) scripts/bench_all.py

lint: install-test
	$(PYTHON) -m ruff check src tests scripts
	$(PYTHON) -m ruff format --check src tests scripts
