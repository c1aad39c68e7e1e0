#!/usr/bin/env bash
# `make mutate`: mutation testing of the security-critical code with mutmut
# 2.x (from .venv-mut), on demand, never in CI. See docs/TESTING.md.
#
#   scripts/mutate.sh [SCOPE ...]       default: format checks
#
# SCOPE:
#   format   every module of tfx_encrypt/format/
#   checks   the security checks of tfx_encrypt/package/ (CHECK_FUNCS below)
#   package  all of tfx_encrypt/package/ (several hours)
#   serving  tfx_encrypt/runtime/serving.py
#   a file   e.g. tfx_encrypt/format/paths.py (in tfx_encrypt/package/:
#            only the functions of CHECK_FUNCS)
#
# mutmut rewrites the file it mutates while the tests run, so the run works
# in a scratch copy of the tree (MUTATE_DIR, default build/mutate, created
# afresh each time), never in the checkout. The tests are the fast core ones
# (scripts/mutmut_config.py picks them per file and per function), run with
# .venv's pytest (MUTATE_PYTHON overrides it); slow, TFX and interop tests
# are left out, and integration tests except where they add kills (a KMS
# that is down, for the unwrapping code). Mutants that only change the text
# of an error or log message are skipped (MUTATE_MESSAGES=1 tests them too).
#
# At the end the score per module is printed, and every surviving mutant as
# a diff. Afterwards: `cd build/mutate && ../../.venv-mut/bin/mutmut show ID`
# (never while a run is going: `mutmut show` re-reads the mutated file and
# rewrites mutmut's line cache under the run). MUTATE_RESUME=1 goes on with
# the run in MUTATE_DIR, with the checkout's current tests. The command
# exits 0 whatever survived: read the report.
#
# Internal: `scripts/mutate.sh --pytest ARGS...` runs pytest for mutmut and
# exits 1 on any failure (mutmut counts only exit code 1 as "killed"; a
# mutant that breaks the import makes pytest exit 2).

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [[ "${1:-}" == --pytest ]]; then
  shift
  rc=0
  "${TFXE_MUTATE_PYTHON:?}" -m pytest "$@" || rc=$?
  ((rc == 0)) && exit 0
  exit 1
fi

case "${1:-}" in -h|--help) sed -n '2,25p' "${BASH_SOURCE[0]}"; exit 0 ;; esac

# The security checks of the package operations: signature, unwrapping
# (and which error wins), key groups, file table and fingerprint, payload
# segments and digests, the package on disk.
CHECK_FUNCS=_verify_signature,unwrap_data_key,_UnwrapAttempts,open_key_groups,_decrypt_file_table,_decrypt_payload,_check_ciphertext,_Source
CHECK_FILES=(tfx_encrypt/package/envelope.py tfx_encrypt/package/_streams.py
             tfx_encrypt/package/layout.py)
MUTATE_DIR=${MUTATE_DIR:-$ROOT/build/mutate}
MUTATE_PYTHON=${MUTATE_PYTHON:-$ROOT/.venv/bin/python}
MUTMUT=$ROOT/.venv-mut/bin/mutmut

scopes=("$@")
((${#scopes[@]})) || scopes=(format checks)
paths=() funcs=''
for s in "${scopes[@]}"; do
  case "$s" in
    format) paths+=(tfx_encrypt/format/) ;;
    checks) paths+=("${CHECK_FILES[@]}"); funcs=${funcs:-$CHECK_FUNCS} ;;
    package) paths+=(tfx_encrypt/package/); funcs=ALL ;;
    serving) paths+=(tfx_encrypt/runtime/serving.py) ;;
    tfx_encrypt/*.py) paths+=("$s")
       [[ "$s" == tfx_encrypt/package/* ]] && funcs=${funcs:-$CHECK_FUNCS} ;;
    *) echo "mutate: unknown scope '$s' (format, checks, package, serving)" >&2
       exit 2 ;;
  esac
done
[[ "$funcs" == ALL ]] && funcs=''
paths_csv=$(printf '%s\n' "${paths[@]}" | sort -u | paste -sd, -)

[[ -x "$MUTATE_PYTHON" ]] || {
  echo "mutate: $MUTATE_PYTHON is missing; run make setup" >&2; exit 2; }
[[ -x "$MUTMUT" ]] || {
  echo "mutate: $MUTMUT is missing; run scripts/setup_mut_env.sh" >&2; exit 2; }

case "$MUTATE_DIR" in /|"$ROOT"|"$HOME") echo "mutate: refusing MUTATE_DIR=$MUTATE_DIR" >&2; exit 2 ;; esac
copy_tree() {  # copy_tree WHAT: the checkout's WHAT (., tests) into MUTATE_DIR
  (cd "$ROOT" && tar --exclude=./.git --exclude='./.venv*' --exclude=./build \
    --exclude=./dist --exclude=./demo-out --exclude=./bench-out \
    --exclude='*/__pycache__' --exclude=./.pytest_cache --exclude=./.hypothesis \
    -cf - "$1") | tar -C "$MUTATE_DIR" -xf -
}
if [[ "${MUTATE_RESUME:-0}" == 1 && -f "$MUTATE_DIR/.mutmut-cache" ]]; then
  # Go on with an interrupted run (or re-check survivors after adding
  # tests): the sources stay the ones it started from, the tests are the
  # checkout's; mutants already killed stay killed, the rest run again.
  rm -rf "$MUTATE_DIR/tests"
  copy_tree ./tests
else
  # A fresh scratch copy: the sources and tests, no venvs, no VCS data.
  rm -rf "$MUTATE_DIR"
  mkdir -p "$MUTATE_DIR"
  copy_tree .
fi
cp "$ROOT/scripts/mutmut_config.py" "$MUTATE_DIR/mutmut_config.py"
cd "$MUTATE_DIR"

# The tree under test must be the scratch copy, not the checkout that .venv
# has installed in editable mode.
export PYTHONPATH=$MUTATE_DIR
got=$("$MUTATE_PYTHON" -c 'import tfx_encrypt, os; print(os.path.dirname(os.path.dirname(tfx_encrypt.__file__)))')
[[ "$got" == "$MUTATE_DIR" ]] || {
  echo "mutate: tfx_encrypt resolves to $got, not $MUTATE_DIR" >&2; exit 2; }

export TFXE_MUTATE_PYTHON=$MUTATE_PYTHON TFXE_MUTATE_FUNCS=$funcs
export TFXE_MUTATE_MESSAGES=${MUTATE_MESSAGES:-0}
# Plugins the core tests do not need cost 3 s of start-up per mutant
# (hypothesis works without its pytest plugin; the fuzz tests run 100
# examples each here).
export TFXE_MUTATE_PYTEST="bash scripts/mutate.sh --pytest -x -q -p no:cacheprovider -p no:nbmake -p no:anyio -p no:hypothesispytest"
export TFXE_FUZZ_EXAMPLES=${TFXE_FUZZ_EXAMPLES:-100}
# The baseline (and the command for files without their own list): every
# test module mutmut_config.py names, once.
all_tests=$("$ROOT/.venv-mut/bin/python" -c '
import mutmut_config as c
seen = []
for tests in [*c.TESTS_BY_FILE.values(), *c.TESTS_BY_FUNCTION.values(), c.DEFAULT_TESTS]:
  seen += [t for t in tests if t not in seen]
print(" ".join(seen))')

echo "mutate: mutating $paths_csv${funcs:+ (only $funcs)} in $MUTATE_DIR" >&2
start=$SECONDS
rc=0
"$MUTMUT" run --paths-to-mutate "$paths_csv" --tests-dir tests/ \
  --runner "$TFXE_MUTATE_PYTEST -m 'not slow and not tfx and not interop' $all_tests" --simple-output --no-progress \
  || rc=$?
echo "mutate: mutmut exited $rc after $((SECONDS - start)) s" >&2

# The score per module, then every survivor as a diff.
MUTMUT=$MUTMUT "$ROOT/.venv-mut/bin/python" "$ROOT/scripts/mutate_report.py"
