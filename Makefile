# Set-up and entry points. `make test` works from a fresh clone: it creates .venv,
# installs curvlab with the test, dev, laplace (whose integration is tested), ablate
# (the research harness) and rl (the ACKTR tutorial's CartPole) extras at the versions of
# constraints.txt (torch 2.13.0 CPU wheel, BackPACK 1.7.1, ...: pyproject.toml states
# ranges, the constraints pin the tested set) and runs pytest.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/pip install --quiet -c constraints.txt

.PHONY: install demo figures test test-slow lint bench docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e ".[test,dev,laplace,ablate,rl]"
	# kronfluence (the influence parity tests) and pytorch-optimizer (the race's Muon cell, the
	# ablation's third-party optimizer cell) without their dependencies, so torch stays put
	$(PIP) --no-deps kronfluence accelerate safetensors pyyaml psutil pytorch_optimizer
	touch $(STAMP)

install: $(STAMP)

# the main job: `curvlab ablate` on the embedded digits with the autoencoder, the task where
# the approximations differ most (a few minutes on 2 cores)
DEMO := --model autoencoder
demo: $(STAMP)
	$(BIN)/curvlab ablate $(DEMO) --out runs/ablate

# regenerate the README's figure and tables (docs/_static/ablate) from a fresh run
figures: $(STAMP)
	$(BIN)/curvlab ablate $(DEMO) --out docs/_static/ablate --readme README.md --no-progress

test: $(STAMP)
	$(BIN)/python -m pytest -q

# the cells marked slow (spawned processes, the longest tutorials), which `make test` skips
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check curvlab tests benchmarks examples docs/conf.py
	$(BIN)/mypy curvlab

bench: $(STAMP)
	$(PIP) -e ".[bench]"
	$(BIN)/python -m benchmarks.kfac_extraction
	$(BIN)/python -m benchmarks.training_step
	$(BIN)/python -m benchmarks.tridiagonal_cost
	$(BIN)/python -m benchmarks.distributed
	$(BIN)/python -m benchmarks.autoencoder_race
	$(BIN)/python -m benchmarks.optimizer_race --out runs/optimizer_race.json \
		--figure runs/optimizer_race.png

docs: $(STAMP)
	$(PIP) -e ".[docs]"
	$(BIN)/python -m sphinx -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf runs $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis docs/_build docs/auto_examples docs/generated
