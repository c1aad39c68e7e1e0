#!/usr/bin/env bash
# Builds .venv-tink: a separate venv with Google's tink, for the interop tests.
# tink 1.16.1 needs protobuf>=5.29 and TFX 1.16 needs protobuf 3.20.x, so they
# cannot share .venv; the tests run a helper in this venv through a subprocess
# and fail (not skip) when it is missing. `make setup` runs this script.
#
#   scripts/setup_tink_env.sh          create/refresh .venv-tink (a fast no-op when up to date)
#   scripts/setup_tink_env.sh --check  exit 0 if .venv-tink is up to date, 1 if not
#
# Uses TINK_PYTHON if set, else python3 when it is 3.10 or newer (tink 1.16.1
# needs >= 3.10), else the Python 3.10 that setup_env.sh finds.

set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,11p' "${BASH_SOURCE[0]}"; exit 0 ;; esac
export TFXE_TAG=setup_tink_env
[[ -n "${TINK_PYTHON:-}" ]] && export SIDE_PYTHON=$TINK_PYTHON
exec bash "$(dirname "${BASH_SOURCE[0]}")/setup_side_env.sh" \
  .venv-tink constraints/tink.txt tink \
  'import tink
from tink import aead, streaming_aead
aead.register()
streaming_aead.register()' "$@"
