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

TFXE_TAG=setup_tink_env
# shellcheck source=scripts/setup_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"

TINK_CHECK='sys.version_info[:2] >= (3, 10)'

tink_find_python() {
  if [[ -n "${TINK_PYTHON:-}" ]]; then
    if tfxe_runs "$TINK_PYTHON" "$TINK_CHECK"; then
      echo "$TINK_PYTHON"
      return 0
    fi
    tfxe_log "TINK_PYTHON=$TINK_PYTHON does not run as Python >= 3.10"
    return 1
  fi
  local py
  if py=$(command -v python3) && tfxe_runs "$py" "$TINK_CHECK"; then
    echo "$py"
    return 0
  fi
  tfxe_find_python310
}

tink_main() {
  local mode=install
  case "${1:-}" in
    '') ;;
    --check) mode=check ;;
    -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}"; return 0 ;;
    *) tfxe_log "unknown argument: $1 (try --help)"; return 2 ;;
  esac

  cd "$TFXE_ROOT"
  local venv=.venv-tink constraints=constraints/tink.txt
  local stamp="$venv/.tfxe-stamp" fp base

  if ! tfxe_venv_ok "$venv" "$TINK_CHECK" "${TINK_PYTHON:-}"; then
    if [[ $mode == check ]]; then
      tfxe_log "$venv is missing, broken, or not made from \$TINK_PYTHON"
      return 1
    fi
    base=$(tink_find_python)
    tfxe_make_venv "$venv" "$base"
  fi

  fp=$(tfxe_fingerprint "$venv" "tink" "$constraints")
  if tfxe_stamp_matches "$stamp" "$fp"; then
    tfxe_log "$venv is up to date (Python $(tfxe_version_of "$venv/bin/python"), $constraints); nothing to do"
    return 0
  fi
  if [[ $mode == check ]]; then
    tfxe_log "$venv is out of date: $constraints or Python changed since the last install"
    return 1
  fi

  rm -f "$stamp"
  tfxe_log "installing tink into $venv with -c $constraints"
  tfxe_pip "$venv" install -q --progress-bar off -c "$constraints" pip
  tfxe_pip "$venv" install -q --progress-bar off -c "$constraints" tink
  tfxe_pip "$venv" check
  "$venv/bin/python" -c 'import tink
from tink import aead, streaming_aead
aead.register()
streaming_aead.register()'
  echo "$fp" > "$stamp"
  tfxe_log "done in ${SECONDS}s: $venv (tink $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("tink"))'))"
}

tink_main "$@"
