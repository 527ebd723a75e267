.PHONY: install test test-all bench bench-save plot bench-peers lint

PY ?= python3

install:
	bash scripts/install.sh

test:
	bash scripts/test.sh

test-all:
	bash scripts/test.sh -m ""

# the main job; its rows go to the git-ignored benchmarks/results/local/
bench:
	bash scripts/bench.sh

# the main job, appending to the committed benchmarks/results/var_loss.csv and redrawing var_loss.png
bench-save:
	bash scripts/bench.sh --save

# every plot of benchmarks/results/ from the committed CSVs
plot:
	$(PY) benchmarks/plot.py

# the peer comparison of docs/benchmarks.md: run, print its tables, redraw the plots
bench-peers: install
	$(PY) benchmarks/bench_peers.py --threads 1
	$(PY) benchmarks/bench_peers.py --report
	$(PY) benchmarks/plot.py

lint:
	ruff check varkernels tests benchmarks examples
