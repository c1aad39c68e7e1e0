"""Which container image each step runs in on Kubeflow Pipelines v2 / Vertex AI.

Compiled with `KubeflowV2DagRunner`, every TFX step runs in one image,
`gcr.io/tfx-oss-public/tfx:1.16.0` by default, which does not contain
tfx-encrypt. TFX 1.16 has one public way to give a Python-executor
component an image of its own: `KubeflowV2DagRunnerConfig(default_image=...)`
also takes a map `{component_id: image, 'default_image_path': image}`
(tfx/orchestration/kubeflow/v2/pipeline_builder.py, `_get_component_image`).
`BaseNode.with_platform_config` carries resources only, and a container
executor spec (`TemplatedExecutorContainerSpec`, what
`tfx.v1.dsl.experimental.create_container_component` makes) would replace
the Python executor and stop the component from running on LocalDagRunner.

EncryptPusher and BeamEncryptPusher name their image in a class attribute
`IMAGE` (tfx_encrypt.__about__.IMAGE, built from docker/component.Dockerfile);
`image_map` turns the components of a pipeline into that map::

  from tfx.v1.orchestration import experimental as kfp_v2
  from tfx_encrypt.components import kubeflow_v2

  runner = kfp_v2.KubeflowV2DagRunner(
      config=kfp_v2.KubeflowV2DagRunnerConfig(
          default_image=kubeflow_v2.image_map(pipeline)),
      output_filename='pipeline.json')

Overrides, strongest first: an entry for the component's id in the map you
pass as `default_image`; `with_image(component, image)` on one component;
the `images` argument (e.g. your registry's copy of the project's image for
every tfx-encrypt component); the class's `IMAGE`. The other steps keep
TFX's image, or `default_image` when you give one.
"""

import re
from typing import Any, Dict, Iterable, Mapping, Optional, Union

from tfx_encrypt import errors

#: KubeflowV2DagRunnerConfig's key for the image of every step not named in
#: the map (tfx.orchestration.kubeflow.v2.pipeline_builder.DEFAULT_IMAGE_PATH_KEY).
DEFAULT_IMAGE_PATH_KEY = 'default_image_path'

# An image reference as docker's reference grammar has it (distribution's
# reference/regexp.go), simplified: [host[:port]/]path[:tag][@digest]. The
# first component is a host only with a dot, a port, or as `localhost`;
# path components are lower case.
_LABEL = r'[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?'
_HOST = (rf'(?:(?:localhost|{_LABEL}(?:\.{_LABEL})+)(?::[0-9]+)?/'
         rf'|{_LABEL}:[0-9]+/)?')
_PATH = r'[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*'
_TAG = r'(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?'
_DIGEST = r'(?:@sha256:[0-9a-f]{64})?'
_IMAGE_RE = re.compile(_HOST + _PATH + _TAG + _DIGEST)


def check_image(image: Any, what: str = 'image') -> str:
  """Returns `image` if it is a container image reference, else raises."""
  if not isinstance(image, str) or not _IMAGE_RE.fullmatch(image) or len(
      image) > 1024:
    raise errors.UsageError(
        f'{what} must be a container image reference such as '
        f'registry.example.com/team/tfx-encrypt:0.1.0, not {image!r:.80}')
  return image


def with_image(component: Any, image: str) -> Any:
  """Runs this one component in `image` on Kubeflow Pipelines v2 / Vertex.

  Returns the component, so that it chains like `with_id`. Takes effect
  through `image_map`.
  """
  component.IMAGE = check_image(image, f'image of {component.id}')
  return component


def _components(pipeline_or_components) -> Iterable[Any]:
  return getattr(pipeline_or_components, 'components', pipeline_or_components)


def image_map(
    pipeline_or_components: Any,
    default_image: Union[None, str, Mapping[str, str]] = None,
    images: Optional[str] = None,
) -> Dict[str, str]:
  """The `default_image` for KubeflowV2DagRunnerConfig that runs each
  component with an `IMAGE` (EncryptPusher, BeamEncryptPusher) in it.

  Args:
    pipeline_or_components: a `tfx.dsl.Pipeline` or its components.
    default_image: what you would otherwise give KubeflowV2DagRunnerConfig:
      None (the other steps keep TFX's image), an image for the other steps,
      or a map `{component_id: image, 'default_image_path': image}` whose
      entries win over everything here.
    images: one image for every component that has an `IMAGE`, unless
      `with_image` set its own (e.g. your registry's build of
      docker/component.Dockerfile).

  Returns:
    A new dict; `default_image_path` is in it only if you gave one
    (KubeflowV2DagRunnerConfig then fills in TFX's own image). Given a
    pipeline, also records its name in those components
    (`record_pipeline_name`), for their provenance on KFP v2 / Vertex.
  """
  if default_image is None:
    result = {}
  elif isinstance(default_image, str):
    result = {DEFAULT_IMAGE_PATH_KEY: check_image(default_image,
                                                  'default_image')}
  elif isinstance(default_image, Mapping):
    result = {str(k): check_image(v, f'default_image[{k!r}]')
              for k, v in default_image.items()}
  else:
    raise errors.UsageError('default_image must be None, an image, or a map '
                            'of component id to image')
  if images is not None:
    check_image(images, 'images')
  for component in _components(pipeline_or_components):
    own = getattr(component, 'IMAGE', None)
    if not own or component.id in result:
      continue
    if images is not None and 'IMAGE' not in vars(component):
      own = images  # with_image() did not set one for this component
    result[component.id] = check_image(own, f'image of {component.id}')
  record_pipeline_name(pipeline_or_components)
  return result


#: The execution property the pipeline name is recorded in
#: (encrypt_pusher.spec.PIPELINE_NAME_KEY).
PIPELINE_NAME_PROPERTY = 'pipeline_name'


def record_pipeline_name(pipeline: Any) -> None:
  """Records `pipeline`'s name in its EncryptPusher / BeamEncryptPusher.

  Under TFX's KFP v2 container entrypoint an executor is not told the
  pipeline name (there is no KFP placeholder for it either; it is only the
  compiled spec's `pipelineInfo.name`), so it is written, at compile time,
  into the components' `pipeline_name` execution property, from which
  the package's `tfx.pipeline_name` context entry comes
  (encrypt_pusher/kfp_v2.py). `image_map(pipeline)` calls this; call it
  yourself before compiling if you choose images another way. Does nothing
  given a list of components (no name) instead of a pipeline.
  """
  info = getattr(pipeline, 'pipeline_info', None)
  name = getattr(info, 'pipeline_name', None)
  if not name:
    return
  for component in _components(pipeline):
    spec = getattr(component, 'spec', None)
    if PIPELINE_NAME_PROPERTY in getattr(type(spec), 'PARAMETERS', {}) and (
        getattr(component, 'IMAGE', None)):
      component.exec_properties[PIPELINE_NAME_PROPERTY] = name
