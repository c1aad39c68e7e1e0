#!/usr/bin/env bash
# Builds the release files: the sdist and the wheel (python -m build), then
# checks them (twine check --strict) and that both carry the version of
# tfx_encrypt/__about__.py.
#
#   scripts/build_dist.sh [OUTDIR]      default: dist/
#
# Runs in .venv-release (scripts/setup_release_env.sh, a fast no-op when up
# to date), with the build backend pinned there (--no-isolation: no download
# at build time). Prints the paths of the two files on stdout.

set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,10p' "${BASH_SOURCE[0]}"; exit 0 ;; esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUTDIR=${1:-$ROOT/dist}
PY=$ROOT/.venv-release/bin/python

bash "$ROOT/scripts/setup_release_env.sh" >&2
version=$(sed -n "s/^__version__ *= *['\"]\([^'\"]*\)['\"].*/\1/p" "$ROOT/tfx_encrypt/__about__.py")
[[ -n "$version" ]] || { echo "build_dist.sh: no __version__ in tfx_encrypt/__about__.py" >&2; exit 1; }

sdist=$OUTDIR/tfx_encrypt-$version.tar.gz
wheel=$OUTDIR/tfx_encrypt-$version-py3-none-any.whl
mkdir -p "$OUTDIR"
rm -f "$sdist" "$wheel"
# The sdist first, then the wheel built from the unpacked sdist (build's
# default): a file MANIFEST.in forgets breaks the wheel here, not on PyPI.
"$PY" -m build --no-isolation --outdir "$OUTDIR" "$ROOT" >&2
for f in "$sdist" "$wheel"; do
  [[ -f "$f" ]] || { echo "build_dist.sh: $f was not built (version $version)" >&2; exit 1; }
done
"$PY" -m twine check --strict "$sdist" "$wheel" >&2
printf '%s\n' "$sdist" "$wheel"
