"""Test setup: 8 forced host CPU devices (before JAX is imported) and the data location."""

import copy
import functools
import os
import shutil
import sys

# Appended, not set by default: an exported XLA_FLAGS must not leave the multi-device tests
# comparing one device with itself (they also assert the device count).
os.environ['XLA_FLAGS'] = ' '.join(filter(None, (os.environ.get('XLA_FLAGS', ''),
                                                 '--xla_force_host_platform_device_count=8')))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import numpy as np  # noqa: E402
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


def make_tiny_config(data_root: str, cache_dir: str, **train_overrides):
  """The smoke config shrunk to seconds on the real data (32 px, width 4, depth 2, 1 device),
  with its npz cache in `cache_dir` and `config.train` fields overridden by keyword."""
  from configs import smoke  # pylint: disable=g-import-not-at-top
  config = smoke.get_config()
  config.data.root = data_root
  config.data.cache_dir = cache_dir
  config.data.image_size = 32
  config.model.base_width = 4
  config.model.depth = 2
  config.eval.batch_size = 64
  config.train.num_devices = 1
  for key, value in train_overrides.items():
    setattr(config.train, key, value)
  return config


@pytest.fixture(scope='session')
def tiny_config(data_root, tmp_path_factory):
  """`tiny_config(**train_overrides)`: see `make_tiny_config`. One npz cache for the session,
  so each training run after the first reads the preprocessed arrays instead of the PNGs."""
  return functools.partial(make_tiny_config, data_root, str(tmp_path_factory.mktemp('cache')))


SMOKE_STEPS_PER_EPOCH = 4   # 64-frame batches of the 260 official training frames


@pytest.fixture(scope='session')
def smoke_run(tiny_config, tmp_path_factory):
  """One trained smoke workdir for the session: (config, workdir, final results).

  Data-parallel over 2 devices with the shard_map step; 8 steps of 64 frames, 2 epochs of
  4 steps; checkpoints at steps 3, 6 and 8; evaluations at the end of each epoch (steps 4, 8).
  Tests that change the workdir take `smoke_copy`.
  """
  from lvseg_jax import train  # pylint: disable=g-import-not-at-top
  config = tiny_config(num_steps=8, batch_size=64, checkpoint_every_steps=3, keep_checkpoints=5,
                       eval_every_epochs=1, num_devices=2, parallel='shard_map')
  workdir = str(tmp_path_factory.mktemp('smoke_run') / 'work')
  results = train.train_and_evaluate(config, workdir)
  return config, workdir, results


@pytest.fixture
def smoke_copy(smoke_run, tmp_path):
  """(config, workdir) of a copy of the session's smoke run, for a test that changes them."""
  config, workdir, _ = smoke_run
  target = str(tmp_path / 'smoke_copy')
  shutil.copytree(workdir, target)
  return copy.deepcopy(config), target


def assert_frames_match_scd(frames, expected):
  """Frames loaded from NIfTI volumes made of SCD frames (`expected`: {case: {phase: SCD frames
  by slice}}) are the contoured SCD frames: image, cavity and epicardium masks, spacing."""
  for case, phases in expected.items():
    for phase, scd_frames in phases.items():
      contoured = [f for f in scd_frames if f.mask is not None and f.mask.any()]
      got = [f for f in frames if f.case == case and f.phase_index == phase]
      assert len(got) == len(contoured) > 0, (case, phase)
      by_slice = {f.slice_index: f for f in scd_frames}
      for f in got:
        scd = by_slice[f.slice_index]
        np.testing.assert_array_equal(f.image, scd.image)
        np.testing.assert_array_equal(f.mask, scd.mask)
        if scd.epi_mask is not None:   # label volumes hold cavity and myocardium: their union
          np.testing.assert_array_equal(f.epi_mask, scd.epi_mask | scd.mask)
        # Spacing through the float32 NIfTI header: 2^-24 relative.
        np.testing.assert_allclose(f.pixel_spacing, scd.pixel_spacing, rtol=1e-6)
        assert f.spacing_between_slices == pytest.approx(10.0)
