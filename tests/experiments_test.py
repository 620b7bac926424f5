"""Ablation grids: cells, overrides, running and skipping, the comparison table, the box plot."""

import json
import os
import re
import signal
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from configs import default
from lvseg_jax import experiments
from lvseg_jax import results as results_lib
from lvseg_jax import train


# ----------------------------------------------------------------------------- cells


def test_expand_grid_counts_names_and_drops_overrides_that_do_not_apply():
  grid = {'model.name': ['unet', 'lnu', 'ibu'],
          'model.ibn_mode': ['split', 'sequential', 'blend'], 'seed': [0, 1]}
  cells = experiments.expand_grid(grid)
  # The IBN mode only changes IBU-Net: unet and lnu once per seed, ibu once per mode and seed.
  assert len(cells) == (1 + 1 + 3) * 2
  names = [experiments.cell_name(c) for c in cells]
  assert len(set(names)) == len(names)
  assert names[:2] == ['model.name=unet,seed=0', 'model.name=unet,seed=1']
  assert 'model.ibn_mode=blend,model.name=ibu,seed=1' in names
  assert all('ibn_mode' not in n for n in names if 'model.name=ibu' not in n)
  # The name does not depend on the order of the grid's keys.
  reordered = experiments.expand_grid({'seed': [0, 1], 'model.ibn_mode': ['split'],
                                       'model.name': ['ibu']})
  assert experiments.cell_name(reordered[0]) == 'model.ibn_mode=split,model.name=ibu,seed=0'
  assert experiments.cell_name({}) == 'base'

  # Keys the cell does not set are looked up in the base config.
  base = default.get_config()
  assert base.model.name == 'unet'
  assert experiments.expand_grid({'model.ibn_mode': ['split', 'blend']}, base) == [{}]
  base.model.name = 'ibu'
  assert len(experiments.expand_grid({'model.ibn_mode': ['split', 'blend']}, base)) == 2
  # Augmentation parameters only matter when their component (and augmentation) is on.
  aug = experiments.expand_grid({'augment.enabled': [True, False],
                                 'augment.elastic': [True, False],
                                 'augment.elastic_alpha': [10.0, 34.0]})
  assert aug == [
      {'augment.enabled': True, 'augment.elastic': True, 'augment.elastic_alpha': 10.0},
      {'augment.enabled': True, 'augment.elastic': True, 'augment.elastic_alpha': 34.0},
      {'augment.enabled': True, 'augment.elastic': False},
      {'augment.enabled': False}]
  assert len(experiments.expand_grid(experiments.PRESETS['augment'])) == 4


@pytest.mark.parametrize('grid', [{'seed': 0}, {'seed': []}, {'model.name': 'ibu'},
                                  {'': [1]}, {'model.': [1]}])
def test_expand_grid_rejects_malformed_grids(grid):
  with pytest.raises(ValueError, match='grid|Grid'):
    experiments.expand_grid(grid)


def test_cell_dirnames_are_filesystem_safe_and_distinct():
  cells = [{'model.name': 'ibu', 'seed': 0},
           {'augment.scale': [0.9, 1.1]}, {'augment.scale': [0.9, 1.2]},
           {'data.root': '/a/b'}, {'data.root': '/a_b'}, {'data.root': 'x' * 300},
           {'data.root': 'x' * 299 + 'y'}, {'model.name': 'a,b'}, {'model.name': 'a__b'}]
  dirs = [experiments.cell_dirname(c) for c in cells]
  assert dirs[0] == 'model.name=ibu__seed=0'
  assert len(set(dirs)) == len(dirs)
  for d in dirs:
    assert re.fullmatch(r'[A-Za-z0-9._=+-]+', d) and len(d) <= 120, d


def test_apply_overrides_sets_fields_on_a_copy_and_names_unknown_keys():
  base = default.get_config()
  base.lock()
  config = experiments.apply_overrides(
      base, {'model.name': 'lnu', 'augment.scale': [0.8, 1.2], 'seed': 3})
  assert (config.model.name, config.augment.scale, config.seed) == ('lnu', (0.8, 1.2), 3)
  assert (base.model.name, base.augment.scale, base.seed) == ('unet', (0.9, 1.1), 0)

  with pytest.raises(ValueError) as error:
    experiments.apply_overrides(base, {'model.ibn_mod': 'blend', 'trian.seed': 1,
                                       'model.name': 'ibu'})
  message = str(error.value)
  # Every unknown key at once, each with the fields its section does have.
  assert "'model.ibn_mod'" in message and 'ibn_mode' in message and 'base_width' in message
  assert "'trian.seed'" in message and 'augment' in message and 'train' in message
  assert "'model.name'" not in message
  with pytest.raises(ValueError, match=r"'seed.value': seed is a field"):
    experiments.apply_overrides(base, {'seed.value': 1})
  with pytest.raises(ValueError, match='model.depth'):
    experiments.apply_overrides(base, {'model.depth': 'deep'})
  with pytest.raises(ValueError, match='seed=True'):
    experiments.apply_overrides(base, {'seed': True})
  with pytest.raises(ValueError, match='section'):
    experiments.apply_overrides(base, {'model': 'ibu'})


# ----------------------------------------------------------------------------- table


def _synthetic_cell(name, overrides, frame_dice, frame_apd, case_apd, case_good, status='done'):
  """A CellResult with hand-made evaluation results (only the fields the table reads)."""
  if status != 'done':
    return experiments.CellResult(name, overrides, f'/runs/{name}', status, error='Boom: x')
  per_frame = [{'case': 'c', 'frame_id': str(i), 'dice': d, 'apd_mm': a}
               for i, (d, a) in enumerate(zip(frame_dice, frame_apd))]
  results = {
      'per_frame': per_frame,
      'per_case': {f'case{i}': {'apd_good_mm': a, 'good_pct': g}
                   for i, (a, g) in enumerate(zip(case_apd, case_good))},
      'per_set': {'per_image': {'dice_all': {'mean': float(np.mean(frame_dice))}}},
  }
  return experiments.CellResult(name, overrides, f'/runs/{name}', 'finished', results)


def test_results_table_aggregates_over_seeds_as_documented():
  rng = np.random.default_rng(0)
  dice_u0, dice_u1, dice_i0 = rng.uniform(0.5, 1, 7), rng.uniform(0.5, 1, 5), rng.uniform(0, 1, 6)
  apd_u0 = [1.5, None, 3.0]      # None: undefined (JSON null), excluded
  apd_u1 = [2.5, 4.0]
  good_u0, good_u1 = [100.0, 0.0, 50.0], [80.0, 60.0]
  cells = [
      _synthetic_cell('unet0', {'model.name': 'unet', 'seed': 0}, dice_u0, dice_u0,
                      apd_u0, good_u0),
      _synthetic_cell('unet1', {'model.name': 'unet', 'seed': 1}, dice_u1, dice_u1,
                      apd_u1, good_u1),
      _synthetic_cell('ibu0', {'model.name': 'ibu', 'seed': 0}, dice_i0, dice_i0,
                      [None, None], [0.0, 0.0]),
      _synthetic_cell('ibu1', {'model.name': 'ibu', 'seed': 1}, [], [], [], [],
                      status='failed'),
  ]
  assert experiments.default_group_by(cells) == ('model.name',)
  summary = experiments.summarize(cells)
  unet, ibu = summary['groups']
  assert unet['group'] == {'model.name': 'unet'} and unet['runs'] == 2
  pooled = np.concatenate([dice_u0, dice_u1])
  assert unet['dice_per_image']['n'] == 12
  np.testing.assert_allclose(unet['dice_per_image']['mean'], pooled.mean())
  np.testing.assert_allclose(unet['dice_per_image']['std'], pooled.std(ddof=1))
  run_means = [dice_u0.mean(), dice_u1.mean()]
  np.testing.assert_allclose(unet['dice_run_means']['mean'], np.mean(run_means))
  np.testing.assert_allclose(unet['dice_run_means']['std'], np.std(run_means, ddof=1))
  apd = np.array([1.5, 3.0, 2.5, 4.0])
  assert unet['apd_good_mm_over_cases']['n'] == 4
  np.testing.assert_allclose(unet['apd_good_mm_over_cases']['mean'], apd.mean())
  np.testing.assert_allclose(unet['apd_good_mm_over_cases']['std'], apd.std(ddof=1))
  good = np.array(good_u0 + good_u1)
  np.testing.assert_allclose(unet['good_pct_over_cases']['mean'], good.mean())
  np.testing.assert_allclose(unet['good_pct_over_cases']['std'], good.std(ddof=1))
  # One finished IBU run: no spread over runs; no good contour: no APD; the failure is kept.
  assert ibu['runs'] == 1 and ibu['failed'] == ['ibu1']
  assert np.isnan(ibu['dice_run_means']['std'])   # undefined: NaN (null in results.json)
  apd_ibu = ibu['apd_good_mm_over_cases']
  assert apd_ibu['n'] == 0 and np.isnan(apd_ibu['mean']) and np.isnan(apd_ibu['std'])

  table = experiments.results_table(cells)
  rows = {line.split('|')[1].strip(): line for line in table.splitlines()
          if line.startswith('| unet') or line.startswith('| ibu')}
  assert f'{pooled.mean():.3f} ± {pooled.std(ddof=1):.3f} (n=12)' in rows['unet']
  assert f'{apd.mean():.2f} ± {apd.std(ddof=1):.2f} (n=4)' in rows['unet']
  assert f'{good.mean():.1f} ± {good.std(ddof=1):.1f} (n=5)' in rows['unet']
  assert f'{dice_i0.mean():.3f} ± n/a' in rows['ibu']
  assert '`ibu1`: failed (Boom: x)' in table
  # Grouping by seed instead pools the models.
  by_seed = experiments.summarize(cells, group_by=('seed',))
  assert [g['group'] for g in by_seed['groups']] == [{'seed': '0'}, {'seed': '1'}]
  assert by_seed['groups'][0]['dice_per_image']['n'] == 7 + 6


# ----------------------------------------------------------------------------- running


def _evaluation(seed: int) -> dict:
  """Real `results.evaluate` output on two synthetic disk frames (prediction shifted)."""
  yy, xx = np.mgrid[:40, :40]
  records = []
  for i, shift in enumerate((1 + seed, 3)):
    expert = ((yy - 20) ** 2 + (xx - 20) ** 2 < 64).astype(np.uint8)
    pred = ((yy - 20) ** 2 + (xx - 20 - shift) ** 2 < 64).astype(np.uint8)
    records.append(dict(case=f'case{i}', frame_id='IM-0001-0001', pred_mask=pred,
                        expert_mask=expert, pixel_spacing=(1.0, 1.0)))
  return results_lib.evaluate(records)


def _fake_train(calls, fail_for=(), interrupt_for=(), signal_for=()):
  """Stands in for train.train_and_evaluate: writes the evaluation JSON it would write; for
  `interrupt_for` returns {} as `train.halt_after_steps` does, for `signal_for` raises
  `train.Stopped` as a SIGTERM does."""

  def fake(config, workdir):
    calls.append(workdir)
    if config.model.name in fail_for:
      raise RuntimeError(f'boom in {config.model.name}')
    if config.model.name in interrupt_for:
      return {}
    if config.model.name in signal_for:
      raise train.Stopped(signal.SIGTERM, 3)
    results = _evaluation(config.seed)
    results_lib.write_results(results, workdir, 'eval_' + '+'.join(config.data.eval_sets))
    return results

  return fake


def test_run_grid_records_failures_with_keep_going_and_retries_them(tmp_path, monkeypatch):
  base = default.get_config()
  grid = {'model.name': ['unet', 'lnu', 'ibu']}
  workdir = str(tmp_path / 'grid')
  calls = []
  monkeypatch.setattr(train, 'train_and_evaluate', _fake_train(calls, fail_for=('lnu',)))
  with pytest.raises(RuntimeError, match='boom in lnu'):
    experiments.run_grid(base, grid, workdir)
  cells = experiments.run_grid(base, grid, workdir, keep_going=True)
  assert [c.status for c in cells] == ['skipped', 'failed', 'finished']
  assert 'boom in lnu' in cells[1].error
  with open(os.path.join(cells[1].workdir, experiments.FAILED_FILE)) as f:
    assert 'boom in lnu' in f.read()
  assert '`model.name=lnu`: failed (RuntimeError: boom in lnu)' in (
      experiments.results_table(cells))

  calls.clear()
  monkeypatch.setattr(train, 'train_and_evaluate', _fake_train(calls))
  cells = experiments.run_grid(base, grid, workdir)
  assert [c.status for c in cells] == ['skipped', 'finished', 'skipped']
  assert calls == [cells[1].workdir]
  assert not os.path.exists(os.path.join(cells[1].workdir, experiments.FAILED_FILE))


def test_run_grid_stops_after_an_interrupted_cell(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(train, 'train_and_evaluate', _fake_train(calls, interrupt_for=('lnu',)))
  cells = experiments.run_grid(default.get_config(), {'model.name': ['unet', 'lnu', 'ibu']},
                               str(tmp_path))
  assert [c.status for c in cells] == ['finished', 'interrupted', 'pending']
  assert [c.signum for c in cells] == [None, None, None]
  assert len(calls) == 2
  assert not os.path.exists(os.path.join(cells[1].workdir, experiments.DONE_FILE))


@pytest.mark.parametrize('keep_going', [False, True])
def test_run_grid_stops_on_a_signal_even_with_keep_going(tmp_path, monkeypatch, keep_going):
  """A SIGTERM in a cell (train.Stopped) stops the grid: it is neither raised past the grid,
  which could then not report the finished cells, nor a failure that keep_going goes past."""
  calls = []
  monkeypatch.setattr(train, 'train_and_evaluate', _fake_train(calls, signal_for=('lnu',)))
  cells = experiments.run_grid(default.get_config(), {'model.name': ['unet', 'lnu', 'ibu']},
                               str(tmp_path), keep_going=keep_going)
  assert [c.status for c in cells] == ['finished', 'interrupted', 'pending']
  assert [c.signum for c in cells] == [None, signal.SIGTERM, None]
  assert len(calls) == 2
  assert not os.path.exists(os.path.join(cells[1].workdir, experiments.FAILED_FILE))
  assert 'model.name=lnu' in experiments.results_table(cells)  # the report still renders


_ABLATE_UNDER_A_SIGNAL = """
import signal, sys
from absl import app
import ablate
from lvseg_jax import experiments
workdir = sys.argv[2].split('=', 1)[1]
cells = [experiments.CellResult(name='seed=0', overrides={'seed': 0}, workdir=workdir,
                                status='interrupted', signum=int(signal.SIGTERM))]
experiments.run_grid = lambda *args, **kwargs: cells   # as run_grid returns after a SIGTERM


def report(cells, workdir, config, group_by):
  with open(workdir + '/results.md', 'w') as f:
    f.write('the finished cells')
  return {'markdown': workdir + '/results.md'}


experiments.write_report = report
app.run(ablate.main)
"""


def test_ablate_writes_the_report_then_exits_with_128_plus_the_signal(tmp_path):
  """ablate.py after a grid stopped by SIGTERM: the report of the finished cells, then exit
  status 143, as main.py exits (in a child process: ablate defines absl flags globally)."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run(
      [sys.executable, '-c', _ABLATE_UNDER_A_SIGNAL, '--config=configs/smoke.py',
       f'--workdir={tmp_path}', '--grid={"seed": [0]}'],
      cwd=repo, capture_output=True, text=True, timeout=300)
  assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
  assert 'the finished cells' in done.stdout
  assert (tmp_path / 'results.md').exists()


def test_run_grid_checks_every_cell_before_training(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(train, 'train_and_evaluate', _fake_train(calls))
  with pytest.raises(ValueError, match='model.name=unte'):
    experiments.run_grid(default.get_config(), {'model.name': ['ibu', 'unte']}, str(tmp_path))
  with pytest.raises(ValueError, match='nme'):
    experiments.run_grid(default.get_config(), {'model.nme': ['ibu']}, str(tmp_path))
  assert not calls


def test_run_grid_on_real_data_trains_reports_then_skips(tiny_config, tmp_path, monkeypatch):
  base = tiny_config(num_steps=2, checkpoint_every_steps=100, num_overlays=1)
  base.lock()  # as ablate.py's config_flags gives it
  # One real cell: the grid's bookkeeping over many cells is the fake-trainer tests' job.
  grid = {'model.name': ['unet']}
  workdir = str(tmp_path / 'ablation')
  cells = experiments.run_grid(base, grid, workdir)
  assert [(c.name, c.status) for c in cells] == [('model.name=unet', 'finished')]
  for cell in cells:
    for name in (experiments.DONE_FILE, 'eval_validation.json', 'split.json'):
      assert os.path.exists(os.path.join(cell.workdir, name)), name
    with open(os.path.join(cell.workdir, 'config.json')) as f:
      assert json.load(f)['model']['name'] == cell.overrides['model.name']
  paths = experiments.write_report(cells, workdir, base)
  with open(paths['json']) as f:
    summary = json.load(f)
  n_frames = len(cells[0].results['per_frame'])
  assert n_frames > 100
  assert [(g['group'], g['runs'], g['dice_per_image']['n']) for g in summary['groups']] == [
      ({'model.name': 'unet'}, 1, n_frames)]
  for group, cell in zip(summary['groups'], cells):  # one run: the run's own per-image mean
    np.testing.assert_allclose(group['dice_per_image']['mean'],
                               cell.results['per_set']['per_image']['dice_all']['mean'])
  with open(paths['markdown']) as f:
    report = f.read()
  assert '32x32 images, base width 4, depth 2; 2 steps' in report
  assert 'official (train on training, evaluate on validation)' in report
  assert '1 seed (0) per row' in report
  assert re.search(r'^\| unet \| 1 \| \d\.\d{3} ± \d\.\d{3} \(n=\d+\)', report, re.M)
  image = matplotlib.image.imread(paths['boxplot'])
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100

  # Rerunning trains nothing and gives the same report.
  def must_not_train(config, workdir):
    raise AssertionError(f'trained {workdir} again')

  monkeypatch.setattr(train, 'train_and_evaluate', must_not_train)
  again = experiments.run_grid(base, grid, workdir)
  assert [c.status for c in again] == ['skipped']
  assert experiments.results_table(again) == experiments.results_table(cells)
  experiments.write_report(again, workdir, base)
  with open(paths['markdown']) as f:
    assert f.read() == report
  # A dry run of a larger grid plans only the new cell.
  planned = experiments.run_grid(base, {'model.name': ['unet', 'ibu']}, workdir, dry_run=True)
  assert [c.status for c in planned] == ['skipped', 'planned']
  # A finished run with another config is not silently reused.
  changed = experiments.apply_overrides(base, {'train.num_steps': 3})
  with pytest.raises(ValueError, match=r'train.num_steps: 2 -> 3'):
    experiments.run_grid(changed, grid, workdir)


def test_parse_grid_takes_presets_and_json_objects_of_lists():
  assert experiments.parse_grid('models') == {'model.name': ['unet', 'lnu', 'ibu']}
  experiments.parse_grid('models')['model.name'].append('vnet')   # a copy, not the preset
  assert experiments.PRESETS['models'] == {'model.name': ['unet', 'lnu', 'ibu']}
  assert experiments.parse_grid('{"seed": [0, 1], "augment.elastic": [true, false]}') == {
      'seed': [0, 1], 'augment.elastic': [True, False]}
  with pytest.raises(ValueError, match="neither a preset .*models.* nor JSON"):
    experiments.parse_grid('modles')
  with pytest.raises(ValueError, match='object of key -> list'):
    experiments.parse_grid('[0, 1]')
  with pytest.raises(ValueError, match="'seed' must map to a non-empty list"):
    experiments.parse_grid('{"seed": 1}')
  with pytest.raises(ValueError, match="'seed' must map to a non-empty list"):
    experiments.parse_grid('{"seed": []}')
