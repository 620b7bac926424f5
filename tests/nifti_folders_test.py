"""The `nifti` source (image and label folders, nnU-Net's raw layout), on volumes made here
from SCD DICOM cases with the expert contours."""

import os

import nibabel as nib
import numpy as np
import pytest

from lvseg_jax import data
from lvseg_jax import export
from lvseg_jax import predict
from conftest import assert_frames_match_scd

# SCD case -> patient name; the last one is written as one 4D volume, without a channel suffix.
CASES = {'SC-HF-I-01': 'patient001', 'SC-HF-I-02': 'patient002', 'SC-HF-I-04': 'patient003',
         'SC-HF-I-05': 'patient004'}
CAVITY, MYOCARDIUM = 3, 2   # the default data.labels (ACDC's values)


def _label_volume(frames):
  labels = np.zeros((len(frames),) + frames[0].shape, np.uint8)
  for k, f in enumerate(frames):
    if f.epi_mask is not None:
      labels[k][f.epi_mask > 0] = MYOCARDIUM
    if f.mask is not None:
      labels[k][f.mask > 0] = CAVITY
  return labels


@pytest.fixture(scope='module')
def nifti_tree(data_root, tmp_path_factory):
  """(root, {patient: [SCD frames of phase 0 by slice, of phase 1 by slice]})."""
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config().data
  config.root, config.source, config.myocardium, config.cache_dir = data_root, 'dicom', True, ''
  frames = data.load_frames(config, cases=list(CASES), contoured_only=False)
  root = tmp_path_factory.mktemp('nnunet')
  (root / 'imagesTr').mkdir()
  (root / 'labelsTr').mkdir()
  expected = {}
  for case, patient in CASES.items():
    mine = [f for f in frames if f.case == case]
    contoured = sorted({f.phase_index for f in mine if f.mask is not None})
    phases = [sorted((f for f in mine if f.phase_index == t), key=lambda f: f.slice_index)
              for t in contoured]
    expected[patient] = dict(enumerate(phases))
    affine = export.nominal_affine(mine[0].pixel_spacing, 10.0)
    if patient == 'patient004':   # one 4D volume [x, y, slice, time] and 4D labels
      image = np.stack([np.stack([f.image for f in at]) for at in phases], axis=1)
      labels = np.stack([_label_volume(at) for at in phases], axis=1)
      export.write_nifti(str(root / 'imagesTr' / f'{patient}_cine.nii.gz'),
                         export.to_nifti_order(image.astype(np.int16)), affine)
      export.write_nifti(str(root / 'labelsTr' / f'{patient}_cine.nii.gz'),
                         export.to_nifti_order(labels), affine)
      continue
    for t, at in zip(contoured, phases):
      name = f'{patient}_frame{t + 1:02d}'
      export.write_nifti(str(root / 'imagesTr' / f'{name}_0000.nii.gz'), export.to_nifti_order(
          np.stack([f.image for f in at]).astype(np.int16)), affine)
      export.write_nifti(str(root / 'labelsTr' / f'{name}.nii.gz'),
                         export.to_nifti_order(_label_volume(at)), affine)
  return root, expected


def _config(root, case_regex=r'(patient\d+)_'):
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config().data
  config.root, config.source, config.myocardium, config.cache_dir = str(root), 'nifti', True, ''
  config.case_regex = case_regex
  return config


def test_frames_are_the_expert_slices_of_each_patient(nifti_tree):
  root, expected = nifti_tree
  config = _config(root)
  assert data.available_cases(config) == sorted(expected)
  frames = data.load_frames(config)
  assert_frames_match_scd(frames, expected)
  ids = {f.frame_id for f in frames if f.case == 'patient004'}
  assert 'patient004_cine-slice03-phase01' in ids
  # Without case_regex every volume is a case of its own.
  assert len(data.available_cases(_config(root, ''))) == 2 * 3 + 1


def test_folds_keep_the_volumes_of_a_patient_together(nifti_tree):
  root, _ = nifti_tree
  config = _config(root)
  config.split, config.kfold_sets, config.num_folds = 'kfold', ('all',), 2
  held_out = []
  for fold in (0, 1):
    config.fold = fold
    split = data.case_splits(config)
    assert not set(split['train']) & set(split['eval'])
    held_out += split['eval']
  assert sorted(held_out) == sorted(CASES.values())


def test_predict_on_the_tree_takes_the_images_not_the_labels(nifti_tree):
  root, _ = nifti_tree
  from configs import default  # pylint: disable=g-import-not-at-top
  found = predict.find_series(str(root), default.get_config())
  images = sorted(p.name[:-len('.nii.gz')] for p in (root / 'imagesTr').iterdir())
  assert len(images) == 7 and sorted(s.name for s in found) == images


def test_datasets_split_patients_and_the_cache_follows_case_regex(nifti_tree, tmp_path):
  """Train and eval datasets hold whole patients; the frame cache is keyed by case_regex, so
  regrouping the volumes never reads another grouping's cache."""
  root, expected = nifti_tree
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.data = _config(root)
  config.data.cache_dir, config.data.image_size = str(tmp_path / 'cache'), 32
  config.data.split, config.data.kfold_sets, config.data.num_folds = 'kfold', ('all',), 2
  contoured = sum(f.mask is not None and f.mask.any() for phases in expected.values()
                  for frames in phases.values() for f in frames)
  for _ in range(2):   # the second time from the cache
    train_ds, eval_ds = data.load_datasets(config)
    assert sorted(train_ds.cases + eval_ds.cases) == sorted(CASES.values())
    assert len(train_ds) + len(eval_ds) == contoured
  config.data.case_regex = ''
  train_ds, eval_ds = data.load_datasets(config)
  assert len(train_ds.cases + eval_ds.cases) == 2 * 3 + 1
  assert len(os.listdir(tmp_path / 'cache')) == 2


def test_bad_nifti_trees_name_the_file(nifti_tree, tmp_path):
  root, _ = nifti_tree
  bad = tmp_path / 'bad'
  (bad / 'images').mkdir(parents=True)
  with pytest.raises(data.DataError, match=r'imagesTr: no such folder \(config\.data\.'
                                           r'nifti_images'):
    data.load_frames(_config(bad))
  (bad / 'imagesTr').mkdir()
  (bad / 'labelsTr').mkdir()
  image = nib.load(root / 'imagesTr' / 'patient002_frame01_0000.nii.gz')
  nib.save(image, bad / 'imagesTr' / 'patient009_frame01_0000.nii.gz')
  with pytest.raises(data.DataError, match=r'labelsTr/patient009_frame01\.nii\.gz: missing'):
    data.load_frames(_config(bad))
  nib.save(nib.Nifti1Image(np.zeros((4, 4, 1), np.uint8), np.eye(4)),
           bad / 'labelsTr' / 'patient009_frame01.nii.gz')
  with pytest.raises(data.DataError, match=r'patient009_frame01\.nii\.gz: label volume '
                                           r'\(4, 4, 1\) does not match'):
    data.load_frames(_config(bad))
  with pytest.raises(data.DataError, match=r"does not match config\.data\.case_regex"):
    data.available_cases(_config(bad, r'(case\d+)'))
  nib.save(image, bad / 'imagesTr' / 'patient009_frame01_0001.nii.gz')
  with pytest.raises(data.DataError, match=r'_0001\.nii\.gz: a second image channel'):
    data.available_cases(_config(bad))
