# Two entry points for a newcomer (see README):  make demo   /   make test
# Both create .venv on first use with the CPU build of torch (torch==2.13.0 is on local disk here;
# any other torch spec would pull a multi-GB CUDA build) and the exact versions CI tests with.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-seeds test test-compat test-slow test-gpu bench clean-venv

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dqo-megatron demo

demo-seeds: $(STAMP)  # the README's table: one demo per seed, mean +- std in runs/demo-seeds/seeds.md (~20 min)
	$(VENV)/bin/dqo-megatron demo --seeds 0,1,2 --run-dir runs/demo-seeds

test: $(STAMP)
	$(PY) -m pytest -q

# The second CI leg (issue #20): Python 3.12 + megatron-core 0.19.2 in an environment OUTSIDE the clone, built once
# per machine and constraints-py312.txt (tools/compat_env.sh: ~2 min, ~1.4 GB downloaded, ~5.4 GB), then the tests
# named in tests/compat-leg.args (comments stripped) with this clone on PYTHONPATH (142 tests, ~8-10 min on 2 cores).
# The default .venv (0.16.1) is the other release of the cross-version checkpoint tests.
test-compat: $(STAMP)
	@env=$$(tools/compat_env.sh) && args=$$(mktemp) && trap 'rm -f "$$args"' EXIT && \
	sed -E -e 's/[[:space:]]*#.*$$//' -e '/^$$/d' tests/compat-leg.args > "$$args" && \
	echo "test-compat: $$env/bin/python -m pytest @tests/compat-leg.args" && \
	DQO_OTHER_MEGATRON_PYTHON=$(abspath $(PY)) PYTHONPATH=$(CURDIR) "$$env/bin/python" -m pytest -q @"$$args"

test-slow: $(STAMP)  # the quick demo under --tp 2; the documented pipeline for three families (tests/pipeline)
	$(PY) -m pytest -q -m slow || [ $$? -eq 5 ]  # 5: no test carries the marker yet

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu || [ $$? -eq 5 ]

bench: $(STAMP)
	$(PY) benchmarks/layout_step_time.py

clean-venv:
	rm -rf $(VENV)
