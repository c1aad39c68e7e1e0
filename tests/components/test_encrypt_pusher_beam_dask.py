"""BeamEncryptPusher's transform on Beam's DaskRunner, on a dask.distributed
cluster of separate worker processes that share no directory with the
driver (docs/OBJECT_STORES.md, "Beam without a shared filesystem").

The cluster is a dask scheduler and two `dask worker` processes on
loopback (what `distributed.LocalCluster` starts, but started here so each
worker can run in its own mount namespace, as the DirectRunner workers of
test_encrypt_pusher_beam_remote.py do: pytest's temporary root, where the
driver keeps the model copy and keys, is an empty tmpfs for them; another
working directory, TMPDIR and HOME). The model and the package are on
`s3://` (moto's server).

Beam 2.59's DaskRunner translates Create, ParDo (it calls `DoFn.process`
directly: no `setup`), GroupByKey and Flatten onto dask bags; it has no
metrics (`BeamStats.dek_unwraps` stays None).
"""

import shlex
import subprocess
import sys
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
import pytest

from tests.components import test_encrypt_pusher_beam_remote as remote
from tests.fakes.servers import free_port, wait_for_port
from tfx_encrypt import package as package_lib
from tfx_encrypt import storage
from tfx_encrypt.components.encrypt_pusher import beam_executor

distributed = pytest.importorskip('distributed')  # scripts/setup_env.sh
from apache_beam.runners.dask.dask_runner import DaskRunner  # pylint: disable=g-import-not-at-top,wrong-import-position

MIB = 1 << 20
worker_env = remote.worker_env
isolated = remote.isolated


class _Cluster:
  """A dask scheduler and `n` workers (separate processes), each worker in
  the isolating mount namespace of `iso` (a remote._IsolatedWorkers)."""

  def __init__(self, iso, n: int = 2):
    self.port = free_port()
    self.address = f'tcp://127.0.0.1:{self.port}'
    self.procs = []
    self.scheduler = subprocess.Popen(
        [sys.executable, '-m', 'distributed.cli.dask_scheduler', '--host',
         '127.0.0.1', '--port', str(self.port), '--dashboard-address', ':0',
         '--no-show'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    self.procs.append(self.scheduler)
    wait_for_port(self.port, proc=self.scheduler)
    q = shlex.quote
    inner = (
        f'mount -t tmpfs -o size=1m,mode=0700 tfxe-hidden {q(iso.hidden)} && '
        f'cd {q(iso.home)} && '
        f'if [ -e {q(iso.canary)} ]; then s=visible; else s=hidden; fi && '
        f'echo "$s $(pwd)" > {q(iso.home)}/probe-$$ && '
        f'exec env TMPDIR={q(iso.home)}/tmp HOME={q(iso.home)} '
        f'{q(sys.executable)} -m distributed.cli.dask_worker '
        f'{q(self.address)} --nthreads 1 --no-nanny --no-dashboard '
        f'--local-directory {q(iso.home)}/tmp')
    self.workers = [
        subprocess.Popen(['unshare', '-m', '--propagation', 'private', 'sh',
                          '-c', inner], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
        for _ in range(n)]
    self.procs += self.workers
    with distributed.Client(self.address, timeout=60) as client:
      client.wait_for_workers(n, timeout=60)

  def close(self):
    for p in reversed(self.procs):  # only the processes this test started
      if p.poll() is None:
        p.terminate()
    deadline = time.monotonic() + 15
    for p in self.procs:
      try:
        p.wait(timeout=max(0.1, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=10)


@pytest.mark.slow
def test_dask_runner_on_a_distributed_cluster_without_shared_directory(
    s3_store, tmp_path, keys, worker_env, isolated):
  del worker_env
  base = s3_store.new_base()
  local = remote._write_model(str(tmp_path / 'model'), 11 * MIB + 7)  # pylint: disable=protected-access
  remote._upload(local, f'{base}/model')  # pylint: disable=protected-access
  worker_key = isolated.key(keys.recipient_key)
  cluster = _Cluster(isolated)
  try:
    stats = beam_executor.BeamStats()
    pkg = f'{base}/encrypted/1'
    info = beam_executor.encrypt_model_with_beam(
        f'{base}/model', pkg, recipients=[keys.recipient, keys.other],
        worker_identity=worker_key, signer=keys.signer, segment_bytes=MIB,
        stats=stats,
        make_pipeline=lambda: beam.Pipeline(
            runner=DaskRunner(), options=PipelineOptions(
                [f'--dask_client_address={cluster.address}'])))
    # The work ran in the dask workers, not in the driver; they could not
    # see the driver's temporary directory.
    worker_pids = {p.pid for p in cluster.workers}
    assert stats.worker_pids and set(stats.worker_pids) <= worker_pids
    probes = isolated.probes()
    assert len(probes) == 2
    assert all(p == ['hidden', isolated.home] for p in probes), probes
    assert stats.dek_unwraps is None  # the DaskRunner has no metrics
    assert stats.parts == 4 + 3
    assert storage.list_names(stats.staging) == []
    out = str(tmp_path / 'out')
    dec = package_lib.decrypt_model(pkg, out, identities=[keys.other_key],
                                    trusted=[keys.signer_pub])
    assert dec.fingerprint == info.fingerprint
    assert remote._tree(out) == remote._tree(local)  # pylint: disable=protected-access
  finally:
    cluster.close()
