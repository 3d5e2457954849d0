# The two commands a newcomer needs: `make demo` and `make test`.
# Both install what is missing into the active Python environment (no new venv per clone).
PYTHON ?= python
PIP := $(PYTHON) -m pip
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true
export PYTHONWARNINGS ?= ignore::DeprecationWarning

.PHONY: install install-test demo train explain test test-slow lint bench

# pip is pinned to the torch/torchvision pair that installs from local disk here; the stamp files
# make a second `make` instant.
install: .stamps/install
.stamps/install: pyproject.toml
	@mkdir -p .stamps
	@$(PYTHON) scripts/ensure_deps.py
	@touch $@

install-test: .stamps/install-test
.stamps/install-test: pyproject.toml .stamps/install
	@$(PYTHON) scripts/ensure_deps.py --test
	@touch $@

demo: install
	$(PYTHON) train.py experiment=demo

test: install-test
	$(PYTHON) -m pytest -q -p no:cacheprovider

test-slow: install-test
	$(PYTHON) -m pytest -q -m slow

lint: install-test
	$(PYTHON) -m ruff check src tests scripts
	$(PYTHON) -m ruff format --check src tests scripts
