.PHONY: install test test-all bench bench-peers lint

install:
	bash scripts/install.sh

test:
	bash scripts/test.sh

test-all:
	bash scripts/test.sh -m ""

bench:
	bash scripts/bench.sh

# the peer comparison of docs/benchmarks.md: run, print its tables, redraw the plots
bench-peers: install
	python3 benchmarks/bench_peers.py --threads 1
	python3 benchmarks/bench_peers.py --report
	python3 benchmarks/plot.py

lint:
	ruff check varkernels tests benchmarks examples
