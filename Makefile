# `make check` runs exactly what CI runs (after installing with pip install -e ".[test]").
.PHONY: check lint typecheck test format bench
SRC := weightport tests $(wildcard benchmarks)

check: lint typecheck test

lint:
	ruff check $(SRC)
	ruff format --check $(SRC)

typecheck:
	mypy

test:
	pytest

format:
	ruff format $(SRC)
	ruff check --fix $(SRC)

bench:
	python benchmarks/run.py
