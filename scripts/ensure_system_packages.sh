#!/usr/bin/env bash
# Makes sure the Debian packages a make target needs are installed. The
# Makefile runs it before `make test`, `make demo` and `make bench` do
# anything else.
#
#   scripts/ensure_system_packages.sh TARGET...   (test, demo, bench)
#
# Everything installed: a fast no-op (one dpkg-query call). Something
# missing: as root, installs it with apt-get (running `apt-get update` first
# only when apt does not know a package yet); otherwise prints one line with
# the exact command to run and exits 1.
#
# TFXE_SYSTEM_PACKAGES_EXTRA="pkg ..." adds packages to check (the tests use
# it to check the "missing" path with a package that does not exist).

set -euo pipefail

# Which tests use what:
#   softhsm2: softhsm2-util and /usr/lib/softhsm/libsofthsm2.so, the PKCS#11
#     backend's tests (tests/fakes/backends.py).
#   docker-registry: /usr/bin/docker-registry, the OCI push/pull tests
#     (tests/distribution/test_oci.py, tests/distribution/test_oci_auth.py).
#   apache2-utils: htpasswd -B, the bcrypt htpasswd file of the basic-auth
#     registry (tests/distribution/test_oci_auth.py).
#   swtpm, tpm2-abrmd, libtss2-tcti-tabrmd0, dbus-daemon, libtpm2-pkcs11-1,
#     opensc: a software TPM 2.0 behind the tpm2-abrmd resource manager (on a
#     private D-Bus session bus) and tpm2-pkcs11, set up with pkcs11-tool,
#     for the TPM device-identity tests (tests/fakes/tpm.py,
#     tests/keys/test_tpm2.py) and benchmarks/tpm_unwrap.py. The tests start
#     their own daemons; Debian's tpm2-abrmd system service is not used.
#   age: the `tar | age` rows of benchmarks/run.py (docs/BENCHMARKS.md).
#   mariadb-server: mariadbd and mariadb-install-db, the MySQL ML Metadata
#     store of the lineage tests (tests/lineage/test_lineage.py starts its own server
#     on a loopback port with a private datadir; Debian's service is unused).
#   graphviz: the `dot` program that draws `tfx-encrypt lineage --format
#     svg|png` (tfx_encrypt/lineage/_graph.py); tests/lineage/test_graph.py
#     parses the DOT with it and checks the SVG / PNG, and
#     notebooks/pipeline.ipynb shows the picture.
# The demo (pipelines/local_pipeline.py) needs no system package beyond
# what .venv holds.
packages_for() {
  case "$1" in
    test) echo softhsm2 docker-registry apache2-utils swtpm tpm2-abrmd \
            libtss2-tcti-tabrmd0 dbus-daemon libtpm2-pkcs11-1 opensc \
            mariadb-server graphviz ;;
    demo) ;;
    bench) echo age ;;
    *) echo "ensure_system_packages.sh: unknown target '$1' (test, demo, bench)" >&2
       return 2 ;;
  esac
}

main() {
  (($#)) || { echo "usage: ensure_system_packages.sh TARGET... (test, demo, bench)" >&2; return 2; }
  local wanted=() pkgs=() target pkg list
  for target in "$@"; do
    list=$(packages_for "$target") || return
    read -r -a pkgs <<< "$list"
    wanted+=("${pkgs[@]}")
  done
  read -r -a pkgs <<< "${TFXE_SYSTEM_PACKAGES_EXTRA:-}"
  wanted+=("${pkgs[@]}")
  ((${#wanted[@]})) || return 0

  if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "ensure_system_packages.sh: not a Debian system (no dpkg-query); make $* needs the equivalent of: ${wanted[*]}" >&2
    return 0
  fi
  # One call for all; packages dpkg has never heard of print nothing.
  local installed
  installed=" $(dpkg-query -W -f='${Package}:${db:Status-Abbrev} ' "${wanted[@]}" 2>/dev/null || true)"
  local missing=()
  for pkg in "${wanted[@]}"; do
    [[ "$installed" == *" $pkg:ii "* ]] || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0

  if [[ $(id -u) -ne 0 ]]; then
    echo "make $* needs Debian packages that are not installed; run: sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
    return 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  # A fresh image has empty package lists: update only if apt lacks one.
  for pkg in "${missing[@]}"; do
    if ! apt-cache show --no-all-versions "$pkg" >/dev/null 2>&1; then
      echo "ensure_system_packages.sh: apt-get update (apt does not know $pkg yet)" >&2
      apt-get update -qq
      break
    fi
  done
  echo "ensure_system_packages.sh: installing ${missing[*]}" >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

main "$@"
