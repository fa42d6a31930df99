# `make check` runs exactly what CI runs (after installing with pip install -e ".[test]").
.PHONY: check lint typecheck test test-fast format bench
SRC := weightport tests $(wildcard benchmarks)

check: lint typecheck test

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
