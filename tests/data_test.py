"""Tests for lvseg_jax.data on the real SCD data and on small generated fixtures.

Oracles: file listings of the data folders, SPLITS.md and the data README, headers read
directly with pydicom, label PNGs read directly with Pillow, `jax.image.resize`, and NumPy
formulas. Error cases use tiny DICOM/PNG/contour trees written into tmp_path.
"""

import collections
import json
import logging
import os
import re

import jax
import numpy as np
from PIL import Image
import pydicom
from pydicom.dataset import Dataset as DicomDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
import pytest

from configs import default
from lvseg_jax import contours
from lvseg_jax import data

DICOM_CASES = {  # README "DICOM subset": case -> (SCD id, frames staged, slices, icontours)
    'SC-HF-I-01': ('SCD0000101', 240, 12, 18), 'SC-HF-I-02': ('SCD0000201', 18, 9, 18),
    'SC-HF-I-04': ('SCD0000301', 200, 10, 20), 'SC-HF-I-05': ('SCD0000401', 220, 11, 18),
    'SC-HF-I-06': ('SCD0000501', 220, 11, 22)}
README_SPACING = {'SCD0000101': 1.367188, 'SCD0000201': 1.367188, 'SCD0000301': 1.2891,
                  'SCD0000401': 1.3672, 'SCD0000501': 1.3672}


def _config(root, **overrides):
  config = default.get_config()
  config.data.root = root
  config.data.cache_dir = ''
  for key, value in overrides.items():
    setattr(config.data, key, value)
  return config


def _dice(a, b):
  a, b = np.asarray(a).astype(bool), np.asarray(b).astype(bool)
  return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _splits_md(data_root):
  """SPLITS.md tables: set name -> [(OriginalID, contour folder, SCD id)]."""
  sets, current = {}, None
  with open(os.path.join(data_root, 'SPLITS.md')) as f:
    for line in f:
      heading = re.match(r'## (Training|Validation|Online) \(15\)', line)
      if heading:
        current = heading[1].lower()
        sets[current] = []
      elif current and line.startswith('| SC-'):
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        sets[current].append(tuple(cells[:3]))
      elif line.startswith('## '):
        current = None
  return sets


# ------------------------------------------------------------------------------ real data


@pytest.fixture(scope='module')
def png_frames(data_root):
  return data.load_frames(_config(data_root).data)


@pytest.fixture(scope='module')
def dicom_frames(data_root):
  """Every DICOM frame, contoured or not."""
  return data.load_frames(_config(data_root, source='dicom').data, contoured_only=False)


def test_official_sets_match_splits_md(data_root):
  tables = _splits_md(data_root)
  assert sorted(tables) == sorted(data.OFFICIAL_SETS)
  for name, rows in tables.items():
    assert list(data.OFFICIAL_SETS[name]) == [folder for _, folder, _ in rows]
    assert [data.normalize_case_id(original) for original, _, _ in rows] == [
        folder for _, folder, _ in rows]
  sheet = data.read_patient_sheet(os.path.join(data_root, 'scd_patientdata.csv'))
  assert len(sheet) == 45
  for rows in tables.values():
    for _, folder, scd_id in rows:
      assert sheet[scd_id] == folder


def test_png_counts_per_case(data_root, png_frames):
  names = os.listdir(os.path.join(data_root, 'derived_png_meow2', 'images'))
  expected = collections.Counter(name.split('-IM-')[0] for name in names)
  assert len(png_frames) == sum(expected.values()) == 526
  assert collections.Counter(f.case for f in png_frames) == expected
  assert len(expected) == 30
  assert set(expected) == set(data.OFFICIAL_SETS['training'] + data.OFFICIAL_SETS['validation'])
  for frame in png_frames:
    assert frame.spacing_source == 'nominal'
    assert frame.pixel_spacing == (1.3672, 1.3672)
    assert frame.image.dtype == np.float32 and frame.image.shape == (256, 256)


def test_png_masks_are_the_label_files(data_root, png_frames):
  for frame in png_frames[::7]:
    label_path = os.path.join(data_root, 'derived_png_meow2', 'i_labels',
                              os.path.basename(frame.source_path))
    np.testing.assert_array_equal(frame.mask, np.asarray(Image.open(label_path)) > 127)
    np.testing.assert_array_equal(frame.image, np.asarray(Image.open(frame.source_path)))


def test_png_outer_contour_labels(data_root):
  frames = data.load_frames(_config(data_root, contour='o').data, cases=['SC-HF-I-01', 'SC-N-02'])
  names = set(os.listdir(os.path.join(data_root, 'derived_png_meow2', 'o_labels')))
  expected = [n for n in names if n.startswith(('SC-HF-I-01-', 'SC-N-02-'))]
  assert len(frames) == len(expected) > 0


def test_dicom_counts(data_root, dicom_frames):
  per_case = collections.Counter(f.case for f in dicom_frames)
  assert len(dicom_frames) == 898
  for case, (scd_id, staged, slices, icontours) in DICOM_CASES.items():
    series = [os.path.join(data_root, 'SCD_IMAGES_01', scd_id, s)
              for s in os.listdir(os.path.join(data_root, 'SCD_IMAGES_01', scd_id))]
    assert per_case[case] == len(os.listdir(series[0])) == staged
    frames = [f for f in dicom_frames if f.case == case]
    assert {f.scd_id for f in frames} == {scd_id}
    assert len({f.slice_index for f in frames}) == slices
    expert = os.path.join(data_root, 'SCD_ManualContours', case, 'contours-manual',
                          'IRCCI-expert')
    contoured = sorted(f.instance for f in frames if f.mask is not None)
    listed = sorted(int(n.split('-')[2]) for n in os.listdir(expert) if '-icontour-' in n)
    assert contoured == listed and len(contoured) == icontours
  assert sum(f.mask is not None for f in dicom_frames) == 96


def test_dicom_contoured_only(data_root, dicom_frames):
  frames = data.load_frames(_config(data_root, source='dicom').data, cases=['SC-HF-I-2'])
  assert [f.instance for f in frames] == [f.instance for f in dicom_frames
                                          if f.case == 'SC-HF-I-02' and f.mask is not None]


def test_dicom_and_png_paths_give_the_same_mask(png_frames, dicom_frames):
  png = {(f.case, f.instance): f for f in png_frames}
  compared = 0
  for frame in dicom_frames:
    if frame.mask is None:
      continue
    other = png[(frame.case, frame.instance)]
    assert frame.frame_id == other.frame_id
    assert _dice(frame.mask, other.mask) == 1.0
    np.testing.assert_array_equal(frame.mask, other.mask)
    # Same picture (README: correlation >= 0.9998 with the 8-bit PNG rescaling).
    assert np.corrcoef(frame.image.ravel(), other.image.ravel())[0, 1] > 0.999
    compared += 1
  assert compared == 96


def test_dicom_geometry_from_headers(data_root, dicom_frames):
  for frame in dicom_frames[::37]:
    header = pydicom.dcmread(frame.source_path, stop_before_pixels=True)
    assert frame.pixel_spacing == tuple(float(v) for v in header.PixelSpacing)
    assert frame.slice_location == float(header.SliceLocation)
    assert frame.slice_thickness == float(header.SliceThickness)
    assert frame.spacing_between_slices == float(header.SpacingBetweenSlices)
    assert frame.trigger_time == float(header.TriggerTime)
    assert frame.instance == int(header.InstanceNumber)
    assert frame.image_position == tuple(float(v) for v in header.ImagePositionPatient)
  for case, (scd_id, _, _, _) in DICOM_CASES.items():
    frames = [f for f in dicom_frames if f.case == case]
    assert {f.pixel_spacing for f in frames} == {(README_SPACING[scd_id],) * 2}
    assert {f.spacing_source for f in frames} == {'dicom'}
    expected = 10.0 if scd_id in ('SCD0000101', 'SCD0000201') else 8.0
    assert {f.slice_thickness for f in frames} == {f.spacing_between_slices for f in frames} == {
        expected}
    # The stack really is spaced SpacingBetweenSlices apart along the slice normal.
    positions = {}
    for f in frames:
      positions.setdefault(f.slice_index, f.slice_position)
    gaps = np.abs(np.diff([positions[k] for k in sorted(positions)]))
    np.testing.assert_allclose(gaps, expected, atol=0.01)


def test_dicom_slice_and_phase_indices(dicom_frames):
  # README: slice = (NNNN - 1) // 20, phase = (NNNN - 1) % 20 for the complete series.
  for frame in dicom_frames:
    if frame.case == 'SC-HF-I-02':
      continue
    assert (frame.slice_index, frame.phase_index) == divmod(frame.instance - 1, 20)
  partial = [f for f in dicom_frames if f.case == 'SC-HF-I-02']
  assert sorted((f.slice_index, f.phase_index) for f in partial) == [
      (s, p) for s in range(9) for p in range(2)]
  order = [(f.case, f.slice_index, f.phase_index) for f in dicom_frames]
  assert order == sorted(order)


def test_load_dicom_series_without_contours(data_root):
  folder = os.path.join(data_root, 'SCD_IMAGES_01', 'SCD0000301', 'CINESAX_5')
  frames = data.load_dicom_series(folder)
  assert len(frames) == len(os.listdir(folder)) == 200
  assert {f.case for f in frames} == {'SCD0000301'}  # PatientID when no case is given
  assert all(f.mask is None and f.contour is None for f in frames)
  assert [f.instance for f in frames] == list(range(1, 201))


def test_spacing_table_for_png(data_root, dicom_frames, tmp_path, caplog):
  table = {f.case: f.pixel_spacing for f in dicom_frames}
  path = str(tmp_path / 'spacing.csv')
  data.write_spacing_table(path, table)
  assert data.read_spacing_table(path) == table
  config = _config(data_root, spacing_table=path)
  cases = list(DICOM_CASES) + ['SC-N-02']
  frames = data.load_frames(config.data, cases=cases)
  for frame in frames:
    if frame.case == 'SC-N-02':
      assert frame.spacing_source == 'nominal' and frame.pixel_spacing == (1.3672, 1.3672)
    else:
      assert frame.spacing_source == 'table' and frame.pixel_spacing == table[frame.case]
  assert 'No pixel spacing for 1 PNG case(s) (SC-N-02)' in caplog.text


# ------------------------------------------------------------------------------ splits


def test_official_split_png(data_root):
  config = _config(data_root)
  split = data.case_splits(config.data)
  assert split['train'] == list(data.OFFICIAL_SETS['training'])
  assert split['eval'] == list(data.OFFICIAL_SETS['validation'])
  assert not set(split['train']) & set(split['eval'])
  assert split['missing:online'] == list(data.OFFICIAL_SETS['online'])
  assert split['missing:training'] == split['missing:validation'] == split['unassigned'] == []
  config.data.train_sets, config.data.eval_sets = ('training', 'validation'), ()
  union = data.case_splits(config.data)
  assert len(union['train']) == 30 and union['eval'] == []


def test_official_split_dicom(data_root):
  split = data.case_splits(_config(data_root, source='dicom').data)
  assert split['train'] == ['SC-HF-I-01', 'SC-HF-I-02', 'SC-HF-I-04']
  assert split['eval'] == ['SC-HF-I-05', 'SC-HF-I-06']
  assert len(split['missing:training']) == 12 and len(split['missing:online']) == 15


def test_requested_absent_set_and_bad_sets(data_root):
  with pytest.raises(data.DataError, match="eval set 'online' was requested but none of its 15"):
    data.case_splits(_config(data_root, eval_sets=('online',)).data)
  with pytest.raises(ValueError, match='share 15 case'):
    data.case_splits(_config(data_root, train_sets=('training', 'validation')).data)
  with pytest.raises(ValueError, match=r"choices: \['online', 'training', 'validation'\]"):
    data.case_splits(_config(data_root, train_sets=('train',)).data)
  with pytest.raises(ValueError, match=r"choices: \['kfold', 'official'\]"):
    data.case_splits(_config(data_root, split='random').data)


def test_kfold_is_patient_level(data_root):
  config = _config(data_root, split='kfold', num_folds=5)
  pool = set(data.OFFICIAL_SETS['training'] + data.OFFICIAL_SETS['validation'])
  evals = []
  for fold in range(5):
    config.data.fold = fold
    split = data.case_splits(config.data)
    assert not set(split['train']) & set(split['eval'])
    assert set(split['train']) | set(split['eval']) == pool
    assert split['eval'] == split[f'fold:{fold}']
    evals.append(set(split['eval']))
    # Each fold holds a share of every pathology group (8 HF-I, 8 HF-NI, 8 HYP, 6 N).
    assert {data.case_group(c) for c in split['eval']} == {'SC-HF-I', 'SC-HF-NI', 'SC-HYP',
                                                           'SC-N'}
  assert sorted(len(e) for e in evals) == [6] * 5
  assert set().union(*evals) == pool and sum(map(len, evals)) == len(pool)
  with pytest.raises(ValueError, match=r'fold must be in \[0, 5\)'):
    data.case_splits(_config(data_root, split='kfold', fold=5).data)


def test_train_exclude_leaves_train_only_and_keeps_the_folds(data_root):
  # Oracle: the same split without the exclusion. Excluding must only remove the case from
  # train; the folds (and so every eval set) stay as they were.
  for split_name, fold in (('kfold', 0), ('kfold', 4), ('official', 0)):
    base = data.case_splits(_config(data_root, split=split_name, fold=fold).data)
    held_out, trained = base['eval'][0], base['train'][-1]
    split = data.case_splits(_config(data_root, split=split_name, fold=fold,
                                     train_exclude=(trained, held_out.lower())).data)
    assert split['train'] == [c for c in base['train'] if c != trained]
    assert split['eval'] == base['eval'] and held_out in split['eval']
    assert split['excluded'] == [trained] and split['unassigned'] == base['unassigned']
  # A case in neither train nor eval stays unassigned: it was not taken out of anything.
  unused = data.OFFICIAL_SETS['validation'][0]
  split = data.case_splits(_config(data_root, eval_sets=(), train_exclude=(unused,)).data)
  assert split['excluded'] == [] and unused in split['unassigned']
  with pytest.raises(ValueError, match=r"train_exclude names case\(s\) not in the png data: "
                                       r"\['SC-N-99'\]"):
    data.case_splits(_config(data_root, train_exclude=('SC-N-99',)).data)


def test_kfold_assignments_are_seeded():
  cases = [f'SC-X-{i:02d}' for i in range(20)]
  a = data.kfold_assignments(cases, 4, seed=0)
  assert a == data.kfold_assignments(list(reversed(cases)), 4, seed=0)
  assert a != data.kfold_assignments(cases, 4, seed=1)
  assert collections.Counter(a.values()) == {0: 5, 1: 5, 2: 5, 3: 5}


# ------------------------------------------------------------------------------ load_datasets


def test_load_datasets_split_json_and_cache(data_root, tmp_path, monkeypatch, caplog):
  caplog.set_level(logging.INFO, logger='absl')
  config = _config(data_root, image_size=64, cache_dir=str(tmp_path / 'cache'))
  workdir = str(tmp_path / 'run')
  train, evaluate = data.load_datasets(config, workdir=workdir)
  image_names = os.listdir(os.path.join(data_root, 'derived_png_meow2', 'images'))
  per_case = collections.Counter(n.split('-IM-')[0] for n in image_names)
  assert len(train) == sum(per_case[c] for c in data.OFFICIAL_SETS['training'])
  assert len(evaluate) == sum(per_case[c] for c in data.OFFICIAL_SETS['validation'])
  assert train.images.shape == (len(train), 64, 64, 1) and train.images.dtype == np.float32
  assert train.masks.shape == (len(train), 64, 64) and train.masks.dtype == np.int32
  assert not set(train.cases) & set(evaluate.cases)
  with open(os.path.join(workdir, 'split.json')) as f:
    record = json.load(f)
  assert record['train_cases'] == list(data.OFFICIAL_SETS['training'])
  assert record['eval_cases'] == list(data.OFFICIAL_SETS['validation'])
  assert record['train_frames'] == len(train) and record['eval_frames'] == len(evaluate)
  assert record['missing']['online'] == list(data.OFFICIAL_SETS['online'])
  assert record['frames_per_case'] == dict(sorted(per_case.items()))
  assert len(os.listdir(tmp_path / 'cache')) == 1

  def fail(*args, **kwargs):
    raise AssertionError('the cache was not used')

  monkeypatch.setattr(data, 'load_png_folder', fail)
  train2, evaluate2 = data.load_datasets(config)
  assert 'Data cache hit' in caplog.text
  for first, second in ((train, train2), (evaluate, evaluate2)):
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.masks, second.masks)
    assert first.images.dtype == second.images.dtype and first.masks.dtype == second.masks.dtype
    for a, b in zip(first.frames, second.frames):
      np.testing.assert_array_equal(a.image, b.image)
      np.testing.assert_array_equal(a.mask, b.mask)
      assert (a.case, a.frame_id, a.pixel_spacing, a.spacing_source, a.source_path) == (
          b.case, b.frame_id, b.pixel_spacing, b.spacing_source, b.source_path)
  # A different preprocessing config is a different cache entry.
  config.data.clip_percentiles = (0.5, 99.5)
  assert data.cache_key(config.data) != data.cache_key(_config(
      data_root, image_size=64, cache_dir=str(tmp_path / 'cache')).data)


def test_load_datasets_kfold_dicom(data_root, tmp_path):
  config = _config(data_root, source='dicom', split='kfold', num_folds=5, fold=2,
                   image_size=128, cache_dir=str(tmp_path))
  train, evaluate = data.load_datasets(config, workdir=str(tmp_path / 'run'))
  assert len(train) + len(evaluate) == 96
  assert len(evaluate.cases) == 1 and not set(train.cases) & set(evaluate.cases)
  with open(tmp_path / 'run' / 'split.json') as f:
    record = json.load(f)
  assert record['split'] == 'kfold' and record['fold'] == 2
  assert sorted(c for fold in record['folds'].values() for c in fold) == sorted(DICOM_CASES)
  assert record['eval_cases'] == record['folds']['2'] == evaluate.cases
  # Round trip to the original grid at 128: close to the expert masks at 256.
  dices = [_dice(evaluate.to_original(i, evaluate.masks[i]), f.mask)
           for i, f in enumerate(evaluate.frames)]
  assert np.mean(dices) > 0.95
  i = 0
  probabilities = np.eye(2, dtype=np.float32)[evaluate.masks[i]]
  np.testing.assert_array_equal(
      np.argmax(evaluate.to_original(i, probabilities), axis=-1),
      evaluate.to_original(i, evaluate.masks[i]))


# ------------------------------------------------------------------------------ preprocessing


def test_normalize_intensity_formula():
  rng = np.random.default_rng(0)
  image = rng.gamma(2.0, 100.0, size=(64, 48)).astype(np.float32)
  low, high = np.percentile(image.astype(np.float64), [1.0, 99.0])
  clipped = np.minimum(np.maximum(image.astype(np.float64), low), high)
  expected = (clipped - clipped.mean()) / clipped.std()
  out = data.normalize_intensity(image, (1.0, 99.0))
  np.testing.assert_allclose(out, expected, atol=1e-5)
  assert abs(out.mean()) < 1e-5 and abs(out.std() - 1.0) < 1e-5
  assert (out == out.max()).sum() >= int(0.01 * image.size)  # the top 1 % is clipped
  np.testing.assert_array_equal(data.normalize_intensity(np.full((4, 4), 7.0)), 0.0)
  with pytest.raises(ValueError, match='clip_percentiles'):
    data.normalize_intensity(image, (99.0, 1.0))


def test_preprocess_identity_and_resize_oracle():
  rng = np.random.default_rng(1)
  image = rng.normal(300, 80, size=(256, 256)).astype(np.float32)
  config = _config('/nonexistent')
  out, geometry = data.preprocess_image(image, config.data)
  assert out.shape == (256, 256, 1) and out.dtype == np.float32
  np.testing.assert_array_equal(out[..., 0], data.normalize_intensity(image, (1.0, 99.0)))
  config.data.image_size = 128
  out, geometry = data.preprocess_image(image, config.data)
  expected = jax.image.resize(data.normalize_intensity(image), (128, 128), 'linear',
                              antialias=True)
  np.testing.assert_allclose(out[..., 0], np.asarray(expected), atol=1e-4)
  assert geometry.original_shape == (256, 256) and geometry.scaled_shape == (128, 128)


def test_resize_non_square_keeps_aspect_and_inverts():
  config = _config('/nonexistent', image_size=128)
  image = np.random.default_rng(2).normal(size=(200, 240)).astype(np.float32)
  mask = np.zeros((200, 240), np.uint8)
  mask[60:140, 80:170] = 1
  out, geometry = data.preprocess_image(image, config.data)
  assert geometry.scaled_shape == (107, 128) and out.shape == (128, 128, 1)
  # 128 - 107 = 21 padding rows (11 on top, 10 below) hold the darkest normalized value.
  normalized = data.normalize_intensity(image)
  np.testing.assert_array_equal(out[:11, :, 0], normalized.min())
  np.testing.assert_array_equal(out[118:, :, 0], normalized.min())
  assert (out[11:118, :, 0] > normalized.min()).mean() > 0.9
  mask_s = data.preprocess_mask(mask, geometry)
  assert mask_s.dtype == np.int32 and mask_s.shape == (128, 128)
  back = geometry.invert(mask_s)
  assert back.shape == (200, 240) and _dice(back, mask) > 0.97


def test_crop_mode_is_exact():
  config = _config('/nonexistent', image_size=128, resize_mode='crop')
  rng = np.random.default_rng(3)
  image = rng.normal(size=(256, 256)).astype(np.float32)
  mask = (rng.random((256, 256)) > 0.5).astype(np.uint8)
  out, geometry = data.preprocess_image(image, config.data)
  normalized = data.normalize_intensity(image)
  np.testing.assert_array_equal(out[..., 0], normalized[64:192, 64:192])
  mask_s = data.preprocess_mask(mask, geometry)
  np.testing.assert_array_equal(mask_s, mask[64:192, 64:192])
  expected = np.zeros_like(mask)
  expected[64:192, 64:192] = mask[64:192, 64:192]
  np.testing.assert_array_equal(geometry.invert(mask_s), expected)
  # Larger grid: centred padding, exact inverse.
  config.data.image_size = 300
  out, geometry = data.preprocess_image(image, config.data)
  np.testing.assert_array_equal(out[22:278, 22:278, 0], normalized)
  np.testing.assert_array_equal(out[:22, :, 0], normalized.min())
  np.testing.assert_array_equal(geometry.invert(data.preprocess_mask(mask, geometry)), mask)


def test_unknown_resize_mode():
  with pytest.raises(ValueError, match=r"choices: \['crop', 'resize', 'roi'\]"):
    data.preprocess_image(np.zeros((8, 8)), _config('/x', resize_mode='zoom').data)


def _disc(shape, centre, radius):
  rows, cols = np.indices(shape)
  return ((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius ** 2).astype(np.uint8)


def test_roi_mode_centres_the_lv_at_roi_mm_per_grid():
  config = _config('/nonexistent', image_size=128, resize_mode='roi', roi_mm=100.0)
  disc = _disc((256, 256), (90, 150), 20)
  centre = data.mask_centre(disc)
  assert centre == (90.0, 150.0)
  image = np.random.default_rng(4).normal(size=(256, 256)).astype(np.float32) + 3 * disc
  out, geometry = data.preprocess_image(image, config.data, centre, (1.25, 1.25))
  # 100 mm at 1.25 mm per pixel = 80 pixels across 128: x1.6, 256 -> 409.6 -> 410 rows.
  assert out.shape == (128, 128, 1) and geometry.scaled_shape == (410, 410)
  mask_s = data.preprocess_mask(disc, geometry)
  rows, cols = np.flatnonzero(mask_s.any(axis=1)), np.flatnonzero(mask_s.any(axis=0))
  # The disc's centre lands on the grid's centre, 63.5: the window offset is rounded to a
  # pixel (<= 0.5) and the bounding box of a rasterized disc is symmetric to within 0.5.
  assert abs((rows[0] + rows[-1]) / 2 - 63.5) <= 1.0
  assert abs((cols[0] + cols[-1]) / 2 - 63.5) <= 1.0
  # 41 pixels across become 41 x 410/256 = 65.7 (+-1 for the rasterization at either edge).
  assert abs(rows[-1] - rows[0] + 1 - 41 * 410 / 256) <= 1.0
  back = geometry.invert(mask_s)
  assert back.shape == (256, 256) and _dice(back, disc) > 0.99
  # Anisotropic pixels: each axis gets its own scale.
  _, geometry = data.preprocess_image(image, config.data, centre, (1.25, 2.5))
  assert geometry.scaled_shape == (410, 819)


def test_roi_mode_needs_a_centre():
  config = _config('/x', image_size=16, resize_mode='roi')
  with pytest.raises(ValueError, match="resize_mode='roi' needs each frame's LV centre"):
    data.preprocess_image(np.zeros((32, 32)), config.data)


def test_roi_windows_follow_the_expert_through_the_cache_and_given_centres_past_it(tmp_path):
  _png_tree(tmp_path)    # 12 x 12 frames, every mask rows 3-6, columns 2-8: centre (4.5, 5)
  # roi_mm = 8 pixels at the nominal spacing: the native grid, cut around the expert's LV.
  config = _config(str(tmp_path), image_size=8, resize_mode='roi',
                   roi_mm=8 * 1.3672, cache_dir=str(tmp_path / 'cache')).data
  built = data.load_dataset(config)
  # Offsets: round(4.5 + 0.5 - 4) = 1 row, round(5 + 0.5 - 4) = 2 columns (half to even).
  expected = data.Geometry((12, 12), 8, (12, 12), (1, 2))
  assert built.geometries == [expected] * 4
  window = np.zeros((8, 8), np.int32)
  window[2:6, 0:7] = 1         # mask rows 3-6, columns 2-8, moved by the offsets
  np.testing.assert_array_equal(built.masks[0], window)
  cached = data.load_dataset(config)
  assert cached.geometries == built.geometries
  np.testing.assert_array_equal(cached.images, built.images)
  # A localizer's centres (as evaluate passes them) place the windows instead, past the cache
  # that holds the expert-centred ones, and write no entry of their own.
  asked = []
  located = data.load_dataset(config, centres=lambda frames: asked.append(len(frames))
                              or [(7.5, 7.5)] * len(frames))
  assert asked == [4]
  # Offsets round(7.5 + 0.5 - 4) = 4 in both axes.
  assert located.geometries == [data.Geometry((12, 12), 8, (12, 12), (4, 4))] * 4
  assert len(os.listdir(tmp_path / 'cache')) == 1


# ------------------------------------------------------------------------------ batches


def _toy_dataset(n=30, size=4):
  images = np.arange(n * size * size, dtype=np.float32).reshape(n, size, size, 1)
  masks = (np.arange(n)[:, None, None] % 2 * np.ones((n, size, size))).astype(np.int32)
  frames = [data.Frame(case=f'C{i}', frame_id=f'IM-0001-{i:04d}', instance=i,
                       image=np.zeros((size, size), np.float32), mask=None, contour=None,
                       pixel_spacing=(1.0, 1.0), spacing_source='nominal') for i in range(n)]
  geometries = [data.Geometry.create((size, size), size)] * n
  return data.Dataset(images, masks, frames, geometries, name='toy')


def test_batches_cover_each_frame_once_with_padding():
  dataset = _toy_dataset(30)
  batches = list(dataset.batches(8, seed=3, epoch=0, drop_remainder=False, process_count=1,
                                 process_index=0))
  assert len(batches) == 4
  for batch in batches:
    assert batch['image'].shape == (8, 4, 4, 1) and batch['image'].dtype == np.float32
    assert batch['mask'].shape == (8, 4, 4) and batch['mask'].dtype == np.int32
    assert batch['valid'].dtype == bool and batch['index'].dtype == np.int32
    rows = batch['index'][batch['valid']]
    np.testing.assert_array_equal(batch['image'][batch['valid']], dataset.images[rows])
    np.testing.assert_array_equal(batch['mask'][batch['valid']], dataset.masks[rows])
  last = batches[-1]
  assert last['valid'].tolist() == [True] * 6 + [False] * 2
  assert (last['index'][~last['valid']] == -1).all() and (last['image'][~last['valid']] == 0).all()
  seen = np.concatenate([b['index'][b['valid']] for b in batches])
  assert sorted(seen.tolist()) == list(range(30))
  assert seen.tolist() != list(range(30))  # shuffled


def test_batches_deterministic_and_drop_remainder():
  dataset = _toy_dataset(30)

  def order(seed, epoch, **kw):
    return np.concatenate([b['index'] for b in dataset.batches(
        8, seed=seed, epoch=epoch, process_index=0, process_count=1, **kw)]).tolist()

  assert order(0, 1) == order(0, 1)
  assert order(0, 1) != order(0, 2) and order(0, 1) != order(1, 1)
  dropped = order(0, 1)
  assert len(dropped) == 24 and len(set(dropped)) == 24 and min(dropped) >= 0
  assert dropped == order(0, 1, drop_remainder=False)[:24]
  assert order(0, 5, shuffle=False) == list(range(24))


def test_batches_shard_across_processes():
  dataset = _toy_dataset(30)
  whole = list(dataset.batches(8, seed=0, epoch=4, drop_remainder=False, process_index=0,
                               process_count=1))
  shards = [list(dataset.batches(8, seed=0, epoch=4, drop_remainder=False, process_index=p,
                                 process_count=4)) for p in range(4)]
  for b, batch in enumerate(whole):
    for key in ('image', 'mask', 'valid', 'index'):
      assert all(shard[b][key].shape[0] == 2 for shard in shards)
      np.testing.assert_array_equal(np.concatenate([shard[b][key] for shard in shards]),
                                    batch[key])
  # Defaults come from JAX (one process here).
  default_batches = list(dataset.batches(8, seed=0, epoch=4, drop_remainder=False))
  np.testing.assert_array_equal(default_batches[0]['index'], whole[0]['index'])


def test_batches_bad_arguments():
  dataset = _toy_dataset(5)
  with pytest.raises(ValueError, match='divisible by the process count 2'):
    dataset.batches(3, seed=0, epoch=0, process_index=0, process_count=2)
  with pytest.raises(ValueError, match='fewer than one batch of 8'):
    dataset.batches(8, seed=0, epoch=0, process_index=0, process_count=1)


# ------------------------------------------------------------------------------ bad input


def _write_dicom(path, pixels, instance, location, trigger, spacing=(1.5, 1.5),
                 patient='SCD0000101'):
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = MRImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = DicomDataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
  ds.PatientID, ds.Modality = patient, 'MR'
  ds.InstanceNumber, ds.SliceLocation, ds.TriggerTime = instance, location, trigger
  ds.PixelSpacing = list(spacing)
  ds.SliceThickness = ds.SpacingBetweenSlices = 8
  ds.ImagePositionPatient = [0, 0, location]
  ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, 'MONOCHROME2'
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
  ds.PixelData = pixels.astype(np.int16).tobytes()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  ds.save_as(path, enforce_file_format=True)


SQUARE = '4 3\n10 3\n10 12\n4 12\n'   # rows 3..12, columns 4..10


def _cap_tree(root, size=16):
  """A CAP-layout tree: 1 case, 2 slices x 2 phases, a contour on frame 3."""
  series = root / 'SCD_IMAGES_01' / 'SCD0000101' / 'CINESAX_1'
  rng = np.random.default_rng(0)
  # Instances 1, 2 at location 20 (slice 0), 3, 4 at location 12 (slice 1).
  for instance, location, trigger in ((1, 20.0, 10.0), (2, 20.0, 50.0), (3, 12.0, 10.0),
                                      (4, 12.0, 50.0)):
    _write_dicom(str(series / f'IM-0005-{instance:04d}.dcm'),
                 rng.integers(0, 1000, (size, size)), instance, location, trigger)
  expert = root / 'SCD_ManualContours' / 'SC-HF-I-01' / 'contours-manual' / 'IRCCI-expert'
  expert.mkdir(parents=True)
  (expert / 'IM-0001-0003-icontour-manual.txt').write_text(SQUARE)
  (root / 'scd_patientdata.csv').write_text(
      'PatientID,OriginalID,Gender,Age,Pathology\nSCD0000101,SC-HF-I-1,Male,53,HF\n')
  return series, expert


def _dicom_config(root, **overrides):
  return _config(str(root), source='dicom', **overrides).data


def test_generated_tree_loads(tmp_path):
  series, _ = _cap_tree(tmp_path)
  frames = data.load_frames(_dicom_config(tmp_path), contoured_only=False)
  assert [(f.instance, f.slice_index, f.phase_index) for f in frames] == [
      (1, 0, 0), (2, 0, 1), (3, 1, 0), (4, 1, 1)]
  expected = np.zeros((16, 16), np.uint8)
  expected[3:13, 4:11] = 1
  np.testing.assert_array_equal(frames[2].mask, expected)
  assert [f.mask is None for f in frames] == [True, True, False, True]
  assert frames[0].pixel_spacing == (1.5, 1.5) and frames[0].spacing_between_slices == 8.0
  np.testing.assert_array_equal(
      frames[0].image, pydicom.dcmread(str(series / 'IM-0005-0001.dcm')).pixel_array)
  contoured = data.load_frames(_dicom_config(tmp_path))
  assert [f.frame_id for f in contoured] == ['IM-0001-0003']


@pytest.mark.parametrize('content, message', [
    (b'this is not a DICOM file\n', 'not a DICOM file'),
    (bytes(range(256)) * 4, 'not a DICOM file'),
    (None, 'cannot decode the DICOM pixel data'),   # a real DICOM, truncated
])
def test_corrupt_dicom(tmp_path, content, message):
  series, _ = _cap_tree(tmp_path)
  bad = series / 'IM-0005-0005.dcm'
  if content is None:
    content = (series / 'IM-0005-0001.dcm').read_bytes()[:-100]
  bad.write_bytes(content)
  with pytest.raises(data.DataError, match=message) as info:
    data.load_frames(_dicom_config(tmp_path))
  assert info.value.path == str(bad)


@pytest.mark.parametrize('text, message', [
    ('', 'empty contour file'),
    ('4 3\n10 3\n', 'only 2 distinct point'),
    ('4 3\n10 3\nten 12\n', 'line 3: non-numeric'),
    ('4 3\n10 3\n10 16\n', r'line 3: point \(x=10, y=16\) lies outside the 16x16 image'),
])
def test_bad_contour_in_series(tmp_path, text, message):
  _, expert = _cap_tree(tmp_path)
  bad = expert / 'IM-0001-0003-icontour-manual.txt'
  bad.write_text(text)
  with pytest.raises(data.DataError, match=message) as info:
    data.load_frames(_dicom_config(tmp_path))
  assert str(info.value).startswith(f'{bad}: ')


def test_contour_without_frame(tmp_path):
  _, expert = _cap_tree(tmp_path)
  (expert / 'IM-0001-0099-icontour-manual.txt').write_text(SQUARE)
  with pytest.raises(data.DataError, match='no matching frame: no DICOM with InstanceNumber 99'):
    data.load_frames(_dicom_config(tmp_path))


def test_frames_of_different_sizes(tmp_path):
  series, _ = _cap_tree(tmp_path)
  odd = series / 'IM-0005-0005.dcm'
  _write_dicom(str(odd), np.zeros((20, 16)), 5, 4.0, 10.0)
  with pytest.raises(data.DataError, match=r'frame size 20x16 differs from the 16x16 of the '
                     r'other 4 frames') as info:
    data.load_frames(_dicom_config(tmp_path))
  assert info.value.path == str(odd)


def test_duplicate_instance_number(tmp_path):
  series, _ = _cap_tree(tmp_path)
  _write_dicom(str(series / 'IM-0005-0009.dcm'), np.zeros((16, 16)), 2, 20.0, 90.0)
  with pytest.raises(data.DataError, match='InstanceNumber 2 also used by'):
    data.load_frames(_dicom_config(tmp_path))


def test_case_missing_from_patient_sheet(tmp_path):
  _cap_tree(tmp_path)
  _write_dicom(str(tmp_path / 'SCD_IMAGES_01' / 'SCD0000901' / 'CINESAX_2' / 'IM-0001-0001.dcm'),
               np.zeros((16, 16)), 1, 0.0, 0.0, patient='SCD0000901')
  with pytest.raises(data.DataError, match='SCD id SCD0000901 is not in the patient sheet'):
    data.load_frames(_dicom_config(tmp_path))


def test_contours_without_images_and_images_without_contours(tmp_path):
  _cap_tree(tmp_path)
  other = tmp_path / 'SCD_ManualContours' / 'SC-N-02' / 'contours-manual' / 'IRCCI-expert'
  other.mkdir(parents=True)
  with pytest.raises(data.DataError, match='contours but no DICOM frames.*SC-N-02'):
    data.load_frames(_dicom_config(tmp_path))


def test_missing_or_empty_data_directory(tmp_path):
  with pytest.raises(data.DataError, match='data directory does not exist'):
    data.load_frames(_config(str(tmp_path / 'absent')).data)
  with pytest.raises(data.DataError, match='data directory is empty'):
    data.load_frames(_config(str(tmp_path)).data)
  (tmp_path / 'README').write_text('x')
  with pytest.raises(data.DataError, match=r'no DICOM folders SCD_IMAGES_\*/<SCD id>/'):
    data.load_frames(_dicom_config(tmp_path))
  with pytest.raises(data.DataError, match='PNG image folder does not exist'):
    data.load_frames(_config(str(tmp_path)).data)
  (tmp_path / 'derived_png_meow2' / 'images').mkdir(parents=True)
  with pytest.raises(data.DataError, match='no PNG images in the folder'):
    data.load_frames(_config(str(tmp_path)).data)


def test_skip_mode_warns_and_counts(tmp_path, caplog):
  caplog.set_level(logging.INFO, logger='absl')
  series, expert = _cap_tree(tmp_path)
  (series / 'IM-0005-0007.dcm').write_bytes(b'garbage')
  (expert / 'IM-0001-0099-icontour-manual.txt').write_text(SQUARE)   # no frame 99
  (expert / 'IM-0001-0004-icontour-manual.txt').write_text('1 1\n')  # too few points
  (expert / 'IM-0001-0001-icontour-manual.txt').write_text(SQUARE)   # fine
  report = data.LoadReport('skip')
  frames = data.load_frames(_dicom_config(tmp_path, on_error='skip'), report=report)
  assert [f.instance for f in frames] == [1, 3]
  assert sorted(os.path.basename(p) for p, _ in report.skipped) == [
      'IM-0001-0004-icontour-manual.txt', 'IM-0001-0099-icontour-manual.txt', 'IM-0005-0007.dcm']
  assert 'Skipped 3 item(s)' in caplog.text
  assert caplog.text.count('Skipping ') == 3
  # The cache keeps the report: a hit warns again.
  config = _dicom_config(tmp_path, on_error='skip', cache_dir=str(tmp_path / 'cache'),
                         image_size=16)
  first = data.load_dataset(config)
  caplog.clear()
  second = data.load_dataset(config)
  assert 'Data cache hit' in caplog.text and len(second.skipped) == len(first.skipped) == 3
  assert 'Skipped 3 item(s)' in caplog.text


def _png_tree(root, cases=('SC-N-02', 'SC-HYP-01'), size=12):
  folder = root / 'derived_png_meow2'
  (folder / 'images').mkdir(parents=True)
  (folder / 'i_labels').mkdir()
  rng = np.random.default_rng(0)
  for case in cases:
    for number in (20, 40):
      name = f'{case}-IM-0001-{number:04d}.dcm.png'
      Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(
          folder / 'images' / name)
      label = np.zeros((size, size), np.uint8)
      label[3:7, 2:9] = 255
      Image.fromarray(label).save(folder / 'i_labels' / name)
  return folder


def test_png_cache_key_tracks_files(tmp_path):
  folder = _png_tree(tmp_path)
  config = _config(str(tmp_path), image_size=8, cache_dir=str(tmp_path / 'cache')).data
  dataset = data.load_dataset(config)
  assert len(dataset) == 4 and dataset.cases == ['SC-HYP-01', 'SC-N-02']
  key = data.cache_key(config)
  assert data.cache_key(config) == key
  label = folder / 'i_labels' / 'SC-N-02-IM-0001-0020.dcm.png'
  stat = os.stat(label)
  os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  assert data.cache_key(config) != key
  data.load_dataset(config)
  assert len(os.listdir(tmp_path / 'cache')) == 2


@pytest.mark.parametrize('problem, message', [
    ('orphan_label', 'mask has no matching image'),
    ('bad_name', r'file name does not match <case>-IM-XXXX-NNNN\[.dcm\].png'),
    ('size', 'mask size 5x5 differs from the image size 12x12'),
    ('not_binary', r'not a binary mask: values \[0, 7, 255\]'),
    ('corrupt', 'not a readable PNG image'),
    ('colour', 'colour image'),
])
def test_bad_png_input(tmp_path, problem, message):
  folder = _png_tree(tmp_path)
  name = 'SC-N-02-IM-0001-0020.dcm.png'
  if problem == 'orphan_label':
    bad = folder / 'i_labels' / 'SC-N-02-IM-0001-0099.dcm.png'
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(bad)
  elif problem == 'bad_name':
    bad = folder / 'images' / 'scan_0001.png'
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(bad)
  elif problem == 'size':
    bad = folder / 'i_labels' / name
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(bad)
  elif problem == 'not_binary':
    bad = folder / 'i_labels' / name
    values = np.zeros((12, 12), np.uint8)
    values[0, :3], values[1, :3] = 7, 255
    Image.fromarray(values).save(bad)
  elif problem == 'corrupt':
    bad = folder / 'images' / name
    bad.write_bytes(b'\x89PNG\r\n\x1a\n' + b'\x00' * 20)
  else:
    bad = folder / 'images' / name
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(
        bad)
  with pytest.raises(data.DataError, match=message) as info:
    data.load_frames(_config(str(tmp_path)).data)
  assert info.value.path == str(bad)
  # With on_error='skip' the rest loads and the item is counted.
  report = data.LoadReport('skip')
  frames = data.load_frames(_config(str(tmp_path), on_error='skip').data, report=report)
  assert len(report.skipped) == 1 and report.skipped[0][0] == str(bad)
  assert len(frames) == (4 if problem in ('orphan_label', 'bad_name') else 3)


def test_on_error_and_source_choices(tmp_path):
  with pytest.raises(ValueError, match=r"choices: \['raise', 'skip'\]"):
    data.LoadReport('ignore')
  with pytest.raises(ValueError, match=r"choices: \['acdc', 'dicom', 'nifti', 'png'\]"):
    data.load_frames(_config(str(tmp_path), source='nrrd').data)


def test_case_names():
  assert data.normalize_case_id('SC-HF-I-1') == 'SC-HF-I-01'
  assert data.normalize_case_id('SC-N-40') == 'SC-N-40'
  assert data.normalize_case_id('SC-HYP-3') == 'SC-HYP-03'
  assert data.normalize_case_id('patient7') == 'patient7'
  assert data.parse_png_name('SC-HF-NI-04-IM-0001-0100.dcm.png') == ('SC-HF-NI-04',
                                                                     'IM-0001-0100', 100)
  assert contours.parse_contour_filename('IM-0001-0100-icontour-manual.txt') == (100, 'i')


def _blocks(shape, block, num_labels, seed):
  """A label map constant on `block` x `block` tiles aligned to the grid."""
  rng = np.random.default_rng(seed)
  tiles = rng.integers(0, num_labels, (shape[0] // block, shape[1] // block))
  return np.kron(tiles, np.ones((block, block), np.int64)).astype(np.int32)


@pytest.mark.parametrize('shape,mode', [((256, 256), 'resize'), ((256, 192), 'resize'),
                                        ((192, 256), 'resize'), ((256, 256), 'crop'),
                                        ((96, 160), 'crop')])
@pytest.mark.parametrize('num_labels', [2, 3])
def test_geometry_apply_then_invert_is_exact_where_the_mapping_is(shape, mode, num_labels):
  """Halving (longer side 256 -> 128) maps aligned 8 px tiles to 4 px tiles exactly: a pixel's
  antialiased window reaches 1 px into the next tile at weight 1/8, and the inverse's linear
  weights are 3/4 for the nearer of two small pixels, so each label keeps the majority. Crop
  mode copies pixels. Either way apply -> invert gives back every pixel inside the window."""
  labels = _blocks(shape, 8, num_labels, seed=sum(shape) + num_labels)
  geometry = data.Geometry.create(shape, 128, mode)
  back = geometry.invert(geometry.apply(labels, labels=True))
  expected = labels.copy()
  if mode == 'crop':   # outside the 128 x 128 window there is nothing to map back
    inside = np.zeros(shape, bool)
    (r0, r1), (c0, c1) = [(max(0, (n - 128) // 2), max(0, (n - 128) // 2) + min(n, 128))
                          for n in shape]
    inside[r0:r1, c0:c1] = True
    expected[~inside] = 0
  np.testing.assert_array_equal(back, expected)


def test_geometry_invert_errs_only_next_to_label_boundaries():
  """At a non-integer scale (200 x 240 -> 128) resampling can move a label boundary by at most
  about one original pixel each way (triangle kernels of width <= 2 px in the small grid): every
  pixel farther than 2 px from a boundary comes back exactly."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  labels = _blocks((200, 240), 8, 3, seed=5)
  geometry = data.Geometry.create(labels.shape, 128, 'resize')
  back = geometry.invert(geometry.apply(labels, labels=True))
  edges = np.zeros(labels.shape, bool)
  edges[:-1] |= labels[:-1] != labels[1:]
  edges[1:] |= labels[:-1] != labels[1:]
  edges[:, :-1] |= labels[:, :-1] != labels[:, 1:]
  edges[:, 1:] |= labels[:, :-1] != labels[:, 1:]
  far = ndimage.distance_transform_edt(~edges) > 2
  np.testing.assert_array_equal(back[far], labels[far])
  assert (back != labels).mean() < 0.1


# ------------------------------------------------------------------------------ myocardium


def test_class_map_labels_cavity_myocardium_and_the_unknown_rest():
  cavity = np.zeros((6, 6), np.uint8)
  cavity[2:4, 2:4] = 1
  epi = np.zeros((6, 6), np.uint8)
  epi[1:5, 1:5] = 1
  np.testing.assert_array_equal(data.class_map(cavity, epi, myocardium=False), cavity)
  want = np.zeros((6, 6), np.int32)
  want[1:5, 1:5] = data.MYOCARDIUM
  want[2:4, 2:4] = data.CAVITY
  np.testing.assert_array_equal(data.class_map(cavity, epi, myocardium=True), want)
  rest = np.where(cavity == 1, data.CAVITY, data.BACKGROUND_OR_MYOCARDIUM)
  np.testing.assert_array_equal(data.class_map(cavity, None, myocardium=True), rest)


@pytest.mark.parametrize('source', ['png', 'dicom'])
def test_myocardium_loads_the_epicardium_where_the_expert_drew_one(data_root, source, tmp_path):
  """PNG: o_labels read back with PIL. DICOM: the ocontour polygons, rasterized, equal the
  PNG copy's o_labels (the data README's check), and SC-HF-I-06 has none (excluded there)."""
  config = _config(data_root, source=source, myocardium=True, cache_dir=str(tmp_path))
  frames = data.load_frames(config.data)
  with_epi = [f for f in frames if f.epi_mask is not None]
  o_dir = os.path.join(data_root, 'derived_png_meow2', 'o_labels')
  if source == 'png':
    assert len(frames) == 526 and len(with_epi) == 526 - 253   # the data README's counts
  else:
    assert {f.case for f in with_epi} == {'SC-HF-I-01', 'SC-HF-I-02', 'SC-HF-I-04',
                                          'SC-HF-I-05'}
    assert all(f.epi_contour is not None for f in with_epi)
  for f in with_epi[::10]:
    png = np.asarray(Image.open(os.path.join(o_dir, f'{f.case}-{f.frame_id}.dcm.png')))
    np.testing.assert_array_equal(f.epi_mask, (png > 0).astype(np.uint8))
    # The cavity lies inside the epicardium, but for a few pixels where the expert's two
    # contours cross (7 of the 273 PNG frames, at most 21 pixels = 1.2% of that cavity).
    assert np.count_nonzero(f.mask > f.epi_mask) <= 0.015 * np.count_nonzero(f.mask)
  # The dataset's class maps, through the cache and back.
  dataset = data.load_dataset(config.data)
  again = data.load_dataset(config.data)
  np.testing.assert_array_equal(dataset.masks, again.masks)
  for i, f in enumerate(again.frames):
    expected = dataset.frames[i].epi_mask
    assert (f.epi_mask is None) == (expected is None)
    if expected is not None:
      np.testing.assert_array_equal(f.epi_mask, expected)
  labels = [set(np.unique(m).tolist()) for m in dataset.masks]
  for f, found in zip(dataset.frames, labels):
    if f.epi_mask is None:
      assert found <= {data.CAVITY, data.BACKGROUND_OR_MYOCARDIUM}
    else:
      assert found <= {data.BACKGROUND, data.CAVITY, data.MYOCARDIUM}
