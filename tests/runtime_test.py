"""Tests for lvseg_jax.runtime: XLA CPU defaults are added, overridable and accepted by XLA;
the allocator defaults stop the page faults they are there for."""

import json
import os
import platform
import resource
import subprocess
import sys

import numpy as np
import pytest

from lvseg_jax import runtime

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = runtime.XLA_CPU_DEFAULTS[0]
DEFAULT_NAME = DEFAULT.split('=', 1)[0]


@pytest.fixture
def measured_jaxlib(monkeypatch):
  monkeypatch.setattr(runtime, '_jaxlib_version', lambda: runtime.MEASURED_JAXLIB[0] + '9')


def test_adds_defaults_after_existing_flags(monkeypatch, measured_jaxlib):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  monkeypatch.delenv(runtime.DISABLE_ENV, raising=False)
  flags = runtime.configure_xla_cpu()
  assert flags.split() == ['--xla_force_host_platform_device_count=8', *runtime.XLA_CPU_DEFAULTS]
  assert os.environ['XLA_FLAGS'] == flags
  # Idempotent: a second call adds nothing.
  assert runtime.configure_xla_cpu() == flags


def test_user_setting_wins(monkeypatch, measured_jaxlib):
  user = f'{DEFAULT_NAME}=individual_convolution'
  monkeypatch.setenv('XLA_FLAGS', user)
  assert runtime.configure_xla_cpu() == user
  assert os.environ['XLA_FLAGS'] == user


@pytest.mark.parametrize('value', ['0', 'false', 'OFF'])
def test_disable_env_keeps_flags_but_adds_extra(monkeypatch, measured_jaxlib, value):
  monkeypatch.setenv('XLA_FLAGS', '')
  monkeypatch.setenv(runtime.DISABLE_ENV, value)
  assert runtime.configure_xla_cpu() == ''
  assert runtime.configure_xla_cpu(('--xla_cpu_enable_fast_math=false',)) == (
      '--xla_cpu_enable_fast_math=false')


def test_unmeasured_jaxlib_gets_no_defaults(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '')
  monkeypatch.delenv(runtime.DISABLE_ENV, raising=False)
  monkeypatch.setattr(runtime, '_jaxlib_version', lambda: '99.0.0')
  assert runtime.configure_xla_cpu() == ''


def test_warns_when_backends_exist(monkeypatch, measured_jaxlib, caplog):
  import jax  # pylint: disable=g-import-not-at-top
  jax.devices()  # make sure the backends exist
  monkeypatch.setenv('XLA_FLAGS', '')
  monkeypatch.delenv(runtime.DISABLE_ENV, raising=False)
  with caplog.at_level('WARNING'):
    runtime.configure_xla_cpu()
  assert any('ignores the new flags' in r.getMessage() for r in caplog.records)


_CHILD = r'''
import json, os, sys
sys.path.insert(0, {repo!r})
from lvseg_jax import runtime
flags = runtime.configure_xla_cpu()
import jax, jax.numpy as jnp, numpy as np
rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(2, 32, 32, 8)), jnp.float32)
w = jnp.asarray(rng.normal(size=(3, 3, 8, 16)), jnp.float32)
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
y, vjp = jax.vjp(conv, x, w)
gx, gw = vjp(jnp.ones_like(y))
np.savez(sys.argv[1], y=y, gx=gx, gw=gw)
print(json.dumps(flags))
'''


def _run_child(tmp_path, name, env_update):
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', runtime.DISABLE_ENV)}
  env.update(env_update, JAX_PLATFORMS='cpu')
  out = tmp_path / f'{name}.npz'
  proc = subprocess.run([sys.executable, '-c', _CHILD.format(repo=REPO_ROOT), str(out)],
                        env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout.strip().splitlines()[-1], np.load(out)


def test_xla_accepts_defaults_and_convolutions_agree(tmp_path):
  """A fresh process with the defaults runs (XLA aborts on unknown flags) and computes the same
  convolution, input gradient and weight gradient as one without them."""
  with_flags, a = _run_child(tmp_path, 'defaults', {})
  without, b = _run_child(tmp_path, 'plain', {runtime.DISABLE_ENV: '0'})
  assert without == '""'
  jaxlib_version = runtime._jaxlib_version()  # pylint: disable=protected-access
  if jaxlib_version.startswith(runtime.MEASURED_JAXLIB):
    assert DEFAULT in with_flags
  for name in ('y', 'gx', 'gw'):
    scale = np.max(np.abs(b[name]))
    np.testing.assert_allclose(a[name], b[name], atol=1e-5 * scale, rtol=0, err_msg=name)


# ----------------------------------------------------------------------------- allocator

def test_user_malloc_settings_are_read_from_both_environment_forms(monkeypatch):
  for name in ('GLIBC_TUNABLES', 'MALLOC_ARENA_MAX', 'MALLOC_MMAP_MAX_',
               'MALLOC_TRIM_THRESHOLD_'):
    monkeypatch.delenv(name, raising=False)
  assert runtime._user_malloc_settings() == set()  # pylint: disable=protected-access
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.hugetlb=1:glibc.malloc.arena_max=4')
  monkeypatch.setenv('MALLOC_TRIM_THRESHOLD_', '1000000')
  assert runtime._user_malloc_settings() == {'arena_max', 'trim_threshold'}  # pylint: disable=protected-access


def test_malloc_defaults_disabled_by_environment(monkeypatch):
  monkeypatch.setenv(runtime.MALLOC_DISABLE_ENV, 'off')
  assert runtime.configure_malloc() == {}


@pytest.mark.parametrize('platforms, plugins, on_cpu', [
    ('', [], True),
    ('', ['jax-cuda12-plugin'], False),
    ('cpu', ['jax-cuda12-plugin'], True),
    ('cuda,cpu', [], False),
])
def test_malloc_defaults_only_for_cpu_runs(monkeypatch, platforms, plugins, on_cpu):
  monkeypatch.setenv('JAX_PLATFORMS', platforms)
  monkeypatch.setattr(runtime, '_accelerator_plugins', lambda: plugins)
  assert (runtime._accelerator_reason() is None) == on_cpu  # pylint: disable=protected-access
  if not on_cpu:  # returns before calling mallopt, so safe in this process
    monkeypatch.delenv(runtime.MALLOC_DISABLE_ENV, raising=False)
    assert runtime.configure_malloc() == {}


# A worker thread (as XLA's are) allocates, touches and frees a block larger than a glibc
# thread heap (64 MB) five times; the kernel counts the pages it had to map in.
_MALLOC_CHILD = r'''
import ctypes, json, resource, sys, threading
sys.path.insert(0, {repo!r})
from lvseg_jax import runtime
applied = runtime.configure_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size = {size}
faults = []
def churn():
  for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
worker = threading.Thread(target=churn)
worker.start()
worker.join()
print(json.dumps(dict(applied=applied, faults=faults)))
'''

BLOCK_BYTES = 96 << 20


def _malloc_child(env_update):
  env = {k: v for k, v in os.environ.items()
         if k not in (runtime.MALLOC_DISABLE_ENV, 'GLIBC_TUNABLES') and not k.startswith('MALLOC_')}
  env.update(env_update, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c',
                         _MALLOC_CHILD.format(repo=REPO_ROOT, size=BLOCK_BYTES)],
                        env=env, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _transparent_huge_pages_always() -> bool:
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
      return '[always]' in f.read()
  except OSError:
    return False


@pytest.mark.skipif(not (sys.platform.startswith('linux') and
                         platform.libc_ver()[0] == 'glibc'), reason='glibc allocator only')
def test_malloc_defaults_stop_page_faults_on_reused_large_blocks():
  pages = BLOCK_BYTES // resource.getpagesize()
  tuned = _malloc_child({})
  assert tuned['applied'] == runtime.MALLOC_DEFAULTS
  # After the first round the block comes back from the heap, already mapped.
  assert max(tuned['faults'][1:]) < 0.01 * pages, tuned
  plain = _malloc_child({runtime.MALLOC_DISABLE_ENV: '0'})
  assert plain['applied'] == {}
  if not _transparent_huge_pages_always():  # else the kernel maps 2 MB per fault
    assert min(plain['faults'][1:]) > 0.5 * pages, plain
  # A setting made in the environment wins over the default.
  user = _malloc_child({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'})
  assert 'arena_max' not in user['applied'] and 'mmap_max' in user['applied']
