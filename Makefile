.PHONY: install test test-all bench lint

install:
	bash scripts/install.sh

test:
	bash scripts/test.sh

test-all:
	bash scripts/test.sh -m ""

bench:
	bash scripts/bench.sh

lint:
	ruff check varkernels tests benchmarks examples
