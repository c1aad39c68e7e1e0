# syntax=docker/dockerfile:1
#
# The consumer side: `tfx-encrypt serve-sync` as a sidecar (or init
# container) next to tensorflow/serving (deploy/). The core package
# (cryptography, click, blake3) and the KMS extras only: no TensorFlow, no
# TFX. Pins from constraints/tfx-1.16-py310.txt, the versions the tests ran.
#
#   scripts/build_images.sh              # tags tfx_encrypt.__about__.SERVE_SYNC_IMAGE
#   docker build -f docker/serve-sync.Dockerfile --build-arg VERSION=<tfx_encrypt.__about__.__version__> .
#
# Extras: aws, gcp, vault, azure (KMS unwrap through workload identity). Add
# pkcs11 to EXTRAS for an HSM client library you mount into the pod.
#
# No key material: the build context holds the package sources only
# (.dockerignore), and identities are KMS key URIs resolved at run time with
# the pod's workload identity.

ARG PYTHON_IMAGE=python:3.10-slim-bookworm

# --- wheels ---------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS wheels
ARG VERSION
ARG EXTRAS=aws,gcp,vault,azure
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY constraints/tfx-1.16-py310.txt constraints/
RUN python -m pip install -c constraints/tfx-1.16-py310.txt pip setuptools wheel \
 && python -m pip wheel -c constraints/tfx-1.16-py310.txt -w /wheels pip
COPY setup.py pyproject.toml MANIFEST.in README.md CHANGELOG.md ./
COPY tfx_encrypt/ tfx_encrypt/
RUN test -n "${VERSION}" || { echo 'build with --build-arg VERSION=<tfx_encrypt.__about__.__version__>' >&2; exit 1; } \
 && python -m pip wheel --no-deps --no-build-isolation -w /wheels . \
 && test -f "/wheels/tfx_encrypt-${VERSION}-py3-none-any.whl" \
 && python -m pip wheel -c constraints/tfx-1.16-py310.txt -w /wheels \
      "/wheels/tfx_encrypt-${VERSION}-py3-none-any.whl[${EXTRAS}]"

# --- the image ----------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ARG VERSION
ARG EXTRAS=aws,gcp,vault,azure
LABEL org.opencontainers.image.title="tfx-encrypt-serve-sync" \
      org.opencontainers.image.description="tfx-encrypt serve-sync: decrypt verified model versions for TF Serving" \
      org.opencontainers.image.version="${VERSION}"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
COPY constraints/tfx-1.16-py310.txt /opt/tfx-encrypt/constraints/tfx-1.16-py310.txt
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    python -m pip install --no-index --find-links /wheels \
      -c /opt/tfx-encrypt/constraints/tfx-1.16-py310.txt pip \
 && python -m pip install --no-index --find-links /wheels \
      -c /opt/tfx-encrypt/constraints/tfx-1.16-py310.txt \
      "/wheels/tfx_encrypt-${VERSION}-py3-none-any.whl[${EXTRAS}]" \
 && python -m pip check \
 && python -c "import importlib.util as u, sys; bad = [m for m in ('tensorflow', 'tfx', 'apache_beam', 'ml_metadata') if u.find_spec(m)]; sys.exit(bad and 'serve-sync image must not hold %s' % bad)" \
 && test "$(tfx-encrypt --version)" = "tfx-encrypt, version ${VERSION}"

RUN groupadd --gid 10001 tfxe \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin tfxe
USER 10001:10001
# serve-sync SOURCE SERVING_BASE --identity KMS_URI --trust PEM ... (deploy/deployment.yaml)
ENTRYPOINT ["tfx-encrypt"]
CMD ["serve-sync", "--help"]
