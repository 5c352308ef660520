# make test   creates .venv if missing, installs reshuffle with its dev extras, runs lint (ruff,
#             mypy on src/) + tests.
# make test-fast  lint + the tests not marked slow (no spawned ranks, no training runs): about
#                 90 s on 2 cores, for the edit-test loop; CI runs make test.
# make demo   the main job: a short experiment (see README).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint format demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix src tests bench examples
	$(BIN)/ruff format src tests bench examples

test: lint
	$(BIN)/python -m pytest

test-fast: lint
	$(BIN)/python -m pytest -m "not slow"

# The main job: a small compare. 4 local ranks train the small BatchNorm CNN for 2 epochs on
# label-sorted partitions (the adversarial case) under global, local and partial-0.1 shuffling,
# then print the summary table and the report path. Fashion-MNIST when its Debian package is
# installed, synthetic data of the same shape otherwise. Re-running skips finished runs.
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEMO := $(BIN)/reshuffle compare configs/fashion-mnist.yaml --strategies global local partial:0.1 \
	--nproc 4 shuffle.partition=label-sorted train.epochs=2 log.dir=runs
DEMO_SYNTHETIC := data.name=synthetic data.synthetic.num_samples=12000 data.synthetic.test_samples=2000

demo: install
	@if [ -e $(FMNIST) ]; then \
	  echo "== demo: Fashion-MNIST from $(dir $(FMNIST)): global vs local vs partial-0.1, 4 ranks =="; \
	  $(DEMO) name=demo; \
	else \
	  echo "== demo: Fashion-MNIST not found (apt-get install dataset-fashion-mnist); using SYNTHETIC data =="; \
	  $(DEMO) name=demo-synthetic $(DEMO_SYNTHETIC); \
	fi

bench: install
	$(BIN)/python bench/plan.py
	$(BIN)/python bench/sampler.py
	$(BIN)/python bench/exchange.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/importance.py
	$(BIN)/python bench/virtual.py
	$(BIN)/python bench/reference.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build src/*.egg-info
