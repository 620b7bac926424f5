"""The ACDC layout, on a small tree made here from SCD DICOM cases with the expert contours."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from lvseg_jax import data
from lvseg_jax import export
from lvseg_jax import train
from conftest import assert_frames_match_scd

# SCD case -> (ACDC patient, pathology group written to its Info.cfg).
CASES = {'SC-HF-I-01': ('patient001', 'DCM'), 'SC-HF-I-02': ('patient002', 'HCM'),
         'SC-HF-I-04': ('patient003', 'DCM'), 'SC-HF-I-05': ('patient004', 'HCM')}
CAVITY, MYOCARDIUM = 3, 2   # ACDC's label values


def _phases(frames):
  """The two phases the expert contoured (ED = the larger total cavity)."""
  area = {}
  for f in frames:
    if f.mask is not None:
      area[f.phase_index] = area.get(f.phase_index, 0) + int(f.mask.sum())
  (small, _), (large, _) = sorted(area.items(), key=lambda kv: kv[1])
  return large, small


@pytest.fixture(scope='module')
def acdc_tree(data_root, tmp_path_factory):
  """(root, {patient: {phase 0 / 1: [SCD frames by slice]}}) of an ACDC-layout tree."""
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config().data
  config.root, config.source, config.myocardium, config.cache_dir = data_root, 'dicom', True, ''
  frames = data.load_frames(config, cases=list(CASES), contoured_only=False)
  root = tmp_path_factory.mktemp('acdc') / 'training'
  expected = {}
  for case, (patient, group) in CASES.items():
    mine = [f for f in frames if f.case == case]
    ed, es = _phases(mine)
    folder = root / patient
    folder.mkdir(parents=True)
    frame_numbers = {ed: ed + 1, es: es + 1}
    (folder / 'Info.cfg').write_text(f'ED: {ed + 1}\nES: {es + 1}\nGroup: {group}\n'
                                     'Height: 170.0\nNbFrame: 20\nWeight: 70.0\n')
    expected[patient] = {}
    for phase_index, t in enumerate((ed, es)):
      at = sorted((f for f in mine if f.phase_index == t), key=lambda f: f.slice_index)
      image = np.stack([f.image for f in at])
      labels = np.zeros(image.shape, np.uint8)
      for k, f in enumerate(at):
        if f.epi_mask is not None:
          labels[k][f.epi_mask > 0] = MYOCARDIUM
        if f.mask is not None:
          labels[k][f.mask > 0] = CAVITY
      affine = export.nominal_affine(at[0].pixel_spacing, 10.0)
      stem = folder / f'{patient}_frame{frame_numbers[t]:02d}'
      export.write_nifti(f'{stem}.nii.gz', export.to_nifti_order(image.astype(np.int16)), affine)
      export.write_nifti(f'{stem}_gt.nii.gz', export.to_nifti_order(labels), affine)
      expected[patient][phase_index] = at
  return root.parent, expected


def _acdc_config(root):
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config().data
  config.root, config.source, config.myocardium, config.cache_dir = str(root), 'acdc', True, ''
  return config


def test_acdc_frames_are_the_expert_slices_with_their_labels(acdc_tree):
  root, expected = acdc_tree
  config = _acdc_config(root)
  assert data.available_cases(config) == sorted(expected)
  assert_frames_match_scd(data.load_frames(config), expected)


def test_folds_are_stratified_by_the_info_cfg_group(acdc_tree):
  root, _ = acdc_tree
  config = _acdc_config(root)
  config.split, config.kfold_sets, config.num_folds = 'kfold', ('all',), 2
  groups = data.acdc.groups(config)
  assert groups == {p: g for p, g in CASES.values()}
  for fold in (0, 1):
    config.fold = fold
    held_out = data.case_splits(config)['eval']
    assert sorted(groups[c] for c in held_out) == ['DCM', 'HCM']


def test_training_runs_on_an_acdc_tree(acdc_tree, tiny_config, tmp_path):
  root, _ = acdc_tree
  config = tiny_config(num_steps=2, batch_size=8, checkpoint_every_steps=100, num_overlays=1)
  config.data = _acdc_config(root)
  config.data.image_size, config.model.num_classes = 32, 3
  config.data.split, config.data.kfold_sets, config.data.num_folds = 'kfold', ('all',), 2
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  with open(tmp_path / 'run' / 'split.json') as f:
    split = json.load(f)
  assert sorted(split['train_cases'] + split['eval_cases']) == sorted(CASES[c][0] for c in CASES)
  assert results['epicardium']['per_set']['per_image']['n_frames'] > 0


def test_bad_acdc_files_name_the_file(acdc_tree, tmp_path):
  root, _ = acdc_tree
  bad = tmp_path / 'bad' / 'patient009'
  bad.mkdir(parents=True)
  (bad / 'Info.cfg').write_text('ED: one\nES: 12\n')
  config = _acdc_config(tmp_path / 'bad')
  with pytest.raises(data.DataError, match=r'Info\.cfg: ED must be a frame number'):
    data.load_frames(config)
  (bad / 'Info.cfg').write_text('ED: 1\nES: 12\n')
  with pytest.raises(data.DataError, match=r'patient009_frame01\.nii\.gz: missing'):
    data.load_frames(config)
  image = nib.load(next(root.glob('training/patient001/patient001_frame*[0-9].nii.gz')))
  nib.save(image, bad / 'patient009_frame01.nii.gz')
  nib.save(nib.Nifti1Image(np.zeros((4, 4, 1), np.uint8), np.eye(4)),
           bad / 'patient009_frame01_gt.nii.gz')
  with pytest.raises(data.DataError, match=r'_gt\.nii\.gz: label volume \(4, 4, 1\) does not '
                                           'match'):
    data.load_frames(config)
  assert os.path.exists(bad / 'patient009_frame01.nii.gz')
