# Two commands do all set-up on a fresh clone: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# the real data sets, when they sit beside the clone (as in CI here); tests skip real-data checks otherwise
export BLOODFL_DATA ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),data)

.PHONY: install demo test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# .[flower]: Flower for fl.backend=flower and its tests (tests/test_fl_flower.py skips, saying so, without it)
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev,flower]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python train.py dataset=synthetic model=simple_cnn loader.batch_size=16 trainer.max_epochs=8

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n auto --dist worksteal   # one worker per core (tests/conftest.py: one thread each)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf logs .cache .pytest_cache
