"""lvseg-jax as an installed package: the wheel carries the library, the configs and the shipped
model, and `import lvseg_jax` and the `lvseg` command work from any folder without the repo."""

import glob
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from lvseg_jax import pretrained

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
  """(wheel, site folder) of the package built from a copy of the sources and installed with
  `pip install --target` (no dependencies: the test's environment already has them)."""
  src = tmp_path_factory.mktemp('src')
  for name in ('lvseg_jax', 'configs'):
    shutil.copytree(os.path.join(REPO, name), src / name,
                    ignore=shutil.ignore_patterns('__pycache__'))
  for name in ('pyproject.toml', 'requirements.txt', 'README.md'):
    shutil.copy(os.path.join(REPO, name), src / name)
  wheels, site = tmp_path_factory.mktemp('wheels'), tmp_path_factory.mktemp('site')
  pip = [sys.executable, '-m', 'pip', '-q', '--disable-pip-version-check']
  subprocess.run(pip + ['wheel', '--no-deps', '--no-build-isolation', '-w', str(wheels),
                        str(src)], check=True, timeout=300)
  (wheel,) = glob.glob(str(wheels / '*.whl'))
  subprocess.run(pip + ['install', '--no-deps', '--target', str(site), wheel], check=True,
                 timeout=300)
  return wheel, str(site)


def test_the_wheel_carries_library_configs_and_shipped_model(installed):
  wheel, _ = installed
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    entry_points = z.read(next(n for n in names if n.endswith('entry_points.txt'))).decode()
  for name in pretrained.names():
    for file in ('config.json', 'variables.npz', 'MODEL.md'):
      assert f'lvseg_jax/pretrained/{name}/{file}' in names
  assert {'configs/default.py', 'configs/clinical.py', 'lvseg_jax/segmenter.py',
          'lvseg_jax/data/dataset.py', 'lvseg_jax/predict/pipeline.py'} <= names
  assert not any(n.startswith('tests/') for n in names)
  assert 'lvseg = lvseg_jax.cli:console' in entry_points


def _run_outside_the_repo(site, cwd, args):
  env = dict(os.environ, PYTHONPATH=site)
  return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
                        check=False)


def test_installed_package_imports_and_predicts_from_any_folder(installed, data_root,
                                                               tmp_path):
  _, site = installed
  done = _run_outside_the_repo(site, tmp_path, [sys.executable, '-c', (
      'import lvseg_jax, lvseg_jax.pretrained as p; '
      'print(lvseg_jax.__file__); print(p.path()); '
      'print(lvseg_jax.Segmenter.pretrained().num_classes)')])
  assert done.returncode == 0, done.stderr
  module, model, classes = done.stdout.split()
  assert module.startswith(site) and model.startswith(site) and classes == '3'

  # The console command on two PNG frames, with the shipped model (no --workdir, no --config).
  images = tmp_path / 'images_in'
  images.mkdir()
  for name in ('SC-HF-I-01-IM-0001-0048.dcm.png', 'SC-HF-I-01-IM-0001-0059.dcm.png'):
    shutil.copy(os.path.join(data_root, 'derived_png_meow2', 'images', name), images / name)
  done = _run_outside_the_repo(site, tmp_path, [
      os.path.join(site, 'bin', 'lvseg'), 'predict', f'--input={images}',
      f'--output={tmp_path / "out"}', f'--config.compilation_cache_dir={tmp_path / "xla"}'])
  assert done.returncode == 0, done.stderr[-3000:]
  with open(tmp_path / 'out' / 'summary.json') as f:
    summary = json.load(f)
  assert summary['workdir'] == os.path.join(site, 'lvseg_jax', 'pretrained', pretrained.DEFAULT)
  (series,) = summary['series']
  assert series['num_frames'] == 2
  assert len(glob.glob(str(tmp_path / 'out' / '*' / 'masks' / '*.png'))) == 2
