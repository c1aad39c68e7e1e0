"""Provenance under TFX's KFP v2 / Vertex AI container entrypoint.

TFX's `kubeflow_v2_run_executor` (tfx/orchestration/kubeflow/v2/container)
gives an executor much less than the local and Beam runners do: its
`BaseExecutor.Context` holds only `unique_id` (the base name of the task's
output directory) and `tmp_dir`; there is no `pipeline_info`,
`pipeline_run_id` or `pipeline_node`, and every input artifact's MLMD `id` is
a hash of its runtime artifact name
(`kubeflow_v2_entrypoint_utils._get_hashed_id`), not an id of any store.

What the run's identity does reach the step through is KFP's runtime
placeholders. KubeflowV2DagRunner compiles every execution property into a
constant input parameter of the task, and Vertex AI Pipelines and Kubeflow
Pipelines v2 replace a constant that is exactly one of these placeholders
(`kfp.dsl.PIPELINE_JOB_NAME_PLACEHOLDER`, ...) with the running job's value
before the container starts. So EncryptPusher declares one execution
property per placeholder (`PLACEHOLDERS`), whose value is the placeholder;
on every other orchestrator the value stays the placeholder text, which
`resolved` treats as absent.

The pipeline name has no KFP placeholder. It is in the compiled spec only
(`pipelineInfo.name`), so it is recorded at compile time as the
`pipeline_name` execution property by
`tfx_encrypt.components.kubeflow_v2.image_map(pipeline)` (the call that also
picks the step's image).

The real name of an input artifact (on Vertex, its ML Metadata resource
name `projects/P/locations/L/metadataStores/default/artifacts/N`) is in the
executor input that the entrypoint received on its command line
(`--json_serialized_invocation_args`); `runtime_artifact_names` reads it
there, in the same process, to replace the hashed id.
"""

import hashlib
import json
import sys
from typing import Any, Dict, Mapping, Optional

from tfx_encrypt.components.encrypt_pusher import spec

#: The module TFX's KFP v2 container runs as __main__.
ENTRYPOINT_MODULE = (
    'tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor')
_INVOCATION_FLAG = '--json_serialized_invocation_args'

#: Execution property -> KFP runtime placeholder (kfp.dsl constants).
PLACEHOLDERS: Dict[str, str] = {
    spec.KFP_PIPELINE_JOB_NAME_KEY: '{{$.pipeline_job_name}}',
    spec.KFP_PIPELINE_JOB_UUID_KEY: '{{$.pipeline_job_uuid}}',
    spec.KFP_PIPELINE_TASK_NAME_KEY: '{{$.pipeline_task_name}}',
    spec.KFP_PIPELINE_TASK_UUID_KEY: '{{$.pipeline_task_uuid}}',
}

_INT64_MAX = 1 << 63


def resolved(value: Any) -> Optional[str]:
  """`value` if the orchestrator replaced the placeholder, else None."""
  if not isinstance(value, str) or not value or '{{$' in value:
    return None
  return value


def runtime_values(exec_properties: Mapping[str, Any]) -> Dict[str, str]:
  """The placeholders the orchestrator resolved: {exec property: value}."""
  out = {}
  for key in PLACEHOLDERS:
    value = resolved(exec_properties.get(key))
    if value is not None:
      out[key] = value
  return out


def hashed_id(name: str) -> int:
  """The MLMD id TFX's v2 entrypoint gives an artifact of runtime `name`."""
  return int(hashlib.sha256(name.encode('utf-8')).hexdigest(), 16) % _INT64_MAX


def _invocation_json(argv) -> Optional[str]:
  for i, arg in enumerate(argv):
    if arg == _INVOCATION_FLAG and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith(_INVOCATION_FLAG + '='):
      return arg[len(_INVOCATION_FLAG) + 1:]
  return None


def under_entrypoint() -> bool:
  """True when this process is TFX's KFP v2 container entrypoint."""
  main = sys.modules.get('__main__')
  main_spec = getattr(main, '__spec__', None)
  return getattr(main_spec, 'name', None) == ENTRYPOINT_MODULE


def runtime_artifact_names() -> Optional[Dict[int, str]]:
  """{hashed id: runtime name} of the input artifacts, under the entrypoint.

  None when not running under TFX's KFP v2 entrypoint (artifact ids are then
  real MLMD ids); an empty dict when the executor input cannot be read.
  """
  if not under_entrypoint():
    return None
  text = _invocation_json(sys.argv[1:])
  if not text:
    return {}
  try:
    executor_input = json.loads(text)
  except ValueError:
    return {}
  names = {}
  inputs = executor_input.get('inputs') or {}
  for artifact_list in (inputs.get('artifacts') or {}).values():
    for artifact in (artifact_list or {}).get('artifacts') or []:
      name = artifact.get('name') if isinstance(artifact, dict) else None
      if isinstance(name, str) and name:
        names[hashed_id(name)] = name
  return names
