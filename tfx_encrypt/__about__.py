"""Version of the tfx-encrypt distribution, and the names of its images.

Kept in its own module so that setup.py can read it with a regex, without
importing the package (and so without importing anything the package needs).
The one place the version is written: setup.py, the image tags below,
scripts/build_images.sh and scripts/build_dist.sh all derive it from here
(the Kubernetes manifests in deploy/ repeat the image tag, and
tests/test_images.py checks that they agree).
"""

__version__ = '0.1.0'

#: Where the project's container images live. Nothing is published there
#: yet: build the images and push them to your own registry
#: (`IMAGE_REPOSITORY=registry.example.com/team scripts/build_images.sh
#: --push`), then name yours in the pipeline
#: (`kubeflow_v2.image_map(..., images=...)`, docs/COMPONENT.md) and in
#: deploy/kustomization.yaml.
IMAGE_REPOSITORY = 'ghcr.io/tfx-encrypt'

#: The image EncryptPusher / BeamEncryptPusher run in on Kubeflow Pipelines
#: v2 and Vertex AI (docker/component.Dockerfile: TFX 1.16 + tfx-encrypt
#: with the key-backend extras).
IMAGE = f'{IMAGE_REPOSITORY}/tfx-encrypt:{__version__}'

#: The consumer-side image: the core package and the KMS extras only, for
#: `tfx-encrypt serve-sync` next to TF Serving (docker/serve-sync.Dockerfile).
SERVE_SYNC_IMAGE = f'{IMAGE_REPOSITORY}/tfx-encrypt-serve-sync:{__version__}'
