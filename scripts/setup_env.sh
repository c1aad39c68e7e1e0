#!/usr/bin/env bash
# Builds .venv: Python 3.10 with tfx-encrypt installed editable, with every
# extra, from the tested constraints file. `make setup` runs it.
#
#   scripts/setup_env.sh                 create/refresh .venv (a fast no-op when up to date)
#   scripts/setup_env.sh --check         exit 0 if .venv is up to date, 1 if not; changes nothing
#   scripts/setup_env.sh --print-python  print the Python 3.10 it would build .venv with
#
# PYTHON=/path/to/python3.10 overrides the search. TFX 1.16 supports Python
# 3.9-3.10 only; this project tests on 3.10.
#
# "Up to date" means .venv/.tfxe-stamp holds the hash of setup.py,
# pyproject.toml, the constraints file and the venv's Python version, written
# after the last successful install.
#
# setup_tink_env.sh sources this file for the helpers below.

set -euo pipefail

TFXE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TFXE_TAG=${TFXE_TAG:-setup_env}
PY310_CHECK='sys.version_info[:2] == (3, 10)'

tfxe_log() { printf '[%s] %s\n' "$TFXE_TAG" "$*" >&2; }

# tfxe_runs PY CHECK: true if PY runs and the Python expression CHECK holds.
tfxe_runs() { "$1" -c "import sys; assert $2" >/dev/null 2>&1; }

tfxe_version_of() { "$1" -c 'import sys; print(sys.version.split()[0])'; }

# Prints the first Python 3.10 that actually runs. A pyenv shim named
# python3.10 can be on PATH and still fail ("pyenv: python3.10: command not
# found"), so every candidate is run, not just looked up.
tfxe_find_python310() {
  if [[ -n "${PYTHON:-}" ]]; then
    if tfxe_runs "$PYTHON" "$PY310_CHECK"; then
      echo "$PYTHON"
      return 0
    fi
    tfxe_log "PYTHON=$PYTHON does not run as Python 3.10; unset it or point it at a python3.10."
    return 1
  fi
  local candidates=() cand roots=("${PYENV_ROOT:-$HOME/.pyenv}") root
  cand=$(command -v python3.10 2>/dev/null) && candidates+=("$cand")
  if command -v pyenv >/dev/null 2>&1; then
    root=$(pyenv root 2>/dev/null) && [[ "$root" != "${roots[0]}" ]] && roots+=("$root")
  fi
  for root in "${roots[@]}"; do
    while IFS= read -r cand; do
      candidates+=("$cand")
    done < <(compgen -G "$root/versions/3.10.*/bin/python3.10" | sort -V -r)
  done
  candidates+=(/usr/bin/python3.10)
  for cand in "${candidates[@]}"; do
    if tfxe_runs "$cand" "$PY310_CHECK"; then
      echo "$cand"
      return 0
    fi
  done
  cat >&2 <<EOF
[$TFXE_TAG] No working Python 3.10 found. TFX 1.16 runs on Python 3.9-3.10 only.
[$TFXE_TAG] Tried: ${candidates[*]}
[$TFXE_TAG] Install Python 3.10, then run 'make setup' again. For example:
[$TFXE_TAG]   pyenv:            pyenv install 3.10.13
[$TFXE_TAG]   Ubuntu / Debian releases that ship it:  apt-get install python3.10 python3.10-venv
[$TFXE_TAG]   (Debian 12 bookworm does not ship 3.10: use pyenv there)
[$TFXE_TAG] or name one explicitly:  make setup PYTHON=/path/to/python3.10
EOF
  return 1
}

# tfxe_venv_ok VENV CHECK [WANTED_BASE]: VENV's python runs, satisfies CHECK,
# and, if WANTED_BASE is given, was made from that interpreter.
tfxe_venv_ok() {
  local venv=$1 check=$2 wanted=${3:-} have want
  tfxe_runs "$venv/bin/python" "$check" || return 1
  [[ -z "$wanted" ]] && return 0
  have=$("$venv/bin/python" -c 'import os, sys; print(os.path.realpath(sys._base_executable))') || return 1
  want=$("$wanted" -c 'import os, sys; print(os.path.realpath(sys.executable))') || return 1
  [[ "$have" == "$want" ]]
}

# tfxe_pip VENV ARGS...: pip in VENV, quiet, without the "Location ... is
# ignored" warning that a pip config listing absent local indexes prints for
# every package. pip's own exit status is returned.
tfxe_pip() {
  local venv=$1
  shift
  "$venv/bin/python" -m pip "$@" 2>&1 |
    { grep -v 'is ignored: it is neither a file nor a directory' || true; }
}

# tfxe_make_venv VENV BASE_PYTHON: (re)creates VENV from BASE_PYTHON.
tfxe_make_venv() {
  local venv=$1 base=$2
  if [[ -e "$venv" ]]; then
    tfxe_log "removing $venv (broken, or made from another Python)"
    rm -rf "$venv"
  fi
  tfxe_log "creating $venv with $base (Python $(tfxe_version_of "$base"))"
  "$base" -m venv "$venv"
}

# tfxe_fingerprint VENV NOTE FILE...: hash of the venv's Python version, the
# string NOTE and the files' contents (a missing file counts as "missing").
tfxe_fingerprint() {
  local venv=$1 note=$2 f
  shift 2
  {
    "$venv/bin/python" -c 'import sys; print(sys.version)'
    printf '%s\n' "$note"
    for f in "$@"; do
      printf '== %s\n' "$f"
      if [[ -f "$f" ]]; then cat "$f"; else echo missing; fi
    done
  } | sha256sum | cut -d' ' -f1
}

# tfxe_stamp_matches STAMP FINGERPRINT
tfxe_stamp_matches() { [[ -f "$1" && "$(cat "$1")" == "$2" ]]; }

main() {
  local mode=install
  case "${1:-}" in
    '') ;;
    --check) mode=check ;;
    --print-python) tfxe_find_python310; return ;;
    -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}"; return 0 ;;
    *) tfxe_log "unknown argument: $1 (try --help)"; return 2 ;;
  esac

  cd "$TFXE_ROOT"
  local venv=.venv constraints=constraints/tfx-1.16-py310.txt
  local stamp="$venv/.tfxe-stamp" base='' fp note

  if ! tfxe_venv_ok "$venv" "$PY310_CHECK" "${PYTHON:-}"; then
    if [[ $mode == check ]]; then
      tfxe_log "$venv is missing, broken, or not made from \$PYTHON"
      return 1
    fi
    base=$(tfxe_find_python310)
    tfxe_make_venv "$venv" "$base"
  fi

  # The editable install maps the packages find_packages() saw, so whether
  # tfx_encrypt/__init__.py exists counts too.
  note="extras=all,dev; tfx_encrypt/__init__.py: $([[ -f tfx_encrypt/__init__.py ]] && echo yes || echo no)"
  fp=$(tfxe_fingerprint "$venv" "$note" setup.py pyproject.toml tfx_encrypt/__about__.py "$constraints")
  if tfxe_stamp_matches "$stamp" "$fp"; then
    tfxe_log "$venv is up to date (Python $(tfxe_version_of "$venv/bin/python"), $constraints); nothing to do"
    return 0
  fi
  if [[ $mode == check ]]; then
    tfxe_log "$venv is out of date: setup.py, pyproject.toml, $constraints or Python changed since the last install"
    return 1
  fi

  rm -f "$stamp"
  tfxe_log "installing into $venv with -c $constraints (a few minutes the first time)"
  tfxe_pip "$venv" install -q --progress-bar off -c "$constraints" pip setuptools wheel
  tfxe_pip "$venv" install -q --progress-bar off -c "$constraints" -e '.[all,dev]'
  # Beam's DaskRunner on a dask.distributed cluster, for the tests
  # (tests/components/test_encrypt_pusher_beam_dask.py); pinned in the
  # constraints file, not an extra of tfx-encrypt (users pick their runner).
  tfxe_pip "$venv" install -q --progress-bar off -c "$constraints" dask distributed
  tfxe_log "checking dependencies (pip check)"
  tfxe_pip "$venv" check
  echo "$fp" > "$stamp"
  tfxe_log "done in ${SECONDS}s: $venv ($("$venv/bin/python" -m pip list --format=freeze 2>/dev/null | wc -l) distributions)"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
