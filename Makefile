# The README's two commands are `make demo` and `make test`; both first
# check the Debian packages they need (installing missing ones as root), then
# set up the environment (each a fast no-op when nothing changed).

SHELL := /bin/bash
VENV_PY := .venv/bin/python
# Extra arguments for pytest, e.g. make test PYTEST_ARGS='-k packaging -x'
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean system-packages-test system-packages-demo system-packages-bench

# Debian packages a target needs (scripts/ensure_system_packages.sh lists
# them): installs missing ones as root, else prints the apt-get command and
# fails before anything else runs.
system-packages-test system-packages-demo system-packages-bench:
	bash scripts/ensure_system_packages.sh $(@:system-packages-%=%)

# .venv (Python 3.10, TFX 1.16, every extra, pinned by constraints/) and
# .venv-tink and .venv-oms (tink and OpenSSF model_signing for the interop
# tests). PYTHON=/path/to/python3.10 overrides
# the search for Python 3.10.
setup:
	bash scripts/setup_env.sh
	bash scripts/setup_tink_env.sh
	bash scripts/setup_oms_env.sh

demo: system-packages-demo setup
	$(VENV_PY) -m pipelines.local_pipeline --workdir demo-out

# The whole suite, slow and integration tests included. TFXE_NO_SKIP=1 makes
# any skipped test fail the run (see tests/conftest.py).
test: system-packages-test setup
	TFXE_NO_SKIP=1 $(VENV_PY) -m pytest $(PYTEST_ARGS)

bench: system-packages-bench setup
	$(VENV_PY) benchmarks/run.py

clean:
	rm -rf .venv .venv-tink .venv-oms build dist .pytest_cache .hypothesis demo-out bench-out
	rm -rf *.egg-info
	find . -path ./.git -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
