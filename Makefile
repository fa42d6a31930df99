# `make check` runs exactly what CI runs (after `pip install -e ".[test]" && make peers`).
.PHONY: peers check lint typecheck test test-fast format bench
SRC := weightport tests $(wildcard benchmarks)

check: lint typecheck test

# litgpt 0.5 pins huggingface-hub<1.4, which transformers 5 cannot use: install it without its dependencies
# (the ones it imports, lightning and jsonargparse, come with the test extra)
peers:
	pip install --no-deps "litgpt>=0.5,<0.6"

lint:
	ruff check $(SRC)
	ruff format --check $(SRC)

typecheck:
	mypy

test:
	pytest

test-fast:  # the edit-test loop: every test but those marked slow (make check runs them all)
	pytest -m "not slow"

format:
	ruff format $(SRC)
	ruff check --fix $(SRC)

bench:
	python benchmarks/run.py
