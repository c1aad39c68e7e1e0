#!/usr/bin/env bash
# Builds .venv-oms: a separate venv with OpenSSF model_signing, for the
# fingerprint interop test. model-signing 1.1.1 (via sigstore/tuf) needs
# urllib3 >= 2 while kfp 2.5 in the TFX venv needs urllib3 < 2, so they
# cannot share .venv (1.1.1 also imports OpenSSL without declaring it, so
# pyopenssl is installed beside it); the test calls its CLI through a subprocess and fails
# (not skips) when it is missing. `make setup` runs this script.
#
#   scripts/setup_oms_env.sh          create/refresh .venv-oms (a fast no-op when up to date)
#   scripts/setup_oms_env.sh --check  exit 0 if .venv-oms is up to date, 1 if not
#
# Uses OMS_PYTHON if set, else python3 when it is 3.10 or newer.

set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}"; exit 0 ;; esac
export TFXE_TAG=setup_oms_env
[[ -n "${OMS_PYTHON:-}" ]] && export SIDE_PYTHON=$OMS_PYTHON
exec bash "$(dirname "${BASH_SOURCE[0]}")/setup_side_env.sh" \
  .venv-oms constraints/oms.txt 'model-signing pyopenssl' \
  'import model_signing, OpenSSL; from model_signing import hashing' "$@"
