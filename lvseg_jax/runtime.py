"""Process-level runtime defaults measured to speed up lvseg_jax training on the CPU.

`configure_process()` applies both parts, in order; `main.py`, `ablate.py` and the bench
scripts call it first thing:
  * `configure_malloc()`: glibc allocator settings, so that the train step stops returning its
    scratch memory to the kernel and faulting it in again at every step (below);
  * `configure_xla_cpu()`: XLA CPU flags.

`configure_xla_cpu()` must run before JAX creates its backends (before the first computation
or `jax.devices()` call). It only *adds* flags to `XLA_FLAGS`: a flag already there (set by
the user) is left alone, so every default can be overridden from the environment, e.g.

  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=individual_convolution python main.py ...

and `LVSEG_XLA_DEFAULTS=0` disables them all.

Defaults (docs/BENCHMARKS.md, "Training throughput", has the measurements):
  * `--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`: XLA:CPU runs
    convolutions with its Eigen kernels instead of YNNPACK (YNNPACK keeps the dots and
    reductions). On the 2-core AVX-512 benchmark machine the train step was 0-30% faster with
    it (BN U-Net and IBU-Net, 128x128, batch 8, widths 16 and 32; never slower). Same
    mathematics; float32 results differ only by summation-order rounding. Only added for the
    jaxlib versions it was measured with (`MEASURED_JAXLIB`): XLA aborts on a flag it does not
    know, and XLA:CPU's experimental flags come and go between releases.

Allocator (`configure_malloc`, Linux with glibc only): every execution of a compiled XLA:CPU
step allocates its temporary buffer (174 MB for the U-Net, width 16, 128x128, batch 8), and
Eigen's convolutions allocate their packing blocks (38-151 MB each) per call. glibc serves
blocks that large with a fresh `mmap` and returns them with `munmap` on free, so the kernel
maps and zero-fills every page again each step: 43,000 page faults and ~85 ms of system time
per ~300 ms step on the 2-core benchmark machine. The defaults keep every thread on the main
heap (`M_ARENA_MAX=1`: other arenas hand blocks over 64 MB to `mmap` whatever `M_MMAP_MAX`
says), serve large blocks from it (`M_MMAP_MAX=0`) and keep freed memory there for reuse
(`M_TRIM_THRESHOLD=-1`: no trimming). No page faults after the first steps, and the step is
2-8% faster (docs/BENCHMARKS.md, "Sixth run"). The cost: the process keeps its peak heap until
it exits, and the heap can grow in steps when freed blocks no longer line up (measured: 2.08 to
2.30 GB over a 2,880-step `configs/cpu.py` run, flat after step ~765; 1.69 GB peak without).
Only for CPU runs (no JAX GPU/TPU plugin installed, or JAX_PLATFORMS=cpu), where it was
measured. Call it before other threads
start allocating (before JAX runs anything).
Settings made through `GLIBC_TUNABLES` or glibc's `MALLOC_*_` variables win, and
`LVSEG_MALLOC_DEFAULTS=0` turns the defaults off.
"""

import ctypes
from importlib import metadata
import logging
import os
import platform

XLA_CPU_DEFAULTS: tuple[str, ...] = (
    '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution',
)
# jaxlib version prefixes the defaults were measured with (and are known to parse in).
MEASURED_JAXLIB: tuple[str, ...] = ('0.10.',)

DISABLE_ENV = 'LVSEG_XLA_DEFAULTS'

# glibc tunable name (GLIBC_TUNABLES=glibc.malloc.<name>=...) -> value set by mallopt.
MALLOC_DEFAULTS: dict[str, int] = {
    'arena_max': 1,
    'mmap_max': 0,
    'trim_threshold': -1,  # never give the heap's top back to the kernel
}
# mallopt parameter numbers (glibc's malloc.h) and the older environment variables.
_MALLOPT_PARAM = {'trim_threshold': -1, 'mmap_max': -4, 'arena_max': -8}
_MALLOC_ENV_ALIAS = {'trim_threshold': 'MALLOC_TRIM_THRESHOLD_', 'mmap_max': 'MALLOC_MMAP_MAX_',
                     'arena_max': 'MALLOC_ARENA_MAX'}
MALLOC_DISABLE_ENV = 'LVSEG_MALLOC_DEFAULTS'


def _disabled(env_name: str) -> bool:
  return os.environ.get(env_name, '1').strip().lower() in ('0', 'false', 'no', 'off')


def _user_malloc_settings() -> set[str]:
  """Names of the allocator settings the environment already makes."""
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  named = {item.split('=', 1)[0].strip() for item in tunables.split(':')}
  return {name for name in MALLOC_DEFAULTS
          if f'glibc.malloc.{name}' in named or _MALLOC_ENV_ALIAS[name] in os.environ}


def _accelerator_plugins() -> list[str]:
  """Installed JAX GPU/TPU plugin distributions (JAX would run on an accelerator)."""
  names = {(d.metadata['Name'] or '').lower().replace('_', '-')
           for d in metadata.distributions()}
  return sorted(n for n in names if n.startswith(('jax-cuda', 'jax-rocm', 'libtpu')))


def _accelerator_reason() -> str | None:
  """Why JAX will run on a GPU/TPU, or None where it runs on the CPU.

  JAX_PLATFORMS decides when set; otherwise an installed accelerator plugin does.
  """
  platforms = {p.strip() for p in os.environ.get('JAX_PLATFORMS', '').split(',') if p.strip()}
  if platforms:
    return None if platforms == {'cpu'} else f'JAX_PLATFORMS={",".join(sorted(platforms))}'
  plugins = _accelerator_plugins()
  return f'{", ".join(plugins)} installed' if plugins else None


def configure_malloc() -> dict[str, int]:
  """Applies lvseg_jax's glibc allocator defaults to this process; returns those applied.

  Nothing is changed off Linux/glibc, where JAX will run on a GPU or TPU (an accelerator
  plugin is installed and JAX_PLATFORMS is not `cpu`: the defaults were measured on the CPU
  only), when LVSEG_MALLOC_DEFAULTS is 0/false/no/off, or for a setting the environment already
  makes (`GLIBC_TUNABLES`, `MALLOC_*_`). The settings hold for the rest of the process; calling
  again applies them again.
  """
  if _disabled(MALLOC_DISABLE_ENV):
    return {}
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    logging.info('lvseg_jax: allocator defaults not applied: not Linux with glibc.')
    return {}
  accelerator = _accelerator_reason()
  if accelerator:
    logging.info('lvseg_jax: allocator defaults not applied: JAX runs on an accelerator '
                 '(%s); they were measured on the CPU.', accelerator)
    return {}
  mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  user = _user_malloc_settings()
  applied = {}
  for name, value in MALLOC_DEFAULTS.items():
    if name in user:
      continue
    if mallopt(_MALLOPT_PARAM[name], value) == 1:
      applied[name] = value
    else:
      logging.warning('lvseg_jax: mallopt refused %s=%d.', name, value)
  return applied


def _flag_name(flag: str) -> str:
  return flag.split('=', 1)[0].lstrip('-')


def _jaxlib_version() -> str:
  try:
    return metadata.version('jaxlib')
  except metadata.PackageNotFoundError:
    return ''


def configure_xla_cpu(extra_flags: tuple[str, ...] = ()) -> str:
  """Adds lvseg_jax's XLA CPU defaults (and `extra_flags`) to `XLA_FLAGS`; returns it.

  Flags whose name is already in `XLA_FLAGS` are not touched (the user's setting wins). The
  defaults are skipped when the environment variable LVSEG_XLA_DEFAULTS is 0/false/no/off or
  the installed jaxlib is not one they were measured with; `extra_flags` are added in any
  case. Warns if JAX's backends already exist, because XLA then ignores new flags.
  """
  current = os.environ.get('XLA_FLAGS', '')
  defaults = XLA_CPU_DEFAULTS
  if _disabled(DISABLE_ENV):
    defaults = ()
  elif not _jaxlib_version().startswith(MEASURED_JAXLIB):
    logging.info('lvseg_jax: XLA CPU defaults %s not applied: measured with jaxlib %s, '
                 'installed %r.', defaults, MEASURED_JAXLIB, _jaxlib_version())
    defaults = ()
  present = {_flag_name(f) for f in current.split()}
  added = [f for f in (*defaults, *extra_flags) if _flag_name(f) not in present]
  if not added:
    return current
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    initialized = xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):
    initialized = False
  if initialized:
    logging.warning('lvseg_jax.runtime.configure_xla_cpu() called after JAX initialized its '
                    'backends; XLA ignores the new flags %s.', added)
  flags = ' '.join([current, *added]).strip()
  os.environ['XLA_FLAGS'] = flags
  return flags


def configure_process() -> tuple[dict[str, int], str]:
  """Both process defaults, before JAX starts: the allocator first (before JAX's threads
  allocate), then the XLA flags (read when JAX creates its backends).

  Returns the allocator settings applied and the resulting XLA_FLAGS.
  """
  return configure_malloc(), configure_xla_cpu()
