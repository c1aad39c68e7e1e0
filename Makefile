# The README's two commands are `make demo` and `make test`; both first
# check the Debian packages they need (installing missing ones as root), then
# set up the environment (each a fast no-op when nothing changed).

SHELL := /bin/bash
VENV_PY := .venv/bin/python
# Extra arguments for pytest, e.g. make test PYTEST_ARGS='-k packaging -x'
PYTEST_ARGS ?=

.PHONY: setup demo test bench dist mutate clean system-packages-test system-packages-demo system-packages-bench

# Debian packages a target needs (scripts/ensure_system_packages.sh lists
# them): installs missing ones as root, else prints the apt-get command and
# fails before anything else runs.
system-packages-test system-packages-demo system-packages-bench:
	bash scripts/ensure_system_packages.sh $(@:system-packages-%=%)

# .venv (Python 3.10, TFX 1.16, every extra, pinned by constraints/) and
# .venv-tink and .venv-oms (tink and OpenSSF model_signing for the interop
# tests), .venv-release (build, twine, kubernetes-validate, hadolint for the
# release and image checks). PYTHON=/path/to/python3.10 overrides
# the search for Python 3.10.
setup:
	bash scripts/setup_env.sh
	bash scripts/setup_tink_env.sh
	bash scripts/setup_oms_env.sh
	bash scripts/setup_release_env.sh

demo: system-packages-demo setup
	$(VENV_PY) -m pipelines.local_pipeline --workdir demo-out

# The whole suite, slow and integration tests included. TFXE_NO_SKIP=1 makes
# any skipped test fail the run (see tests/conftest.py).
test: system-packages-test setup
	TFXE_NO_SKIP=1 $(VENV_PY) -m pytest $(PYTEST_ARGS)

# Every figure of docs/BENCHMARKS.md, each a ratio to a baseline measured in
# the same run (about 25 minutes on 2 idle cores; run it on a quiet machine):
# encrypt/decrypt vs cp -r and the alternatives (1 GiB), load_model vs plain
# TensorFlow, and the scale curve (64 MiB to 4 GiB, 1 vs 1,000 files), which
# also redraws docs/scale.png, and gs:// / s3:// on the emulators vs the SDKs.
bench: system-packages-bench setup
	$(VENV_PY) benchmarks/run.py
	$(VENV_PY) benchmarks/load_model.py
	$(VENV_PY) benchmarks/scale.py
	$(VENV_PY) benchmarks/object_store.py

# The release files: sdist and wheel in dist/, checked with twine check
# (scripts/build_dist.sh; the images: scripts/build_images.sh, needs Docker).
dist:
	bash scripts/build_dist.sh

# Mutation testing, on demand (not in CI, not part of `make test`): mutmut 2.x
# from its own venv (.venv-mut) mutates a scratch copy of the tree
# (build/mutate) and runs the fast core tests against each mutant, then
# prints the score per module and every surviving mutant. Scopes: format
# (tfx_encrypt/format/), checks (the security checks of tfx_encrypt/package/),
# package (all of it), serving (tfx_encrypt/runtime/serving.py), or a file;
# e.g. make mutate MUTATE='checks serving'. Takes tens of minutes on two
# cores; see docs/TESTING.md.
MUTATE ?= format checks
mutate: system-packages-test
	bash scripts/setup_env.sh
	bash scripts/setup_mut_env.sh
	bash scripts/mutate.sh $(MUTATE)

clean:
	rm -rf .venv .venv-tink .venv-oms .venv-release .venv-mut build dist .pytest_cache .hypothesis demo-out bench-out
	rm -rf *.egg-info
	find . -path ./.git -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
