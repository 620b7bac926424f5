"""Hand-written CPU kernels, called from JAX through XLA's FFI.

* The full-size passes of a normalization followed by a ReLU (`csrc/norm_relu.cc`): moments,
  affine + ReLU, and the two passes of its backward pass. XLA:CPU runs them as several fusions
  and reductions; the kernels make one pass each on XLA's intra-op thread pool
  (docs/BENCHMARKS.md, "Tenth run"). `lvseg_jax.norms` uses them for BatchNorm, InstanceNorm
  and LayerNorm with `relu=True` on the CPU, and keeps the arithmetic on the statistics in JAX.
  It falls back to the XLA formulas elsewhere, for other dtypes, or when they cannot be built.
  Each of these kernels views its input as (N, P, C): samples first, channels last, everything
  between flattened. Per-statistic inputs and outputs have one value per (sample, channel),
  shape (N, C).
* A 3x3 stride-1 'SAME' convolution of NHWC activations with an HWIO kernel, and its kernel
  gradient (`csrc/conv3x3.cc`), as register-tiled AVX-512 loops; `lvseg_jax.models` uses them
  for the U-Nets' 3x3 convolutions on the CPU (`model.conv_kernel`; docs/BENCHMARKS.md,
  "Eleventh run"). On a CPU without AVX-512 they are built but report themselves unsupported
  (`conv3x3_available()`), and XLA's convolutions are used.

The source is compiled on first use with the system C++ compiler against the FFI headers that
ship with jaxlib, and cached per source, jaxlib version and CPU (`-march=native`) under
`$LVSEG_KERNEL_CACHE` (default `~/.cache/lvseg_jax/kernels`). Set `LVSEG_CPU_KERNELS=0` to
never build or use them (the model's `norm_kernel='xla'` and `conv_kernel='xla'` do the same
per model).
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

Array = jax.Array

_CSRC = pathlib.Path(__file__).parent / 'csrc'
_SOURCES = (_CSRC / 'norm_relu.cc', _CSRC / 'conv3x3.cc')
_HEADERS = (_CSRC / 'common.h',)
# FFI target name -> the handler symbol in the library.
_TARGETS = {
    'lvseg_norm_moments': 'LvsegNormMoments',
    'lvseg_norm_affine_relu': 'LvsegNormAffineRelu',
    'lvseg_norm_relu_grad_sums': 'LvsegNormReluGradSums',
    'lvseg_norm_relu_grad_apply': 'LvsegNormReluGradApply',
    'lvseg_conv3x3': 'LvsegConv3x3',
    'lvseg_conv3x3_kernel_grad': 'LvsegConv3x3KernelGrad',
}
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
  sources = tuple(f.read_bytes() for f in (*_SOURCES, *_HEADERS))
  for part in (*sources, ' '.join((*_FLAGS, _NATIVE_FLAG)).encode(), compiler.encode(),
               jaxlib.__version__.encode(), jax.ffi.include_dir().encode(),
               _cpu_identity().encode()):
    key.update(part)
    key.update(b'\0')
  return cache_dir() / f'lvseg_kernels-{key.hexdigest()[:16]}.so'


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
      cmd = [compiler, *_FLAGS, *extra, f'-I{jax.ffi.include_dir()}', *map(str, _SOURCES),
             '-o', tmp]
      logging.info('Building the CPU kernels: %s', ' '.join(cmd))
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
def _register() -> ctypes.CDLL:
  library = ctypes.CDLL(str(build()))
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                platform='cpu')
  return library


def enabled() -> bool:
  """Whether `LVSEG_CPU_KERNELS` allows the kernels (anything but 0 / false / no / off)."""
  return os.environ.get('LVSEG_CPU_KERNELS', '1').lower() not in ('0', 'false', 'no', 'off')


@functools.cache
def _available() -> bool:
  try:
    _register()
    return True
  except (KernelBuildError, OSError, AttributeError) as e:
    logging.warning('CPU kernels (normalization, convolution) unavailable, using XLA: %s', e)
    return False


def available() -> bool:
  """Whether the kernels are allowed, built and registered (builds them on the first call)."""
  if not enabled():
    return False
  with _lock:
    return _available()


def _per_statistic(x: Array) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((x.shape[0], x.shape[-1]), jnp.float32)


def _call(target: str, results, *args):
  return jax.ffi.ffi_call(target, results, vmap_method='sequential')(*args)


def moments(x: Array) -> tuple[Array, Array]:
  """Per (sample, channel): sum of x and of x^2 over all the axes between."""
  return _call('lvseg_norm_moments', (_per_statistic(x),) * 2, x)


def affine_relu(x: Array, a: Array, b: Array) -> Array:
  """relu(x * a + b) with a, b per (sample, channel)."""
  return _call('lvseg_norm_affine_relu', jax.ShapeDtypeStruct(x.shape, jnp.float32), x, a, b)


def relu_grad_sums(dy: Array, x: Array, a: Array, b: Array) -> tuple[Array, Array]:
  """Per (sample, channel): sum of dz and of dz * x, dz = dy where x * a + b > 0, else 0."""
  return _call('lvseg_norm_relu_grad_sums', (_per_statistic(x),) * 2, dy, x, a, b)


def relu_grad_apply(dy: Array, x: Array, a: Array, b: Array, k: Array, xk: Array,
                    off: Array) -> Array:
  """dz * k + x * xk + off (dz as in `relu_grad_sums`), all coefficients per (sample, channel)."""
  return _call('lvseg_norm_relu_grad_apply', jax.ShapeDtypeStruct(x.shape, jnp.float32), dy, x,
               a, b, k, xk, off)


@functools.cache
def _conv3x3_supported() -> bool:
  return bool(_register().LvsegConv3x3Supported())


def conv3x3_available() -> bool:
  """Whether the 3x3 convolution kernels can run: `available()` and built with AVX-512."""
  return available() and _conv3x3_supported()


def conv3x3(x: Array, kernel: Array) -> Array:
  """3x3 stride-1 'SAME' convolution, NHWC x HWIO -> NHWC; output channels a multiple of 16."""
  n, h, w, _ = x.shape
  return _call('lvseg_conv3x3', jax.ShapeDtypeStruct((n, h, w, kernel.shape[-1]), jnp.float32),
               x, kernel)


def conv3x3_kernel_grad(x: Array, dy: Array) -> Array:
  """The kernel gradient of `conv3x3`: (3, 3, C, O) for x (N, H, W, C) and dy (N, H, W, O)."""
  return _call('lvseg_conv3x3_kernel_grad',
               jax.ShapeDtypeStruct((3, 3, x.shape[-1], dy.shape[-1]), jnp.float32), x, dy)
