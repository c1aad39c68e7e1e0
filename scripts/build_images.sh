#!/usr/bin/env bash
# Builds the project's two container images with the version and names from
# tfx_encrypt/__about__.py (the one place they are written):
#
#   scripts/build_images.sh [--push] [--print]
#
#   component   docker/component.Dockerfile   -> __about__.IMAGE
#   serve-sync  docker/serve-sync.Dockerfile  -> __about__.SERVE_SYNC_IMAGE
#
# IMAGE_REPOSITORY=registry.example.com/team overrides the repository part
# (__about__.IMAGE_REPOSITORY, where nothing is published yet): push to your
# own registry, then name it in the pipeline (kubeflow_v2.image_map(...,
# images=...)) and in deploy/kustomization.yaml (`images:`).
# --print shows the docker commands without running them (no Docker needed).
# Needs Docker with BuildKit (the Dockerfiles use RUN --mount).

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
push=0 dry=0
for arg in "$@"; do
  case "$arg" in
    --push) push=1 ;;
    --print) dry=1 ;;
    -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "build_images.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

# The names, read from __about__.py without importing the package.
read -r version component serve_sync < <(
  IMAGE_REPOSITORY_OVERRIDE=${IMAGE_REPOSITORY:-} python3 - "$ROOT/tfx_encrypt/__about__.py" <<'PY'
import os, sys
about = {}
exec(open(sys.argv[1], encoding='utf-8').read(), about)
repo = os.environ.get('IMAGE_REPOSITORY_OVERRIDE')
names = [about['IMAGE'], about['SERVE_SYNC_IMAGE']]
if repo:
  names = [repo.rstrip('/') + '/' + n[len(about['IMAGE_REPOSITORY']) + 1:]
           for n in names]
print(about['__version__'], *names)
PY
)

run() {
  printf '+ %s\n' "$*" >&2
  ((dry)) || "$@"
}

for pair in "component.Dockerfile $component" "serve-sync.Dockerfile $serve_sync"; do
  read -r dockerfile tag <<< "$pair"
  run env DOCKER_BUILDKIT=1 docker build -f "$ROOT/docker/$dockerfile" \
    --build-arg "VERSION=$version" -t "$tag" "$ROOT"
  ((push)) && run docker push "$tag"
done
exit 0
