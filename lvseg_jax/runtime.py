"""Process-level runtime defaults: XLA CPU flags measured to speed up lvseg_jax training.

`configure_xla_cpu()` must run before JAX creates its backends (before the first computation
or `jax.devices()` call); `main.py` and `ablate.py` call it first thing. It only *adds* flags
to `XLA_FLAGS`: a flag already there (set by the user) is left alone, so every default can be
overridden from the environment, e.g.

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
"""

from importlib import metadata
import logging
import os

XLA_CPU_DEFAULTS: tuple[str, ...] = (
    '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution',
)
# jaxlib version prefixes the defaults were measured with (and are known to parse in).
MEASURED_JAXLIB: tuple[str, ...] = ('0.10.',)

DISABLE_ENV = 'LVSEG_XLA_DEFAULTS'


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
  if os.environ.get(DISABLE_ENV, '1').strip().lower() in ('0', 'false', 'no', 'off'):
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
