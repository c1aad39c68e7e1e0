#!/usr/bin/env bash
# Builds .venv-mut: a separate venv with mutmut 2.x, for `make mutate`
# (docs/TESTING.md). mutmut only rewrites source files and runs the tests as
# a shell command (with .venv's pytest), so it stays out of .venv, which must
# match constraints/tfx-1.16-py310.txt exactly. Not part of `make setup`:
# `make mutate` runs it on demand.
#
#   scripts/setup_mut_env.sh          create/refresh .venv-mut (a fast no-op when up to date)
#   scripts/setup_mut_env.sh --check  exit 0 if .venv-mut is up to date, 1 if not
#
# Uses MUT_PYTHON if set, else python3 when it is 3.10 or newer, else the
# Python 3.10 that setup_env.sh finds.

set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}"; exit 0 ;; esac
export TFXE_TAG=setup_mut_env
[[ -n "${MUT_PYTHON:-}" ]] && export SIDE_PYTHON=$MUT_PYTHON
exec bash "$(dirname "${BASH_SOURCE[0]}")/setup_side_env.sh" \
  .venv-mut constraints/mutmut.txt mutmut \
  'import mutmut, mutmut.cache, parso, pony' "$@"
