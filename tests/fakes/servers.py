"""TEST-ONLY: start and stop local servers on free loopback ports."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, Optional


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0,
                  proc: Optional[subprocess.Popen] = None) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if proc is not None and proc.poll() is not None:
      raise RuntimeError(f'server exited early with code {proc.returncode}')
    try:
      with socket.create_connection(('127.0.0.1', port), timeout=0.5):
        return
    except OSError:
      time.sleep(0.05)
  raise RuntimeError(f'nothing listens on 127.0.0.1:{port} after {timeout}s')


def moto_server_path() -> Optional[str]:
  """The moto_server console script of this interpreter's environment."""
  candidate = os.path.join(os.path.dirname(sys.executable), 'moto_server')
  if os.path.exists(candidate):
    return candidate
  return shutil.which('moto_server')


class MotoServer:
  """moto's standalone server (real HTTP, real boto3 clients) on loopback."""

  def __init__(self, env: Optional[Dict[str, str]] = None):
    exe = moto_server_path()
    if exe is None:
      raise RuntimeError("moto_server not found: pip install 'moto[server]'")
    self.port = free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self._log = tempfile.TemporaryFile()
    full_env = dict(os.environ)
    full_env.update(env or {})
    self.proc = subprocess.Popen(
        [exe, '-H', '127.0.0.1', '-p', str(self.port)],
        stdout=self._log, stderr=subprocess.STDOUT, env=full_env)
    try:
      wait_for_port(self.port, proc=self.proc)
    except Exception:
      self.stop()
      raise

  def log(self) -> str:
    self._log.seek(0)
    return self._log.read().decode('utf-8', 'replace')

  def stop(self) -> None:
    """Stops the server (the process we started, by its handle)."""
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait(timeout=10)

  def close(self) -> None:
    self.stop()
    self._log.close()
