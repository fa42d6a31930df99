# `make check` runs exactly what CI runs (after installing with pip install -e ".[test]").
.PHONY: check lint typecheck test format bench

check: lint typecheck test

lint:
	ruff check weightport tests benchmarks
	ruff format --check weightport tests benchmarks

typecheck:
	mypy

test:
	pytest

format:
	ruff format weightport tests benchmarks
	ruff check --fix weightport tests benchmarks

bench:
	python benchmarks/run.py
