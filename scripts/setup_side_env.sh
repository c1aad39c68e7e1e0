#!/usr/bin/env bash
# Builds a separate "side" venv for an interop test whose reference
# implementation cannot share .venv with TFX 1.16 (protobuf 3.20, urllib3 < 2):
#
#   scripts/setup_side_env.sh VENV CONSTRAINTS "PACKAGE [MORE ...]" CHECK [--check]
#
# VENV is created with SIDE_PYTHON if set, else python3 when it is 3.10 or
# newer, else the Python 3.10 that setup_env.sh finds; the packages are
# installed with -c CONSTRAINTS; CHECK is Python code that must run in it. A fast no-op
# when the venv's stamp matches. setup_tink_env.sh and setup_oms_env.sh are
# the callers; `make setup` runs them.

set -euo pipefail

TFXE_TAG=${TFXE_TAG:-setup_side_env}
# shellcheck source=scripts/setup_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"

SIDE_CHECK='sys.version_info[:2] >= (3, 10)'

side_find_python() {
  if [[ -n "${SIDE_PYTHON:-}" ]]; then
    if tfxe_runs "$SIDE_PYTHON" "$SIDE_CHECK"; then
      echo "$SIDE_PYTHON"
      return 0
    fi
    tfxe_log "SIDE_PYTHON=$SIDE_PYTHON does not run as Python >= 3.10"
    return 1
  fi
  local py
  if py=$(command -v python3) && tfxe_runs "$py" "$SIDE_CHECK"; then
    echo "$py"
    return 0
  fi
  tfxe_find_python310
}

side_main() {
  if (($# < 4)); then
    tfxe_log "usage: $0 VENV CONSTRAINTS PACKAGE CHECK [--check]"
    return 2
  fi
  local venv=$1 constraints=$2 package=$3 check=$4 mode=install
  case "${5:-}" in
    '') ;;
    --check) mode=check ;;
    *) tfxe_log "unknown argument: $5"; return 2 ;;
  esac

  cd "$TFXE_ROOT"
  local stamp="$venv/.tfxe-stamp" fp base

  if ! tfxe_venv_ok "$venv" "$SIDE_CHECK" "${SIDE_PYTHON:-}"; then
    if [[ $mode == check ]]; then
      tfxe_log "$venv is missing, broken, or not made from \$SIDE_PYTHON"
      return 1
    fi
    base=$(side_find_python)
    tfxe_make_venv "$venv" "$base"
  fi

  fp=$(tfxe_fingerprint "$venv" "$package" "$constraints")
  if tfxe_stamp_matches "$stamp" "$fp"; then
    tfxe_log "$venv is up to date (Python $(tfxe_version_of "$venv/bin/python"), $constraints); nothing to do"
    return 0
  fi
  if [[ $mode == check ]]; then
    tfxe_log "$venv is out of date: $constraints or Python changed since the last install"
    return 1
  fi

  rm -f "$stamp"
  tfxe_log "installing $package into $venv with -c $constraints"
  tfxe_pip "$venv" install -q --progress-bar off -c "$constraints" pip
  # shellcheck disable=SC2086  # a space-separated package list
  tfxe_pip "$venv" install -q --progress-bar off -c "$constraints" $package
  tfxe_pip "$venv" check
  "$venv/bin/python" -c "$check"
  echo "$fp" > "$stamp"
  tfxe_log "done in ${SECONDS}s: $venv (${package%% *} $("$venv/bin/python" -c "import importlib.metadata as m; print(m.version('${package%% *}'))"))"
}

side_main "$@"
