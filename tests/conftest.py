"""Test setup: 8 forced host CPU devices (before JAX is imported) and the data location."""

import os
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

DATA_ROOT = os.environ.get(
    'LVSEG_DATA_DIR', os.path.join(REPO_ROOT, '..', 'shared', 'data', 'scd'))


@pytest.fixture(scope='session')
def data_root() -> str:
  """Path of the real SCD data. Skips locally when absent; fails under CI=true."""
  if not os.path.isdir(DATA_ROOT):
    message = (f'SCD data not found at {DATA_ROOT!r}; set LVSEG_DATA_DIR to the folder that '
               'holds derived_png_meow2/ and SCD_IMAGES_01/.')
    if os.environ.get('CI', '').lower() == 'true':
      pytest.fail(message)
    pytest.skip(message)
  return os.path.abspath(DATA_ROOT)
