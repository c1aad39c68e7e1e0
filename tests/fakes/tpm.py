"""TEST-ONLY: a software TPM 2.0 behind tpm2-pkcs11, as on a device.

What runs (all Debian packages; `make test` installs them):

* ``swtpm socket --tpm2`` (package ``swtpm``) on two free 127.0.0.1 ports
  (TPM commands and control), its state in a temporary directory, started
  with ``--flags not-need-init,startup-clear`` so it is usable at once;
* a private D-Bus session bus (``dbus-daemon``, socket in the temporary
  directory) and ``tpm2-abrmd`` (the TPM2 access broker and resource
  manager, package ``tpm2-abrmd``; client library ``libtss2-tcti-tabrmd0``)
  on it, in front of swtpm. Without a resource manager, every process that
  exits with objects loaded leaks TPM transient slots (swtpm has three):
  after three `pkcs11-tool` runs the next load fails with "out of memory for
  object contexts". On a device the kernel's resource manager
  (``/dev/tpmrm0``) plays this part;
* tpm2-pkcs11 (package ``libtpm2-pkcs11-1``), its store (an sqlite file) in
  the temporary directory, reaching the TPM through the broker.

The environment of this process is pointed at it (``TPM2_PKCS11_TCTI``,
``TPM2_PKCS11_STORE``, ``DBUS_SESSION_BUS_ADDRESS``, ``TSS2_LOG``), so the
backend in this process and CLI subprocesses use it. tpm2-pkcs11 reads them
when the module is first initialised, so there is one Tpm per process; the
state is fresh each time, so the TPM's dictionary-attack counter (raised by
unclean shutdowns of earlier runs) never locks it.

Tokens are initialised and keys generated with ``pkcs11-tool`` (package
``opensc``), as an operator would on a device; private keys are created
inside the TPM, sensitive and never extractable.
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import List, Optional

MODULE = '/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so'
TABRMD_TCTI = '/usr/lib/x86_64-linux-gnu/libtss2-tcti-tabrmd.so.0'
# Debian package that provides each thing needed.
REQUIREMENTS = (
    ('swtpm', 'swtpm'),
    ('tpm2-abrmd', 'tpm2-abrmd'),
    ('dbus-daemon', 'dbus'),
    ('pkcs11-tool', 'opensc'),
    (MODULE, 'libtpm2-pkcs11-1'),
    (TABRMD_TCTI, 'libtss2-tcti-tabrmd0'),
)

_BUS_CONF = """<!DOCTYPE busconfig PUBLIC
 "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


def missing() -> List[str]:
  """Debian packages whose files are missing (empty when all is there)."""
  out = []
  for what, package in REQUIREMENTS:
    found = os.path.exists(what) if what.startswith('/') else shutil.which(
        what, path=os.environ.get('PATH', '') + ':/usr/sbin:/sbin')
    if not found and package not in out:
      out.append(package)
  return out


def _free_port_pair() -> int:
  """A free 127.0.0.1 port P with P + 1 free too.

  The tss2 swtpm TCTI reaches the control channel at the command port + 1.
  """
  for _ in range(50):
    with socket.socket() as a:
      a.bind(('127.0.0.1', 0))
      port = a.getsockname()[1]
      if port >= 65535:
        continue
      with socket.socket() as b:
        try:
          b.bind(('127.0.0.1', port + 1))
        except OSError:
          continue
      return port
  raise RuntimeError('no two consecutive free ports on 127.0.0.1')


def _wait(predicate, what: str, proc: subprocess.Popen, log: str,
          timeout: float = 20.0) -> None:
  deadline = time.monotonic() + timeout
  while not predicate():
    if proc.poll() is not None:
      raise RuntimeError(f'{what} exited with {proc.returncode}: '
                         f'{_tail(log)}')
    if time.monotonic() > deadline:
      raise RuntimeError(f'{what} did not start within {timeout:.0f} s: '
                         f'{_tail(log)}')
    time.sleep(0.05)


def _tail(path: str) -> str:
  try:
    with open(path, 'r', errors='replace') as f:
      return f.read()[-1500:]
  except OSError:
    return '(no log)'


def _listening(port: int) -> bool:
  try:
    with socket.create_connection(('127.0.0.1', port), timeout=0.5):
      return True
  except OSError:
    return False


class Tpm:
  """swtpm + tpm2-abrmd + tpm2-pkcs11 in a temporary directory."""

  module = MODULE

  def __init__(self, root: Optional[str] = None):
    gone = missing()
    if gone:
      raise RuntimeError(
          'the TPM tests need Debian packages that are not installed: '
          f'apt-get install {" ".join(gone)} (make test installs them)')
    self.root = root or tempfile.mkdtemp(prefix='tfxe-tpm-')
    self._procs: List[subprocess.Popen] = []
    self._n = 0
    try:
      self._start()
    except BaseException:
      self.stop()
      raise

  def _spawn(self, argv, log_name: str) -> subprocess.Popen:
    log_path = os.path.join(self.root, log_name)
    with open(log_path, 'wb') as log:
      proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, start_new_session=True)
    self._procs.append(proc)
    return proc

  def _start(self) -> None:
    state = os.path.join(self.root, 'tpm-state')
    self.store = os.path.join(self.root, 'tpm2-pkcs11-store')
    os.makedirs(state)
    os.makedirs(self.store)
    self.port = _free_port_pair()
    self.ctrl_port = self.port + 1
    swtpm = self._spawn(
        ['swtpm', 'socket', '--tpm2',
         '--server', f'type=tcp,port={self.port},bindaddr=127.0.0.1',
         '--ctrl', f'type=tcp,port={self.ctrl_port},bindaddr=127.0.0.1',
         '--tpmstate', f'dir={state}',
         '--flags', 'not-need-init,startup-clear'], 'swtpm.log')
    _wait(lambda: _listening(self.port), 'swtpm', swtpm,
          os.path.join(self.root, 'swtpm.log'))

    bus_socket = os.path.join(self.root, 'bus')
    conf = os.path.join(self.root, 'bus.conf')
    with open(conf, 'w') as f:
      f.write(_BUS_CONF.format(socket=bus_socket))
    dbus = self._spawn(['dbus-daemon', f'--config-file={conf}', '--nofork'],
                       'dbus.log')
    _wait(lambda: os.path.exists(bus_socket), 'dbus-daemon', dbus,
          os.path.join(self.root, 'dbus.log'))
    self.bus = f'unix:path={bus_socket}'

    self.bus_name = f'com.intel.tss2.Tabrmd.tfxe{os.getpid()}'
    argv = ['tpm2-abrmd', '--session', f'--dbus-name={self.bus_name}',
            f'--tcti=swtpm:host=127.0.0.1,port={self.port}', '--flush-all']
    if os.geteuid() == 0:
      argv.append('--allow-root')
    env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=self.bus)
    log_path = os.path.join(self.root, 'tpm2-abrmd.log')
    with open(log_path, 'wb') as log:
      abrmd = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, env=env,
                               start_new_session=True)
    self._procs.append(abrmd)

    self.env = {
        'TPM2_PKCS11_TCTI': f'tabrmd:bus_name={self.bus_name},'
                            'bus_type=session',
        'TPM2_PKCS11_STORE': self.store,
        'DBUS_SESSION_BUS_ADDRESS': self.bus,
        # tss2 logs TPM errors on stderr; the backend reports them typed.
        'TSS2_LOG': 'all+NONE',
    }
    os.environ.update(self.env)
    # The broker is up when the module lists the TPM's (empty) slot.
    _wait(self._module_answers, 'tpm2-abrmd', abrmd, log_path)

  def _module_answers(self) -> bool:
    r = subprocess.run(['pkcs11-tool', '--module', MODULE, '-L'],
                       capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, **self.env))
    return r.returncode == 0 and 'Slot 0' in r.stdout

  def _tool(self, *args: str) -> str:
    r = subprocess.run(['pkcs11-tool', '--module', MODULE, *args],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, **self.env))
    if r.returncode != 0:
      raise RuntimeError(f'pkcs11-tool {args[0]} ... failed '
                         f'({r.returncode}): {r.stderr[-1500:]}')
    return r.stdout

  def _free_slot(self) -> str:
    """The slot id (hex) of the token tpm2-pkcs11 offers for initialising."""
    out = self._tool('-L')
    slot = None
    for line in out.splitlines():
      if line.startswith('Slot '):
        slot = line.split('(', 1)[1].split(')', 1)[0]
      elif 'uninitialized' in line and slot:
        return slot
    raise RuntimeError(f'no uninitialised tpm2-pkcs11 slot: {out}')

  def new_token(self, pin: str, so_pin: str = '87654321',
                label: Optional[str] = None) -> str:
    """Initialises a token (pkcs11-tool --init-token, --init-pin)."""
    from tfx_encrypt.keys import pkcs11 as backend  # pylint: disable=g-import-not-at-top
    self._n += 1
    label = label or f'tfxe-tpm-{os.getpid()}-{self._n}'
    self._tool('--slot', self._free_slot(), '--init-token', '--label', label,
               '--so-pin', so_pin)
    self._tool('--token-label', label, '--login', '--login-type', 'so',
               '--so-pin', so_pin, '--init-pin', '--pin', pin)
    backend.refresh_modules()
    return label

  def generate(self, token: str, pin: str, label: str, key_type: str,
               key_id: str = '01') -> None:
    """A key pair generated inside the TPM (pkcs11-tool --keypairgen).

    key_type: pkcs11-tool's form, e.g. 'rsa:3072' or 'EC:prime256v1'.
    """
    self._tool('--token-label', token, '--login', '--pin', pin,
               '--keypairgen', '--key-type', key_type, '--label', label,
               '--id', key_id)

  def export_public(self, token: str, label: str, path: str) -> str:
    """The public key as DER SubjectPublicKeyInfo, as pkcs11-tool writes it."""
    self._tool('--token-label', token, '--read-object', '--type', 'pubkey',
               '--label', label, '--output-file', path)
    return path

  def objects(self, token: str, pin: str) -> str:
    return self._tool('--token-label', token, '--login', '--pin', pin, '-O')

  def uri(self, token: str, label: str, *, pin_file: Optional[str] = None,
          key_id: Optional[str] = None) -> str:
    path = f'pkcs11:token={token};object={label}'
    if key_id:
      path += f';id=%{key_id}'
    q = [f'module-path={MODULE}']
    if pin_file:
      q.append(f'pin-source=file:{pin_file}')
    return path + '?' + '&'.join(q)

  def write_pin_file(self, pin: str) -> str:
    self._n += 1
    path = os.path.join(self.root, f'pin-{self._n}')
    with open(path, 'w') as f:
      f.write(pin + '\n')
    os.chmod(path, 0o600)
    return path

  def stop(self) -> None:
    """Stops the broker, the bus and swtpm (in that order); removes state."""
    from tfx_encrypt.keys import pkcs11 as backend  # pylint: disable=g-import-not-at-top
    # Forget the loaded module, so that refresh_modules() (SoftHSM tests)
    # does not re-initialise tpm2-pkcs11 against a stopped TPM.
    with backend._MODULES_LOCK:  # pylint: disable=protected-access
      backend._MODULES.pop(os.path.realpath(MODULE), None)  # pylint: disable=protected-access
    for proc in reversed(self._procs):
      if proc.poll() is None:
        proc.terminate()
        try:
          proc.wait(10)
        except subprocess.TimeoutExpired:
          proc.kill()
          proc.wait()
    self._procs = []
    for k in getattr(self, 'env', {}):
      if os.environ.get(k) == self.env[k]:
        del os.environ[k]
    shutil.rmtree(self.root, ignore_errors=True)
