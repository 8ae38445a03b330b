# Two commands do all the set-up: `make demo` and `make test` (both create or reuse .venv).
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/demo.yaml

.PHONY: setup demo test bench clean

setup:
	@bash tools/bootstrap.sh $(VENV)

demo: setup
	$(VENV)/bin/sharded-mde run $(CONFIG)

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf runs data/demo .pytest_cache
