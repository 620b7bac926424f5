"""Tests of lvseg_jax.agreement: statistics, a perfect prediction, the held-out bookkeeping, and a
two-fold run end to end on the real data."""

import functools
import json
import os
import shutil

import numpy as np
import pytest
from scipy import ndimage

from configs import default
from lvseg_jax import agreement
from lvseg_jax import data
from lvseg_jax import evaluate
from lvseg_jax import metrics
from lvseg_jax import results as results_lib
from lvseg_jax import train
from lvseg_jax.predict import inference


def test_agreement_stats_match_numpy():
  predicted, expert = [110.0, 95.0, 202.0, 48.0], [100.0, 100.0, 200.0, 50.0]
  diff = np.array([10.0, -5.0, 2.0, -2.0])
  s = agreement.agreement_stats(predicted, expert, relative=False)
  assert s['n'] == 4 and s['bias'] == pytest.approx(diff.mean())
  assert s['sd'] == pytest.approx(diff.std(ddof=1))
  assert s['loa_high'] - s['loa_low'] == pytest.approx(2 * 1.96 * diff.std(ddof=1))
  assert s['r'] == pytest.approx(np.corrcoef(predicted, expert)[0, 1])
  relative = agreement.agreement_stats(predicted, expert, relative=True)
  assert relative['bias'] == pytest.approx(np.mean([10.0, -5.0, 1.0, -4.0]))


def _perfect_predictions(frames):
  """What a model that reproduces the expert masks exactly would give; where the expert drew
  no epicardium, a 5-pixel ring around the cavity stands in for it."""
  out = []
  for f in frames:
    cavity = f.mask.astype(np.float32)
    epi = (f.epi_mask if f.epi_mask is not None else
           ndimage.binary_dilation(f.mask, iterations=5)).astype(np.uint8) | f.mask
    out.append(inference.Prediction(
        frame=f, probability=cavity, mask=f.mask,
        contour=metrics.probability_contour(cavity, f.mask), uncertainty=None, epi_mask=epi,
        epi_contour=metrics.probability_contour(epi.astype(float), epi)))
  return out


def test_a_perfect_prediction_agrees_exactly(data_root):
  """SC-HF-I-04's PNG frames, predicted as the expert drew them: the same EDV, ESV, EF and LV
  mass (the apical rule keeps every expert slice: none is below 20 mm^2)."""
  config = default.get_config()
  config.data.root, config.data.cache_dir, config.data.myocardium = data_root, '', True
  config.data.mask_outset_px = 0.0   # the perfect 'probabilities' are the masks themselves
  frames = agreement._with_grid(data.load_frames(config.data, cases=['SC-HF-I-04']))  # pylint: disable=protected-access
  assert {(f.instance - 1) % 20 for f in frames} == {6, 19}
  out = agreement.measure_case(frames, _perfect_predictions(frames), 10.0, config)
  assert out['excluded'] == []
  for key in ('edv_ml', 'esv_ml', 'ef_pct'):
    assert out['predicted'][key] == pytest.approx(out['expert'][key], rel=1e-12), key
  assert (out['expert']['ed_phase'], out['expert']['es_phase']) == (19, 6)
  # The expert's ED frames all have an epicardium here, so both sides have a mass.
  assert out['predicted']['lv_mass_g'] == pytest.approx(out['expert']['lv_mass_g'], rel=1e-12)
  # Every contoured slice at ED and ES, base to apex, with the same area on both sides.
  for phase, t in (('ed', 19), ('es', 6)):
    pairs = np.array(out['cavity_areas'][phase])
    assert len(pairs) == len({f.slice_index for f in frames if f.phase_index == t})
    np.testing.assert_allclose(pairs[:, 1], pairs[:, 0], rtol=1e-12)


def test_area_bias_by_level_splits_the_slices_in_thirds():
  """Case A, 7 slices: thirds of 3, 2, 2 (the remainder at the basal end); case B, 3 slices
  at ES only. Expected values worked out by hand."""
  a_ed = [[100, 110], [100, 110], [100, 110], [80, 80], [80, 80], [50, 40], [50, 45]]
  cases = {'A': {'cavity_areas': {'ed': a_ed, 'es': []}},
           'B': {'cavity_areas': {'es': [[40, 50], [30, 30], [20, 20]]}},
           'skipped': {'skipped': 'no expert'}}
  bias = agreement.area_bias_by_level(cases)
  ed, es = bias['ed'], bias['es']
  assert ed['basal'] == {'mean': pytest.approx(10.0), 'std': pytest.approx(np.nan, nan_ok=True),
                         'n': 1}
  assert ed['middle']['mean'] == pytest.approx(0.0)
  assert ed['apical']['mean'] == pytest.approx(100 * (85 - 100) / 100)
  assert ed['all']['mean'] == pytest.approx(100 * (575 - 560) / 560)
  assert es['basal']['mean'] == pytest.approx(25.0) and es['apical']['mean'] == 0.0
  assert es['all']['mean'] == pytest.approx(100 * 10 / 90) and es['all']['n'] == 1


def _split(tmp_path, name, train_cases, eval_cases, split='kfold'):
  folder = tmp_path / name
  folder.mkdir()
  (folder / 'split.json').write_text(json.dumps(
      {'split': split, 'train_cases': train_cases, 'eval_cases': eval_cases}))


def test_held_out_cases_refuses_leaks_and_double_hold_outs(tmp_path):
  _split(tmp_path, 'f0', ['B', 'C'], ['A'])
  _split(tmp_path, 'f1', ['A', 'C'], ['B'])
  assert agreement.held_out_cases(str(tmp_path)) == {'A': str(tmp_path / 'f0'),
                                                    'B': str(tmp_path / 'f1')}
  _split(tmp_path, 'f2', ['C'], ['A'])
  with pytest.raises(ValueError, match='A is held out by both'):
    agreement.held_out_cases(str(tmp_path))
  leaky = tmp_path / 'leaky'
  leaky.mkdir()
  _split(leaky, 'f0', ['A', 'B'], ['A'])
  with pytest.raises(ValueError, match=r"trained on and evaluated: \['A'\]"):
    agreement.held_out_cases(str(leaky))
  with pytest.raises(FileNotFoundError, match='no training runs'):
    agreement.held_out_cases(str(tmp_path / 'empty'))


def test_contour_accuracy_per_fold_is_each_folds_own_evaluation():
  """Frames are scored once for all folds; each fold's figures must equal evaluating its
  records alone (`evaluate.headline`), the SD over folds the spread of those."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:64, :64]
  records = {'a': {'endocardium': [], 'epicardium': []},
             'b': {'endocardium': [], 'epicardium': []}}
  for run, cases in (('a', ['c1', 'c2']), ('b', ['c3'])):
    for case in cases:
      for k in range(3):
        r, cx = 10 + rng.integers(-3, 8), 32 + rng.integers(-3, 3)
        pred = (((xx - cx) ** 2 + (yy - 32) ** 2) < r * r).astype(np.uint8)
        if rng.random() < 0.2:
          pred[:] = 0   # undetected
        records[run]['endocardium'].append(dict(
            case=case, frame_id=str(k), pixel_spacing=(1.0, 1.0), pred_mask=pred,
            expert_mask=(((xx - 32) ** 2 + (yy - 32) ** 2) < 100).astype(np.uint8)))
  got = agreement.contour_accuracy(records)
  assert set(got) == {'endocardium'}
  for run in ('a', 'b'):
    alone = evaluate.headline(results_lib.evaluate(records[run]['endocardium']))
    for key, value in alone.items():
      assert got['endocardium']['per_fold'][run][key] == pytest.approx(value, rel=1e-12)
  spread = got['endocardium']['over_folds']['apd_mm']
  assert spread['std'] == pytest.approx(np.std(
      [got['endocardium']['per_fold'][r]['apd_mm'] for r in 'ab'], ddof=1))


def test_two_fold_agreement_end_to_end(tiny_config, tmp_path):
  """Two tiny 3-class fold runs over the 15 training cases (half the CV pool, to keep the suite
  short); every case measured once, by its fold."""
  cv = tmp_path / 'cv'
  for fold in (0, 1):
    config = tiny_config(num_steps=2, checkpoint_every_steps=100, num_overlays=1)
    config.model.num_classes, config.data.myocardium = 3, True
    config.data.split, config.data.num_folds, config.data.fold = 'kfold', 2, fold
    config.data.kfold_sets = ('training',)
    train.train_and_evaluate(config, str(cv / f'fold{fold}'))
  result = agreement.run_agreement(str(cv))
  assert result['checkpoint'] == 'latest'   # the final model: nothing chosen on held-out cases
  held_out = {}
  for fold in ('fold0', 'fold1'):
    with open(cv / fold / 'split.json') as f:
      held_out[fold] = set(json.load(f)['eval_cases'])
  cases = held_out['fold0'] | held_out['fold1']
  assert len(cases) == 15 and not held_out['fold0'] & held_out['fold1']
  png = result['cases']['png']
  assert set(png) == cases
  assert {case for case, c in png.items() if c['run'].endswith('fold0')} == held_out['fold0']
  frames = [f for f in data.load_frames(config.data) if f.case in cases]
  # The staged DICOM cases of the training set (SPLITS.md): SC-HF-I-05 and -06 are validation.
  assert set(result['cases']['dicom']) == {'SC-HF-I-01', 'SC-HF-I-02', 'SC-HF-I-04'}
  # Measured: the cases whose expert drew the same slices at both contoured phases.
  slices = {}
  for f in frames:
    slices.setdefault(f.case, {}).setdefault((f.instance - 1) % 20, set()).add(
        (f.instance - 1) // 20)
  complete = {c for c, by_phase in slices.items() if len({frozenset(s)
                                                           for s in by_phase.values()}) == 1}
  assert {c for c, m in png.items() if 'expert' in m} == complete
  # 9 of the 16 measurable cases of the 30 are in the official training set.
  assert result['png']['stats']['edv_ml']['n'] == len(complete) == 9
  for name in ('agreement.json', 'agreement.md', 'agreement_bland_altman.png'):
    assert os.path.exists(cv / name), name
  # Predict's contours scored on every held-out contoured frame, per fold and over the cases.
  endo, epi = (result['contours']['png'][k] for k in ('endocardium', 'epicardium'))
  assert set(endo['per_fold']) == {'fold0', 'fold1'}
  assert endo['per_image_dice']['n'] == len(frames) == 260   # the official training frames
  assert epi['per_image_dice']['n'] == sum(f.epi_mask is not None for f in frames)
  assert endo['over_cases']['good_pct']['n'] == 15
  assert endo['over_folds']['dice']['mean'] == pytest.approx(np.mean(
      [endo['per_fold'][k]['dice'] for k in ('fold0', 'fold1')]))
  assert result['png']['area_bias']['es']['all']['n'] == len(complete)   # one per measured case


def test_tta_runs_every_fold_model_augmented_and_needs_flip_training(smoke_copy, monkeypatch):
  """tta reaches the forward pass of each fold model; models trained without flips refuse it."""
  _, workdir = smoke_copy
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  assert not (saved['augment']['flip_lr'] or saved['augment']['flip_ud'])
  cv = os.path.dirname(workdir)
  with open(os.path.join(workdir, 'split.json'), 'w') as f:
    json.dump({'split': 'kfold', 'train_cases': ['SC-HF-I-01'], 'eval_cases': ['SC-HYP-40']}, f)
  with pytest.raises(ValueError, match="tta='lr', but the model was trained without flip"):
    agreement.run_agreement(cv, tta='lr')
  with pytest.raises(ValueError, match="Unknown tta 'rot'; choices"):
    agreement.run_agreement(cv, tta='rot')

  saved['augment']['flip_lr'] = True
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(saved, f)
  seen = []
  real = inference.make_forward_fn

  def recording(model, tta_transforms='none'):
    seen.append(tta_transforms)
    return real(model, tta_transforms)

  monkeypatch.setattr(inference, 'make_forward_fn', recording)
  result = agreement.run_agreement(cv, tta='lr')
  assert seen == ['lr'] and result['tta'] == 'lr'   # no DICOM copy of SC-HYP-40: one pass
  assert set(result['cases']['png']) == {'SC-HYP-40'}
  with open(os.path.join(cv, 'agreement.md')) as f:
    assert 'test-time augmentation: lr' in f.read()

  # A same-fold ensemble of the run and its copy: each case predicted once, by both members
  # (their averaging is tested against NumPy in predict_test).
  twin = os.path.join(os.path.dirname(cv), 'twin_cv')
  shutil.copytree(cv, twin)
  members = []
  monkeypatch.setattr(inference, 'predict_frames', functools.partial(
      _recording_predict_frames, inference.predict_frames, members))
  both = agreement.run_agreement([cv, twin], output=os.path.join(twin, 'ensemble'), tta='lr')
  assert members == [2]
  single, pair = result['cases']['png']['SC-HYP-40'], both['cases']['png']['SC-HYP-40']
  assert pair['runs'] == [workdir, os.path.join(twin, os.path.basename(workdir))]
  assert single['runs'] == [workdir]
  with open(os.path.join(twin, 'ensemble', 'agreement.md')) as f:
    assert f'ensemble of its fold runs in: `{cv}`, `{twin}`' in f.read()
  with pytest.raises(ValueError, match='needs an output folder'):
    agreement.run_agreement([cv, twin])


def _recording_predict_frames(real, members, model, variables, *args, **kwargs):
  members.append(len(variables) if isinstance(variables, list) else 1)
  return real(model, variables, *args, **kwargs)


def test_held_out_groups_pairs_the_runs_of_one_fold(tmp_path):
  for d in ('a', 'b'):
    (tmp_path / d).mkdir()
    _split(tmp_path / d, 'f0', ['B'], ['A'])
    _split(tmp_path / d, 'f1', ['A'], ['B'])
  a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
  assert agreement.held_out_groups([a, b]) == {
      (f'{a}/f0', f'{b}/f0'): ['A'], (f'{a}/f1', f'{b}/f1'): ['B']}
  _split(tmp_path / 'b', 'f2', [], ['C'])
  with pytest.raises(ValueError, match='hold out different cases'):
    agreement.held_out_groups([a, b])
  (tmp_path / 'c').mkdir()
  _split(tmp_path / 'c', 'f0', ['B', 'D'], ['A'])
  _split(tmp_path / 'c', 'f1', ['A'], ['B'])
  with pytest.raises(ValueError, match='trained on different cases'):
    agreement.held_out_groups([a, str(tmp_path / 'c')])


def test_fold_localizers_take_the_localizer_fold_that_held_out_the_same_cases(tmp_path,
                                                                               monkeypatch):
  for d in ('roi', 'loc', 'other'):
    (tmp_path / d).mkdir()
  _split(tmp_path / 'roi', 'f0', ['B'], ['A'])
  _split(tmp_path / 'roi', 'f1', ['A'], ['B'])
  _split(tmp_path / 'loc', 'g1', ['B'], ['A'])     # other names, the same folds
  _split(tmp_path / 'loc', 'g0', ['A'], ['B'])
  roi_dir, loc_dir = str(tmp_path / 'roi'), str(tmp_path / 'loc')
  made = []
  monkeypatch.setattr(agreement.roi, 'Localizer',
                      lambda run, config, checkpoint: made.append((run, checkpoint)) or run)
  groups = agreement.held_out_groups([roi_dir])
  roi_config, crop_config = default.get_config(), default.get_config()
  roi_config.data.resize_mode = 'roi'
  configs = {runs: roi_config for runs in groups}
  assert agreement.fold_localizers(groups, configs, loc_dir, 'latest') == {
      (f'{roi_dir}/f0',): f'{loc_dir}/g1', (f'{roi_dir}/f1',): f'{loc_dir}/g0'}
  assert sorted(made) == [(f'{loc_dir}/g0', 'latest'), (f'{loc_dir}/g1', 'latest')]
  # Runs of another resize_mode need none.
  assert agreement.fold_localizers(groups, {r: crop_config for r in groups}, loc_dir,
                                   'latest') == {r: None for r in groups}
  # A localizer fold that trained on other cases would have seen the held-out ones.
  _split(tmp_path / 'other', 'h0', ['B', 'C'], ['A'])
  _split(tmp_path / 'other', 'h1', ['A', 'C'], ['B'])
  with pytest.raises(ValueError, match='not the same folds'):
    agreement.fold_localizers(groups, configs, str(tmp_path / 'other'), 'latest')
  # Without a folder: the runs' own data.roi_localizer, if it never saw the held-out cases.
  roi_config.data.roi_localizer = str(tmp_path / 'other' / 'h0')   # trained on B and C
  with pytest.raises(ValueError, match=r"trained on held-out cases \['B'\]"):
    agreement.fold_localizers(groups, configs, None, 'latest')
  roi_config.data.roi_localizer = 'ibu3-cpu'    # the shipped model: trained on every case
  with pytest.raises(ValueError, match=r"trained on held-out cases \['\(no split.json"):
    agreement.fold_localizers(groups, configs, None, 'latest')
  monkeypatch.undo()
  roi_config.data.roi_localizer = ''
  with pytest.raises(ValueError, match="needs data.roi_localizer"):
    agreement.fold_localizers(groups, configs, None, 'latest')
