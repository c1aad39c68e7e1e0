# syntax=docker/dockerfile:1
#
# The image EncryptPusher / BeamEncryptPusher run in on Kubeflow Pipelines v2
# and Vertex AI: TFX 1.16 and tfx-encrypt with every key-backend extra,
# installed from the tested pins (constraints/tfx-1.16-py310.txt).
#
#   scripts/build_images.sh              # tags tfx_encrypt.__about__.IMAGE
#   docker build -f docker/component.Dockerfile --build-arg VERSION=<tfx_encrypt.__about__.__version__> .
#
# Base: python:3.10-slim, not gcr.io/tfx-oss-public/tfx:1.16.0. The TFX image
# is a GPU deep-learning container (CUDA, conda, several GB, runs as root)
# whose own package set the constraints file would fight; on a slim Python
# 3.10 the constraints reproduce exactly the environment the test suite runs
# in (.venv), and `pip check` means something. TFX's KFP v2 entrypoint only
# needs `python -m tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor`,
# which the pinned tfx provides (checked at the end of the build). The image
# holds every stock TFX component too, so it can also be the pipeline's
# default image for CPU steps; keep GPU Trainers on TFX's image.
#
# No key material: the build context is cut down to the package sources by
# .dockerignore (which also drops *.pem / *.key), only the built wheels reach
# the final stage, and keys are key URIs resolved at run time (KMS through
# workload identity, or files mounted by the orchestrator).

ARG PYTHON_IMAGE=python:3.10-slim-bookworm

# --- wheels: the package and every pinned dependency, built once -------------
FROM ${PYTHON_IMAGE} AS wheels
ARG VERSION
# crcmod and pyfarmhash (apache-beam[gcp], tfx-bsl) have no wheels: compile them.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY constraints/tfx-1.16-py310.txt constraints/
RUN python -m pip install -c constraints/tfx-1.16-py310.txt pip setuptools wheel \
 && python -m pip wheel -c constraints/tfx-1.16-py310.txt -w /wheels pip setuptools wheel
COPY setup.py pyproject.toml MANIFEST.in README.md CHANGELOG.md ./
COPY tfx_encrypt/ tfx_encrypt/
# The wheel's name carries the version: a VERSION that is not
# tfx_encrypt/__about__.py's fails here.
RUN test -n "${VERSION}" || { echo 'build with --build-arg VERSION=<tfx_encrypt.__about__.__version__>' >&2; exit 1; } \
 && python -m pip wheel --no-deps --no-build-isolation -w /wheels . \
 && test -f "/wheels/tfx_encrypt-${VERSION}-py3-none-any.whl" \
 && python -m pip wheel -c constraints/tfx-1.16-py310.txt -w /wheels \
      "/wheels/tfx_encrypt-${VERSION}-py3-none-any.whl[tfx,kfp,aws,gcp,vault,azure,pkcs11]"

# --- the image ----------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ARG VERSION
LABEL org.opencontainers.image.title="tfx-encrypt" \
      org.opencontainers.image.description="EncryptPusher for TFX 1.16 on Kubeflow Pipelines v2 / Vertex AI" \
      org.opencontainers.image.version="${VERSION}"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
COPY constraints/tfx-1.16-py310.txt /opt/tfx-encrypt/constraints/tfx-1.16-py310.txt
# Only pinned wheels, no index: the same set the tests ran against. The
# wheels are mounted, not copied, so they leave no layer behind.
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    python -m pip install --no-index --find-links /wheels \
      -c /opt/tfx-encrypt/constraints/tfx-1.16-py310.txt pip setuptools wheel \
 && python -m pip install --no-index --find-links /wheels \
      -c /opt/tfx-encrypt/constraints/tfx-1.16-py310.txt \
      "/wheels/tfx_encrypt-${VERSION}-py3-none-any.whl[tfx,kfp,aws,gcp,vault,azure,pkcs11]" \
 && python -m pip check \
 && python -c "import tfx_encrypt.components, tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor" \
 && test "$(tfx-encrypt --version)" = "tfx-encrypt, version ${VERSION}"

# A fixed numeric uid, so that `runAsNonRoot` can check it.
RUN groupadd --gid 10001 tfxe \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/tfxe --shell /usr/sbin/nologin tfxe
USER 10001:10001
WORKDIR /home/tfxe
# KubeflowV2DagRunner gives the command itself (python -m
# tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor ...);
# run by hand, the image is the CLI.
CMD ["tfx-encrypt", "--help"]
