"""Hand-written CPU kernels, called from JAX through XLA's FFI.

One kernel so far: LayerNorm fused with the ReLU after it (`csrc/layer_norm_relu.cc`), forward
and backward. XLA:CPU runs that layer as several fusions and reductions; the kernel does two
passes over the activation each way on XLA's intra-op thread pool (docs/BENCHMARKS.md,
"Ninth run"). `lvseg_jax.norms.LayerNorm` uses it on the CPU and falls back to the XLA
formulas elsewhere, for other dtypes, or when it cannot be built.

The source is compiled on first use with the system C++ compiler against the FFI headers that
ship with jaxlib, and cached per source, jaxlib version and CPU (`-march=native`) under
`$LVSEG_KERNEL_CACHE` (default `~/.cache/lvseg_jax/kernels`). Set `LVSEG_CPU_KERNELS=0` to
never build or use it (the model's `norm_kernel='xla'` does the same per model).
"""

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_SOURCE = pathlib.Path(__file__).parent / 'csrc' / 'layer_norm_relu.cc'
_FWD_TARGET = 'lvseg_layer_norm_relu_fwd'
_BWD_TARGET = 'lvseg_layer_norm_relu_bwd'
_FLAGS = ('-O3', '-std=c++17', '-fopenmp-simd', '-shared', '-fPIC', '-Wno-attributes',
          '-Wno-return-type')
# Tried first; a compiler that rejects it (e.g. on some ARM toolchains) builds without it.
_NATIVE_FLAG = '-march=native'
_lock = threading.Lock()


class KernelBuildError(RuntimeError):
  """The C++ kernel could not be compiled or loaded."""


def _cpu_identity() -> str:
  """What `-march=native` depends on: the machine and the CPU's feature flags."""
  flags = ''
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith(('flags', 'Features', 'model name')):
          flags += line
  except OSError:
    pass
  return f'{platform.machine()} {flags}'


def cache_dir() -> pathlib.Path:
  default = pathlib.Path.home() / '.cache' / 'lvseg_jax' / 'kernels'
  return pathlib.Path(os.environ.get('LVSEG_KERNEL_CACHE', default))


def _library_path(compiler: str) -> pathlib.Path:
  import jaxlib  # pylint: disable=import-outside-toplevel
  key = hashlib.sha256()
  for part in (_SOURCE.read_bytes(), ' '.join((*_FLAGS, _NATIVE_FLAG)).encode(),
               compiler.encode(),
               jaxlib.__version__.encode(), jax.ffi.include_dir().encode(),
               _cpu_identity().encode()):
    key.update(part)
    key.update(b'\0')
  return cache_dir() / f'layer_norm_relu-{key.hexdigest()[:16]}.so'


def build() -> pathlib.Path:
  """Compiles the kernel library (or finds it in the cache) and returns its path.

  Raises:
    KernelBuildError: no C++ compiler, or the compilation failed (with the compiler's output).
  """
  compiler = os.environ.get('CXX') or shutil.which('c++') or shutil.which('g++')
  if not compiler:
    raise KernelBuildError('no C++ compiler found (set CXX or install g++)')
  path = _library_path(compiler)
  if path.exists():
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  # Compile to a private file and rename it into place, so that processes building at the
  # same time never load a half-written library.
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=path.parent)
  os.close(fd)
  try:
    for extra in ([_NATIVE_FLAG], []):
      cmd = [compiler, *_FLAGS, *extra, f'-I{jax.ffi.include_dir()}', str(_SOURCE), '-o', tmp]
      logging.info('Building the LayerNorm+ReLU CPU kernel: %s', ' '.join(cmd))
      result = subprocess.run(cmd, capture_output=True, text=True, check=False)
      if result.returncode == 0:
        break
    else:
      raise KernelBuildError(f'{" ".join(cmd)} failed:\n{result.stderr[-4000:]}')
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


@functools.cache
def _register() -> None:
  library = ctypes.CDLL(str(build()))
  jax.ffi.register_ffi_target(_FWD_TARGET, jax.ffi.pycapsule(library.LvsegLayerNormReluFwd),
                              platform='cpu')
  jax.ffi.register_ffi_target(_BWD_TARGET, jax.ffi.pycapsule(library.LvsegLayerNormReluBwd),
                              platform='cpu')


def enabled() -> bool:
  """Whether `LVSEG_CPU_KERNELS` allows the kernels (anything but 0 / false / no / off)."""
  return os.environ.get('LVSEG_CPU_KERNELS', '1').lower() not in ('0', 'false', 'no', 'off')


@functools.cache
def _available() -> bool:
  try:
    _register()
    return True
  except (KernelBuildError, OSError, AttributeError) as e:
    logging.warning('LayerNorm+ReLU CPU kernel unavailable, using the XLA formulas: %s', e)
    return False


def available() -> bool:
  """Whether the kernel is allowed, built and registered (builds it on the first call)."""
  if not enabled():
    return False
  with _lock:
    return _available()


def layer_norm_relu_fwd(x: Array, scale: Array, bias: Array,
                        epsilon: float) -> tuple[Array, Array, Array, Array]:
  """`relu(LayerNorm(x) * scale + bias)` and the per-sample mean, 1/std and raw variance.

  x is float32 with the sample axis first and channels last; the normalization covers all
  other axes. The raw variance is E[x^2] - E[x]^2 before the clamp at 0.
  """
  n = x.shape[0]
  stat = jax.ShapeDtypeStruct((n,), jnp.float32)
  call = jax.ffi.ffi_call(_FWD_TARGET, (jax.ShapeDtypeStruct(x.shape, jnp.float32), stat, stat,
                                        stat), vmap_method='sequential')
  return call(x, scale, bias, epsilon=np.float32(epsilon))


def layer_norm_relu_bwd(dy: Array, x: Array, scale: Array, bias: Array, mean: Array,
                        inv: Array, var_raw: Array) -> tuple[Array, Array, Array]:
  """dx, and per (sample, channel) sum(dz) and sum(dz * (x - mean)), dz the gradient at the
  ReLU's input."""
  n, c = x.shape[0], x.shape[-1]
  sums = jax.ShapeDtypeStruct((n, c), jnp.float32)
  call = jax.ffi.ffi_call(_BWD_TARGET, (jax.ShapeDtypeStruct(x.shape, jnp.float32), sums, sums),
                          vmap_method='sequential')
  return call(dy, x, scale, bias, mean, inv, var_raw)
