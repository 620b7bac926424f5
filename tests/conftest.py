"""Test setup: 8 forced host CPU devices (before JAX is imported) and the data location."""

import functools
import os
import sys

# Appended, not set by default: an exported XLA_FLAGS must not leave the multi-device tests
# comparing one device with itself (they also assert the device count).
os.environ['XLA_FLAGS'] = ' '.join(filter(None, (os.environ.get('XLA_FLAGS', ''),
                                                 '--xla_force_host_platform_device_count=8')))
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


def make_tiny_config(data_root: str, tmp_path, **train_overrides):
  """The smoke config shrunk to seconds on the real data (32 px, width 4, depth 2, 1 device),
  with its npz cache under `tmp_path` and `config.train` fields overridden by keyword."""
  from configs import smoke  # pylint: disable=g-import-not-at-top
  config = smoke.get_config()
  config.data.root = data_root
  config.data.cache_dir = str(tmp_path / 'cache')
  config.data.image_size = 32
  config.model.base_width = 4
  config.model.depth = 2
  config.eval.batch_size = 64
  config.train.num_devices = 1
  for key, value in train_overrides.items():
    setattr(config.train, key, value)
  return config


@pytest.fixture(scope='session')
def tiny_config(data_root):
  """`tiny_config(tmp_path, **train_overrides)`: see `make_tiny_config`."""
  return functools.partial(make_tiny_config, data_root)
