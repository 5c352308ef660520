# make test   creates .venv if missing, installs reshuffle with its dev extras, runs lint + tests.
# make demo   the main job: a short experiment (see README).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint format demo bench clean

# The main job: 4 local ranks train the small CNN for 2 epochs with partial-0.1 shuffling, on
# Fashion-MNIST when its Debian package is installed and on synthetic data of the same shape otherwise.
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEMO_ARGS := train.epochs=2 dist.nproc=4 log.dir=runs
DEMO_SYNTHETIC := data.name=synthetic data.synthetic.num_samples=12000 data.synthetic.test_samples=2000

demo: install
	@if [ -e $(FMNIST) ]; then \
	  echo "== demo: Fashion-MNIST from $(dir $(FMNIST)), 4 local ranks, partial-0.1 shuffling =="; \
	  $(BIN)/reshuffle run configs/fashion-mnist.yaml name=demo $(DEMO_ARGS) --resume; \
	else \
	  echo "== demo: Fashion-MNIST not found (apt-get install dataset-fashion-mnist); using SYNTHETIC data =="; \
	  $(BIN)/reshuffle run configs/fashion-mnist.yaml name=demo-synthetic $(DEMO_ARGS) $(DEMO_SYNTHETIC) --resume; \
	fi

bench: install
	$(BIN)/python bench/plan.py
	$(BIN)/python bench/exchange.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/importance.py
	$(BIN)/python bench/virtual.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build src/*.egg-info
