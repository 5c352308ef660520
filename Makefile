# make test   creates .venv if missing, installs reshuffle with its dev extras, runs lint + tests.
# make demo   the main job: a short experiment (see README).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint format demo bench clean

# Real labels when the Debian package is installed, scikit-learn's bundled digits otherwise.
DEMO_DATA := $(if $(wildcard /usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz),fashion-mnist,digits)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: install
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

test: lint
	$(BIN)/python -m pytest

demo: install
	@echo "== labels from $(DEMO_DATA), label-sorted partitions over 8 ranks =="
	@for spec in "global" "local" "partial --fraction 0.1" "partial --fraction 0.01"; do \
	  echo; $(BIN)/reshuffle plan --labels-from $(DEMO_DATA) --world-size 8 --partition label-sorted \
	    --epochs 4 --strategy $$spec || exit 1; \
	done

bench: install
	$(BIN)/python bench/plan.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build src/*.egg-info
