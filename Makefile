# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	mkdir -p build/demo
	$(BIN)/axcnn compress examples/digits_cnn.onnx --data examples/digits_test.npz --scale 16 \
		-o build/demo/digits_cnn.shared.onnx --report build/demo/digits_cnn.report.json
	$(BIN)/axcnn inspect build/demo/digits_cnn.shared.onnx

lint: $(STAMP)
	$(BIN)/ruff check axcnn tests examples bench

test: lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf build .pytest_cache .ruff_cache
