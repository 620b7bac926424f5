"""Tests of lvseg_jax.predict and lvseg_jax.export: TTA, post-processing, contour files, NIfTI
geometry against the DICOM headers, bad input, and a full prediction run with a tiny model."""

import csv
import glob
import json
import os
import re
import shutil
import warnings

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
from PIL import Image
import pydicom
import pytest
from scipy import ndimage

from configs import default
from lvseg_jax import checkpointing
from lvseg_jax import contours
from lvseg_jax import data
from lvseg_jax import export
from lvseg_jax import metrics
from lvseg_jax import models
from lvseg_jax import predict
from lvseg_jax.predict import inference

SERIES = ('SCD0000201', 'SC-HF-I-02')  # the 18-frame series: 9 slices x 2 phases, all contoured
IMAGE_SIZE = 64


def predict_config():
  """A tiny IBU-Net config at 64 px for prediction (conftest's `tiny_config` is for training)."""
  config = default.get_config()
  config.model.name = 'ibu'
  config.model.base_width = 4
  config.model.depth = 2
  config.data.image_size = IMAGE_SIZE
  config.predict.batch_size = 8  # 18 frames: two full batches and a padded one
  return config


def random_variables(model, seed=0):
  """He-normal conv kernels, unit scales/variances, zero biases/means, from shapes only.

  `jax.eval_shape` instead of `model.init` keeps the test fast: initializing even a tiny model
  eagerly compiles dozens of small XLA programs.
  """
  shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), IMAGE_SIZE))
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = path[-1].key
    if name in ('scale', 'var'):
      return np.ones(s.shape, s.dtype)
    if name in ('bias', 'mean'):
      return np.zeros(s.shape, s.dtype)
    fan_in = int(np.prod(s.shape[:-1]))
    return rng.normal(0.0, np.sqrt(2.0 / fan_in), s.shape).astype(s.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def dicom_header(path):
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    return pydicom.dcmread(path, stop_before_pixels=True)


def read_csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


# ------------------------------------------------------------------------------ TTA


class PixelModel:
  """Per-pixel logits: commutes with every flip and rotation."""

  def apply(self, variables, x, train=False):
    del train
    return jnp.concatenate([-x * variables['w'], x * variables['w']], axis=-1)


class RampModel:
  """Logits with a left-to-right ramp: not equivariant, so TTA copies disagree."""

  def apply(self, variables, x, train=False):
    del train
    ramp = jnp.linspace(-3.0, 3.0, x.shape[2])[None, None, :, None]
    lv = x * variables['w'] + ramp
    return jnp.concatenate([jnp.zeros_like(lv), lv], axis=-1)


def softmax_np(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_tta_of_an_equivariant_model_changes_nothing():
  x = np.random.default_rng(0).normal(size=(3, 16, 16, 1)).astype(np.float32)
  variables = {'w': jnp.float32(2.0)}
  plain, plain_var = predict.make_forward_fn(PixelModel(), 'none')(variables, x)
  for mode in ('flips', 'd4'):
    mean, var = predict.make_forward_fn(PixelModel(), mode)(variables, x)
    np.testing.assert_allclose(mean, plain, atol=1e-6)
    np.testing.assert_allclose(var, 0.0, atol=1e-10)
  np.testing.assert_allclose(plain_var, 0.0)
  np.testing.assert_allclose(plain[..., 1], 1 / (1 + np.exp(-4 * x[..., 0])), rtol=1e-5)


def test_tta_d4_averages_the_eight_symmetries():
  x = np.random.default_rng(1).normal(size=(2, 12, 12, 1)).astype(np.float32)
  variables = {'w': jnp.float32(1.0)}
  # NumPy oracle: the 8 distinct elements of the square's symmetry group.
  outputs, views = [], []
  for flip in (False, True):
    for k in range(4):
      view = np.rot90(x[:, :, ::-1] if flip else x, k, axes=(1, 2))
      views.append(view)
      out = softmax_np(np.asarray(RampModel().apply(variables, jnp.asarray(view))))
      out = np.rot90(out, -k, axes=(1, 2))
      outputs.append(out[:, :, ::-1] if flip else out)
  assert len({v.tobytes() for v in views}) == 8
  outputs = np.stack(outputs)
  mean, var = predict.make_forward_fn(RampModel(), 'd4')(variables, x)
  np.testing.assert_allclose(mean, outputs.mean(0), atol=1e-5)
  np.testing.assert_allclose(var, outputs[..., 1].var(0), atol=1e-6)
  assert float(np.max(var)) > 0.01  # the ramp makes the copies disagree
  with pytest.raises(ValueError, match='tta_transforms'):
    predict.make_forward_fn(RampModel(), 'everything')


def test_unseen_tta_names_the_copies_training_never_made():
  augment = default.get_config().augment
  augment.flip_lr = augment.flip_ud = False
  assert predict.unseen_tta(augment, 'none') == ''
  assert 'without flip augmentation' in predict.unseen_tta(augment, 'lr')
  augment.flip_lr = True
  assert predict.unseen_tta(augment, 'flips') == ''
  assert 'at most 15 degrees' in predict.unseen_tta(augment, 'd4')   # the default rotation
  augment.rotation_deg = 180.0
  assert predict.unseen_tta(augment, 'd4') == ''
  augment.enabled = False
  assert 'without flip augmentation' in predict.unseen_tta(augment, 'flips')


def test_an_ensemble_averages_every_members_augmented_copies():
  x = np.random.default_rng(2).normal(size=(2, 12, 12, 1)).astype(np.float32)
  members = [{'w': jnp.float32(1.0)}, {'w': jnp.float32(-2.5)}]
  # NumPy oracle: each member on the identity and the left-right flip, mapped back.
  outputs = []
  for variables in members:
    for flip in (False, True):
      view = x[:, :, ::-1] if flip else x
      out = softmax_np(np.asarray(RampModel().apply(variables, jnp.asarray(view))))
      outputs.append(out[:, :, ::-1] if flip else out)
  outputs = np.stack(outputs)
  mean, var = predict.make_forward_fn(RampModel(), 'lr')(members, x)
  np.testing.assert_allclose(mean, outputs.mean(0), atol=1e-5)   # float32 softmax of O(1) logits
  np.testing.assert_allclose(var, outputs[..., 1].var(0), atol=1e-6)
  single, _ = predict.make_forward_fn(RampModel(), 'lr')(members[0], x)
  np.testing.assert_allclose(single, outputs[:2].mean(0), atol=1e-5)
  assert float(np.max(np.abs(mean - single))) > 0.05   # the second member counts


# ------------------------------------------------------------------------------ post-processing


def test_postprocess_keeps_the_largest_component_and_fills_holes():
  mask = np.zeros((40, 40), np.uint8)
  mask[5:25, 5:25] = 1          # 400 px square ...
  mask[12:18, 12:18] = 0        # ... with a 36 px hole
  mask[30:35, 30:35] = 1        # a separate 25 px blob
  out = predict.postprocess_mask(mask, largest_component=True, fill_holes=True)
  assert out.dtype == np.uint8 and out.sum() == 400 and out[15, 15] == 1 and out[32, 32] == 0
  out = predict.postprocess_mask(mask, largest_component=False, fill_holes=True)
  assert out.sum() == 425
  out = predict.postprocess_mask(mask, largest_component=True, fill_holes=False)
  assert out.sum() == 364
  np.testing.assert_array_equal(predict.postprocess_mask(mask, False, False), mask)
  assert predict.postprocess_mask(np.zeros((5, 5)), True, True).sum() == 0


# ------------------------------------------------------------------------------ writers


def _blob_probabilities(shape, seed, centre, blobs):
  """(H, W, 3) softmax maps: a ring of myocardium around a cavity with a hole at `centre` and,
  with `blobs`, a stray cavity blob and one touching the left edge of the frame."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:shape[0], :shape[1]]
  r = np.hypot(yy - centre[0], xx - centre[1])
  cavity = (r < 9) & (r > 2)                                     # a hole at its centre
  if blobs:
    cavity |= np.hypot(yy - 10, xx - 85) < 3                      # stray blob
    cavity |= np.hypot(yy - 70, xx - 0) < 4                       # blob on the left edge
  myocardium = (r >= 9) & (r < 14)
  logits = rng.normal(0.0, 0.4, shape + (3,))
  logits += 3.0 * np.stack([~(cavity | myocardium), cavity, myocardium], axis=-1)
  return softmax_np(logits).astype(np.float32)


@pytest.mark.parametrize('seed, centre, blobs', [
    (0, (40.3, 51.7), True),     # the box spans the blobs
    (1, (40.3, 51.7), False),    # the box is the ring's own, plus the margin
    (2, (12.6, 80.2), False)])   # the ring is cut by the top edge: the frame clips the box
def test_post_processing_on_the_foreground_box_equals_the_whole_frame(seed, centre, blobs):
  """`_prediction` works on the box around the foreground; the oracle is the same
  post-processing and sub-pixel contours computed on the whole frame."""
  shape = (80, 96)
  probs = _blob_probabilities(shape, seed, centre, blobs)
  config = predict_config()
  frame = data.Frame(case='c', frame_id='IM-0001-0001', instance=1,
                     image=np.zeros(shape, np.float32), mask=None, contour=None,
                     pixel_spacing=(1.0, 1.0), spacing_source='nominal')
  p = inference._prediction(frame, probs, None, config)
  labels = np.argmax(probs, axis=-1)
  inset = float(config.data.mask_outset_px)
  mask = predict.postprocess_mask(labels == 1)
  contour = contours.offset_inward(metrics.probability_contour(
      (1.0 + probs[..., 1] - np.maximum(probs[..., 0], probs[..., 2])) / 2.0, mask), inset)
  epi = predict.postprocess_mask(labels != 0) | mask
  epi_contour = contours.offset_inward(metrics.probability_contour(
      (1.0 + np.maximum(probs[..., 1], probs[..., 2]) - probs[..., 0]) / 2.0, epi), inset)
  assert mask.sum() > 100 and not mask[60:, :10].any()   # a blob was not taken for the LV
  np.testing.assert_array_equal(p.mask, mask)
  np.testing.assert_array_equal(p.epi_mask, epi)
  # Same arithmetic on the same values, shifted by an integer offset: equal to rounding.
  np.testing.assert_allclose(p.contour, contour, rtol=0, atol=1e-9)
  np.testing.assert_allclose(p.epi_contour, epi_contour, rtol=0, atol=1e-9)
  np.testing.assert_array_equal(p.probability, probs[..., 1])


def test_overlay_draws_contours_over_the_windowed_image():
  """The overlay keeps the image pixels (1-99 percentile window, grey) away from the lines;
  the predicted contour is solid red, the expert's dashed green."""
  rng = np.random.default_rng(0)
  image = rng.uniform(100.0, 900.0, (64, 80)).astype(np.float32)
  image[20:45, 20:60] = 0.0   # dark where the lines are, so their colour is unmixed
  square = np.array([[25.0, 25.0], [55.0, 25.0], [55.0, 40.0], [25.0, 40.0]])  # (x, y)
  expert = square + 3.0 * np.sign(square - square.mean(0))      # 3 px outside
  rgb = export.OverlayWriter().render(image, square, expert, title='')
  assert rgb.shape == (64, 80, 3) and rgb.dtype == np.uint8
  lo, hi = np.percentile(image, [1.0, 99.0])
  grey = np.round(np.clip((image - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
  far = np.ones(image.shape, bool)
  far[15:50, 15:65] = False                    # the lines and their anti-aliasing
  far[45:, 40:] = False                        # the key (bottom right)
  for channel in range(3):
    np.testing.assert_array_equal(rgb[..., channel][far], grey[far])
  top_edge = rgb[25, 28:53]                    # predicted: solid, the full pixel row covered
  assert (top_edge[:, 0] >= 250).all() and (top_edge[:, 1:] <= 5).all()
  expert_edge = rgb[22, 25:56]                 # expert: dashes of 4 px with 3 px gaps
  green = (expert_edge[:, 1] >= 200) & (expert_edge[:, 0] <= 60)
  dark = expert_edge.max(axis=1) <= 60
  assert 12 <= green.sum() <= 24 and dark.sum() >= 6, (green.sum(), dark.sum())
  # Nothing drawn without contours or title: the windowed image itself.
  np.testing.assert_array_equal(export.OverlayWriter().render(image, None)[..., 0], grey)


def test_auto_contour_file_round_trip(tmp_path):
  y, x = np.mgrid[:64, :64]
  disk = ((x - 30.3) ** 2 + (y - 25.7) ** 2 <= 11.0 ** 2).astype(np.uint8)
  contour = metrics.mask_to_contour(disk)
  path = export.write_auto_contour(str(tmp_path), 48, contour)
  assert os.path.basename(path) == 'IM-0001-0048-icontour-auto.txt'
  with open(path) as f:
    lines = f.read().splitlines()
  assert len(lines) == len(contour)
  assert all(re.fullmatch(r'-?\d+\.\d\d -?\d+\.\d\d', line) for line in lines)
  back = contours.read_contour_file(path, image_shape=disk.shape)
  np.testing.assert_allclose(back, contour, atol=0.005 + 1e-9)
  assert export.write_auto_contour(str(tmp_path), 49, np.zeros((0, 2))) is None
  assert not os.path.exists(tmp_path / 'IM-0001-0049-icontour-auto.txt')


def test_uncertainty_scale_and_mask_png(tmp_path):
  variance = np.array([[0.0, 0.125], [0.25, 0.4]])
  np.testing.assert_array_equal(export.uncertainty_to_uint8(variance), [[0, 128], [255, 255]])
  export.write_uncertainty_png(str(tmp_path / 'u.png'), variance)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'u.png')),
                                [[0, 128], [255, 255]])
  export.write_mask_png(str(tmp_path / 'm.png'), np.array([[0, 1], [3, 0]]))
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'm.png')), [[0, 255], [255, 0]])


# ------------------------------------------------------------------------------ bad input


def test_bad_inputs_give_clear_errors(tmp_path, data_root):
  config = predict_config()
  with pytest.raises(predict.PredictError, match='does not exist'):
    predict.find_series(str(tmp_path / 'nope'), config)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(predict.PredictError, match='no DICOM series'):
    predict.find_series(str(tmp_path / 'empty'), config)
  (tmp_path / 'text').mkdir()
  (tmp_path / 'text' / 'notes.txt').write_text('not an image')
  with pytest.raises(predict.PredictError, match='no DICOM series'):
    predict.find_series(str(tmp_path / 'text'), config)
  with pytest.raises(predict.PredictError, match='input must be a NIfTI file .* or a folder'):
    predict.find_series(str(tmp_path / 'text' / 'notes.txt'), config)
  # Two frames of two different series in one folder.
  mixed = tmp_path / 'mixed'
  mixed.mkdir()
  for scd_id in ('SCD0000101', 'SCD0000201'):
    first = sorted(glob.glob(os.path.join(data_root, 'SCD_IMAGES_01', scd_id, '*', '*.dcm')))[0]
    shutil.copy(first, mixed / f'{scd_id}.dcm')
  with pytest.raises(predict.PredictError, match='2 different series'):
    predict.find_series(str(mixed), config)


def test_missing_pixel_spacing_falls_back_to_nominal(tmp_path, data_root):
  source = sorted(glob.glob(os.path.join(data_root, 'SCD_IMAGES_01', SERIES[0], '*',
                                         '*.dcm')))[:2]
  folder = tmp_path / 'series'
  folder.mkdir()
  for path in source:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      ds = pydicom.dcmread(path)
      del ds.PixelSpacing
      ds.save_as(str(folder / os.path.basename(path)))
  config = predict_config()
  config.data.nominal_spacing_mm = 1.5
  series, = predict.find_series(str(folder), config)
  assert all(f.pixel_spacing == (1.5, 1.5) and f.spacing_source == 'nominal'
             for f in series.frames)
  assert any('PixelSpacing' in w for w in series.warnings)


def test_slice_spacing_fallbacks():
  def frame(slice_index, position=None, spacing=None, thickness=None):
    return data.Frame(case='x', frame_id='f', instance=slice_index + 1,
                      image=np.zeros((4, 4), np.float32), mask=None, contour=None,
                      pixel_spacing=(1.0, 1.0), spacing_source='dicom', slice_index=slice_index,
                      phase_index=0, slice_position=position, spacing_between_slices=spacing,
                      slice_thickness=thickness)
  assert predict.slice_spacing([frame(0, 0.0, 9.0), frame(1, -9.0, 9.0)])[:2] == (9.0, 'dicom')
  assert predict.slice_spacing([frame(0, 0.0), frame(1, -7.5)])[:2] == (7.5, 'positions')
  assert predict.slice_spacing([frame(0, None, None, 6.0)])[:2] == (6.0, 'thickness')
  assert predict.slice_spacing([frame(0)], fallback_mm=5.0)[:2] == (5.0, 'config')
  value, source, notes = predict.slice_spacing([frame(0)])
  assert np.isnan(value) and source == 'none' and 'not computed' in notes[0]
  _, _, notes = predict.slice_spacing([frame(0, 0.0, 5.0), frame(1, 10.0, 5.0)])
  assert any('differs' in n for n in notes)


def test_predict_dtype_runs_the_trained_weights_in_bfloat16():
  trained = predict_config()
  run = predict_config()
  assert predict.inference_config(run, trained).model.dtype == 'float32'  # '' = as trained
  run.predict.dtype = 'bfloat16'
  config = predict.inference_config(run, trained)
  assert config.model.dtype == 'bfloat16' and trained.model.dtype == 'float32'
  variables = random_variables(models.get_model(trained.model))
  x = np.random.default_rng(0).normal(size=(2, IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)
  p32, p16 = (np.asarray(jax.nn.softmax(models.get_model(c.model).apply(variables, x)))
              for c in (trained, config))
  # bfloat16 keeps 8 mantissa bits: the probabilities move by about 1e-2, not more.
  assert 0 < np.abs(p16 - p32).max() < 0.05
  run.predict.dtype = 'float16'
  with pytest.raises(ValueError, match='predict.dtype'):
    predict.inference_config(run, trained)


# ------------------------------------------------------------------------------ a full run


@pytest.fixture(scope='module')
def tiny_workdir(tmp_path_factory):
  config = predict_config()
  workdir = str(tmp_path_factory.mktemp('workdir'))
  variables = random_variables(models.get_model(config.model))
  checkpointing.save_config(config, workdir)
  manager = checkpointing.Checkpointer(workdir)
  manager.save_best(1, variables, 0.5, {'step': 1})
  manager.close()
  return workdir, variables


@pytest.fixture(scope='module')
def prediction_run(tiny_workdir, data_root, tmp_path_factory):
  workdir, _ = tiny_workdir
  config = predict_config()
  config.predict.tta = True
  config.predict.contour_dir = os.path.join(data_root, 'SCD_ManualContours')
  output = str(tmp_path_factory.mktemp('prediction'))
  series_dir = os.path.join(data_root, 'SCD_IMAGES_01', SERIES[0])
  summaries = predict.predict(config, workdir, series_dir, output)
  return output, summaries, glob.glob(os.path.join(series_dir, '*'))[0]


def test_prediction_run_writes_every_output(prediction_run):
  output, summaries, dicom_dir = prediction_run
  assert len(summaries) == 1
  name = summaries[0]['series']
  assert name == 'SC-HF-I-02_CINESAX_300'
  folder = os.path.join(output, name)
  dicoms = sorted(glob.glob(os.path.join(dicom_dir, '*.dcm')))
  instances = sorted(int(dicom_header(p).InstanceNumber) for p in dicoms)
  ids = [f'IM-0001-{n:04d}' for n in instances]
  for sub in ('masks', 'overlays', 'uncertainty'):
    assert sorted(os.listdir(os.path.join(folder, sub))) == [f'{i}.png' for i in ids], sub
  rows = read_csv(os.path.join(folder, 'frames.csv'))
  assert sorted(r['frame_id'] for r in rows) == ids
  detected = {r['frame_id'] for r in rows if r['detected'] == '1'}
  assert detected, 'the tiny model should segment something'
  assert sorted(os.listdir(os.path.join(folder, 'contours'))) == sorted(
      f'{i}-icontour-auto.txt' for i in detected)
  for i in detected:
    points = contours.read_contour_file(os.path.join(folder, 'contours',
                                                     f'{i}-icontour-auto.txt'))
    assert points.shape[1] == 2 and len(points) >= 3
  for kind in ('mask', 'image'):
    assert os.path.isfile(os.path.join(folder, f'{name}_{kind}.nii.gz'))
  for path in ('volumes.csv', 'volume_curve.png', 'summary.json', '../summary.csv',
               '../summary.json'):
    assert os.path.isfile(os.path.join(folder, path)), path
  # Overlays are RGB images of the frame size; uncertainty maps are frame-size grey images.
  first = Image.open(os.path.join(folder, 'overlays', f'{ids[0]}.png'))
  assert first.mode == 'RGB' and first.size == (256, 256)
  unc = np.stack([np.asarray(Image.open(os.path.join(folder, 'uncertainty', f'{i}.png')))
                  for i in ids])
  assert unc.shape == (18, 256, 256) and unc.max() > 0


def _polygon_area_px(points):
  x, y = points[:, 0], points[:, 1]
  return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def test_prediction_areas_and_volumes_follow_the_contours(prediction_run):
  """Areas are the shoelace areas of the written sub-pixel contours (predict.areas='contour');
  volumes sum them x SpacingBetweenSlices over the cells the slice rules keep."""
  output, summaries, dicom_dir = prediction_run
  summary = summaries[0]
  folder = os.path.join(output, summary['series'])
  header = dicom_header(sorted(glob.glob(os.path.join(dicom_dir, '*.dcm')))[0])
  row_mm, col_mm = (float(v) for v in header.PixelSpacing)
  between = float(header.SpacingBetweenSlices)
  rows = read_csv(os.path.join(folder, 'frames.csv'))
  totals = {}
  for r in rows:
    mask = np.asarray(Image.open(os.path.join(folder, 'masks', f"{r['frame_id']}.png")))
    assert set(np.unique(mask)) <= {0, 255}
    path = os.path.join(folder, 'contours', f"{r['frame_id']}-icontour-auto.txt")
    assert os.path.exists(path) == (r['detected'] == '1')
    area = 0.0
    if os.path.exists(path):
      points = np.loadtxt(path)
      # The file holds 2 decimals: each point moves <= 0.005 * sqrt(2) px, the area by at most
      # that times the perimeter.
      perimeter = np.linalg.norm(np.diff(np.vstack([points, points[:1]]), axis=0), axis=1).sum()
      area = _polygon_area_px(points) * row_mm * col_mm
      assert float(r['area_mm2']) == pytest.approx(
          area, abs=0.0071 * perimeter * row_mm * col_mm + 1e-4)
    if not r['excluded']:
      t = int(r['phase_index'])
      totals[t] = totals.get(t, 0.0) + float(r['area_mm2']) * between / 1e3
    else:
      assert r['excluded'].startswith('cavity: apical: cavity ')   # no myocardium class here
  volumes = read_csv(os.path.join(folder, 'volumes.csv'))
  for v in volumes:
    assert float(v['volume_ml']) == pytest.approx(totals[int(v['phase_index'])], rel=1e-4)
  edv, esv = max(totals.values()), min(totals.values())
  top, = read_csv(os.path.join(output, 'summary.csv'))
  assert float(top['edv_ml']) == pytest.approx(edv, rel=1e-4)
  assert float(top['esv_ml']) == pytest.approx(esv, rel=1e-4)
  assert float(top['ef_pct']) == pytest.approx(100 * (edv - esv) / edv, rel=1e-3, abs=1e-3)
  assert int(top['ed_phase']) == max(totals, key=totals.get)
  # Expert volumes come with the run because predict.contour_dir was given.
  assert float(top['expert_edv_ml']) == pytest.approx(242, abs=0.5)  # the data README's EDV
  with open(os.path.join(folder, 'summary.json')) as f:
    saved = json.load(f)
  assert saved['expert']['phase']['ed_phase'] is not None
  assert saved['tta'] == 'flips' and saved['slice_spacing_source'] == 'dicom'


def test_nifti_affine_holds_the_dicom_geometry(prediction_run):
  output, summaries, dicom_dir = prediction_run
  name = summaries[0]['series']
  folder = os.path.join(output, name)
  mask_img = nib.load(os.path.join(folder, f'{name}_mask.nii.gz'))
  image_img = nib.load(os.path.join(folder, f'{name}_image.nii.gz'))
  np.testing.assert_allclose(image_img.affine, mask_img.affine)
  affine = mask_img.affine
  rows = {int(r['instance']): r for r in read_csv(os.path.join(folder, 'frames.csv'))}
  volume = np.asarray(mask_img.dataobj)
  image_volume = np.asarray(image_img.dataobj)
  assert volume.shape == (256, 256, 9, 2)
  paths = sorted(glob.glob(os.path.join(dicom_dir, '*.dcm')))
  header = dicom_header(paths[0])
  row_mm, col_mm = (float(v) for v in header.PixelSpacing)
  zooms = mask_img.header.get_zooms()
  np.testing.assert_allclose(zooms[:3], (col_mm, row_mm, float(header.SpacingBetweenSlices)),
                             rtol=1e-4)
  assert mask_img.header.get_qform(coded=True)[1] == 1
  inverse = np.linalg.inv(affine)
  seen = set()
  for path in paths:
    h = dicom_header(path)
    position = np.array([float(v) for v in h.ImagePositionPatient])
    cosines = np.array([float(v) for v in h.ImageOrientationPatient]).reshape(2, 3)
    spacing = [float(v) for v in h.PixelSpacing]
    for r, c in ((0, 0), (17, 203), (255, 255)):
      lps = position + c * spacing[1] * cosines[0] + r * spacing[0] * cosines[1]
      ras = np.array([-lps[0], -lps[1], lps[2], 1.0])
      voxel = inverse @ ras
      np.testing.assert_allclose(voxel[:2], (c, r), atol=1e-3)
      k = int(round(voxel[2]))
      assert abs(voxel[2] - k) < 1e-3 and 0 <= k < 9
    # The frame stored at that slice (and its phase) is this DICOM's frame and its mask.
    t = int(rows[int(h.InstanceNumber)]['phase_index'])
    seen.add((k, t))
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      pixels = pydicom.dcmread(path).pixel_array
    np.testing.assert_array_equal(image_volume[:, :, k, t].T, pixels)
    png = np.asarray(Image.open(os.path.join(folder, 'masks',
                                             f'IM-0001-{int(h.InstanceNumber):04d}.png')))
    np.testing.assert_array_equal(volume[:, :, k, t].T, png // 255)
  assert len(seen) == 18


def test_png_folder_of_unexpected_size(tiny_workdir, tmp_path):
  _, variables = tiny_workdir
  config = predict_config()
  folder = tmp_path / 'pngs'
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in (2, 10, 1):  # natural order: 1, 2, 10
    Image.fromarray(rng.integers(0, 255, (100, 80), dtype=np.uint8)).save(
        folder / f'scan_{i}.png')
  series, = predict.find_series(str(folder), config)
  assert series.kind == 'png' and [f.instance for f in series.frames] == [1, 2, 3]
  assert [os.path.basename(f.source_path) for f in series.frames] == [
      'scan_1.png', 'scan_2.png', 'scan_10.png']
  assert any('nominal' in w for w in series.warnings)
  model = models.get_model(config.model)
  output = str(tmp_path / 'out')
  summary, = predict.run_series(model, variables, [series], config, output)
  masks = sorted(glob.glob(os.path.join(output, series.name, 'masks', '*.png')))
  assert len(masks) == 3
  assert all(Image.open(p).size == (80, 100) for p in masks)
  assert summary['volumes'] is None and summary['num_slices'] is None
  nifti = nib.load(os.path.join(output, series.name, f'{series.name}_mask.nii.gz'))
  assert nifti.shape == (80, 100, 3)
  np.testing.assert_allclose(nifti.header.get_zooms()[:2], (1.3672, 1.3672), rtol=1e-4)


def test_tree_of_series_and_png_data_set_layout(tmp_path, data_root):
  config = predict_config()
  tree = tmp_path / 'tree'
  for scd_id, sub in (('SCD0000201', 'a'), ('SCD0000101', os.path.join('b', 'c'))):
    (tree / sub).mkdir(parents=True)
    for path in sorted(glob.glob(os.path.join(data_root, 'SCD_IMAGES_01', scd_id, '*',
                                              '*.dcm')))[:2]:
      shutil.copy(path, tree / sub)
  found = predict.find_series(str(tree), config)
  assert sorted(s.case for s in found) == ['SCD0000101', 'SCD0000201']
  assert len({s.name for s in found}) == 2 and all(len(s.frames) == 2 for s in found)
  # A PNG data set (images/ + i_labels/): the label PNGs are the expert, not another series.
  meow = os.path.join(data_root, 'derived_png_meow2')
  names = sorted(os.listdir(os.path.join(meow, 'images')))[:3]
  for sub in ('images', 'i_labels'):
    (tmp_path / 'pngset' / sub).mkdir(parents=True)
    for name in names:
      shutil.copy(os.path.join(meow, sub, name), tmp_path / 'pngset' / sub)
  found = predict.find_series(str(tmp_path / 'pngset'), config)
  assert sum(len(s.frames) for s in found) == 3
  for s in found:
    for f in s.frames:
      label = np.asarray(Image.open(os.path.join(meow, 'i_labels', os.path.basename(
          f.source_path))))
      np.testing.assert_array_equal(f.mask, label > 0)


class _TraceCounter:
  """A model whose `apply` counts how often it is traced (once per compilation of a jitted
  forward pass that calls it)."""

  def __init__(self, model):
    self.model, self.traces = model, 0

  def apply(self, *args, **kwargs):
    self.traces += 1
    return self.model.apply(*args, **kwargs)


def _tree_files(root):
  """{relative path: bytes} of the files under `root` but the summary.json files (they hold
  the run's `write_workers` and timings)."""
  files = {}
  for path in glob.glob(os.path.join(root, '**', '*'), recursive=True):
    if os.path.isfile(path) and not path.endswith('summary.json'):
      with open(path, 'rb') as f:
        files[os.path.relpath(path, root)] = f.read()
  return files


def test_a_tree_of_five_series_compiles_once_and_writes_the_same_with_any_workers(
    tmp_path, data_root):
  """Five series of 1 to 11 frames (full and padded batches) go through one jitted forward
  pass, traced once; the per-frame files written by a thread pool are byte for byte those of
  one writer thread."""
  config = predict_config()
  config.predict.progress = False
  dicoms = sorted(glob.glob(os.path.join(data_root, 'SCD_IMAGES_01', SERIES[0], '*', '*.dcm')))
  tree, start = tmp_path / 'tree', 0
  for k, count in enumerate((1, 3, 8, 11, 2)):
    (tree / f's{k}').mkdir(parents=True)
    for path in dicoms[start:start + count]:
      shutil.copy(path, tree / f's{k}')
    start = (start + count) % (len(dicoms) - 11)
  series = predict.find_series(str(tree), config)
  assert sorted(len(s.frames) for s in series) == [1, 2, 3, 8, 11]
  model = models.get_model(config.model)
  variables = random_variables(model, seed=4)
  counting = _TraceCounter(model)
  outputs = {}
  for workers in (1, 0):   # one thread; one per CPU core
    config.predict.write_workers = workers
    summaries = predict.run_series(counting, variables, series, config,
                                   str(tmp_path / f'out{workers}'))
    assert len(summaries) == 5
    outputs[workers] = _tree_files(str(tmp_path / f'out{workers}'))
    assert counting.traces == 1   # per run: five series, one compilation
    counting.traces = 0
  # NIfTI .gz headers hold no time stamp (nibabel writes mtime 0), so every file compares.
  assert sorted(outputs[0]) == sorted(outputs[1]) and len(outputs[1]) > 5 * 5
  assert all(outputs[0][name] == outputs[1][name] for name in outputs[1])


# ------------------------------------------------------------------- a full 20-phase cine


@pytest.fixture(scope='module')
def full_cine_run(tiny_workdir, data_root, tmp_path_factory):
  """SC-HF-I-04: 10 slices x 20 phases; the expert drew the endocardium at phases 6 and 19."""
  workdir, _ = tiny_workdir
  config = predict_config()
  config.predict.contour_dir = os.path.join(data_root, 'SCD_ManualContours')
  config.predict.save_overlays = False
  output = str(tmp_path_factory.mktemp('full_cine'))
  series_dir, = glob.glob(os.path.join(data_root, 'SCD_IMAGES_01', 'SCD0000301', '*'))
  summary, = predict.predict(config, workdir, series_dir, output)
  return output, summary, series_dir


def test_full_cine_volumes_ed_es_and_expert_columns(full_cine_run, data_root):
  """Against the DICOM headers and the contour text files, read here: the slice/phase of
  every frame, the expert areas (shoelace x pixel spacing), the expert volume of each phase
  and of each slice's extremes (the data README's definition), and ED/ES of both."""
  output, summary, series_dir = full_cine_run
  folder = os.path.join(output, summary['series'])
  headers = {int(h.InstanceNumber): h for h in map(
      dicom_header, glob.glob(os.path.join(series_dir, '*.dcm')))}
  assert len(headers) == 200
  h = headers[1]
  row_mm, col_mm = (float(v) for v in h.PixelSpacing)
  between = float(h.SpacingBetweenSlices)
  # SliceLocation orders the slices; TriggerTime orders the phases within a slice.
  locations = sorted({float(h.SliceLocation) for h in headers.values()},
                     key=lambda z: min(n for n, g in headers.items()
                                       if float(g.SliceLocation) == z))
  slice_of = {n: locations.index(float(g.SliceLocation)) for n, g in headers.items()}
  phase_of = {n: sorted(float(g.TriggerTime) for m, g in headers.items()
                        if slice_of[m] == slice_of[n]).index(float(g.TriggerTime))
              for n, g in headers.items()}
  expert = {}
  for path in glob.glob(os.path.join(data_root, 'SCD_ManualContours', 'SC-HF-I-04',
                                     'contours-manual', 'IRCCI-expert', '*-icontour-manual.txt')):
    x, y = np.loadtxt(path).T
    area_px = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    expert[int(os.path.basename(path).split('-')[2])] = area_px * row_mm * col_mm
  assert sorted({phase_of[n] for n in expert}) == [6, 19]

  rows = read_csv(os.path.join(folder, 'frames.csv'))
  assert len(rows) == 200
  for r in rows:
    n = int(r['instance'])
    assert (int(r['slice_index']), int(r['phase_index'])) == (slice_of[n], phase_of[n])
    if n in expert:   # written with 4 decimals
      assert float(r['expert_area_mm2']) == pytest.approx(expert[n], abs=1e-4)
    else:
      assert r['expert_area_mm2'] == ''
  predicted = np.zeros(20)
  for r in rows:   # the cells the slice rules keep (apical: no myocardium class here)
    if not r['excluded']:
      predicted[int(r['phase_index'])] += float(r['area_mm2']) * between / 1e3
  ed, es = int(np.argmax(predicted)), int(np.argmin(predicted))
  assert len(set(np.round(predicted, 3))) > 2   # ED/ES picked among distinct volumes
  for r in rows:
    assert (r['is_ed'], r['is_es']) == (str(int(int(r['phase_index']) == ed)),
                                        str(int(int(r['phase_index']) == es)))

  phase_volume = {t: sum(a for n, a in expert.items() if phase_of[n] == t) * between / 1e3
                  for t in (6, 19)}
  volumes = read_csv(os.path.join(folder, 'volumes.csv'))
  assert [int(v['phase_index']) for v in volumes] == list(range(20))
  for v in volumes:
    t = int(v['phase_index'])
    assert float(v['volume_ml']) == pytest.approx(predicted[t], abs=1e-3)
    assert (v['is_ed'], v['is_es']) == (str(int(t == ed)), str(int(t == es)))
    if t in phase_volume:
      assert float(v['expert_volume_ml']) == pytest.approx(phase_volume[t], abs=1e-4)
    else:
      assert v['expert_volume_ml'] == ''

  by_slice = {}
  for n, a in expert.items():
    by_slice.setdefault(slice_of[n], []).append(a)
  extrema_edv = sum(max(a) for a in by_slice.values()) * between / 1e3
  extrema_esv = sum(min(a) for a in by_slice.values()) * between / 1e3
  top, = read_csv(os.path.join(output, 'summary.csv'))
  assert (int(top['num_slices']), int(top['num_phases'])) == (10, 20)
  assert (int(top['ed_phase']), int(top['es_phase'])) == (ed, es)
  assert float(top['edv_ml']) == pytest.approx(predicted[ed], abs=1e-3)
  assert float(top['esv_ml']) == pytest.approx(predicted[es], abs=1e-3)
  assert float(top['expert_phase_edv_ml']) == pytest.approx(phase_volume[19], abs=1e-4)
  assert float(top['expert_phase_esv_ml']) == pytest.approx(phase_volume[6], abs=1e-4)
  assert float(top['expert_phase_ef_pct']) == pytest.approx(
      100 * (1 - phase_volume[6] / phase_volume[19]), abs=1e-4)
  assert float(top['expert_edv_ml']) == pytest.approx(extrema_edv, abs=1e-4)
  assert float(top['expert_esv_ml']) == pytest.approx(extrema_esv, abs=1e-4)
  # The data README's sanity check, rounded to whole ml: SC-HF-I-04 230/180.
  assert (round(extrema_edv), round(extrema_esv)) == (230, 180)
  with open(os.path.join(folder, 'summary.json')) as f:
    saved = json.load(f)
  assert (saved['expert']['phase']['ed_phase'], saved['expert']['phase']['es_phase']) == (19, 6)


# ------------------------------------------------------------------- a three-class model


@pytest.fixture(scope='module')
def three_class_run(data_root, tmp_path_factory):
  """A random tiny 3-class model (cavity, myocardium) on the 18-frame SC-HF-I-02 series."""
  config = predict_config()
  config.model.num_classes = 3
  config.data.myocardium = True
  workdir = str(tmp_path_factory.mktemp('three_class'))
  checkpointing.save_config(config, workdir)
  manager = checkpointing.Checkpointer(workdir)
  manager.save_best(1, random_variables(models.get_model(config.model), seed=3), 0.5,
                    {'step': 1})
  manager.close()
  config.predict.contour_dir = os.path.join(data_root, 'SCD_ManualContours')
  output = str(tmp_path_factory.mktemp('three_class_out'))
  series_dir = os.path.join(data_root, 'SCD_IMAGES_01', SERIES[0])
  summary, = predict.predict(config, workdir, series_dir, output)
  return output, summary, glob.glob(os.path.join(series_dir, '*'))[0]


def test_three_class_prediction_writes_myocardium_mass_and_both_contours(three_class_run):
  output, summary, dicom_dir = three_class_run
  folder = os.path.join(output, summary['series'])
  header = dicom_header(sorted(glob.glob(os.path.join(dicom_dir, '*.dcm')))[0])
  row_mm, col_mm = (float(v) for v in header.PixelSpacing)
  between = float(header.SpacingBetweenSlices)
  rows = read_csv(os.path.join(folder, 'frames.csv'))
  nifti = np.asarray(nib.load(os.path.join(folder, f"{summary['series']}_mask.nii.gz")).dataobj)
  assert set(np.unique(nifti)) == {0, 1, 2}
  myocardium_at_ed = 0.0
  ed = summary['volumes']['ed_phase']
  for r in rows:
    png = np.asarray(Image.open(os.path.join(folder, 'masks', f"{r['frame_id']}.png")))
    assert set(np.unique(png)) <= {0, 128, 255}
    for kind, area in (('i', r['area_mm2']), ('o', r['epi_area_mm2'])):
      path = os.path.join(folder, 'contours', f"{r['frame_id']}-{kind}contour-auto.txt")
      if float(area) > 0:   # areas inside the written contours (2 decimals: see above)
        points = np.loadtxt(path)
        assert _polygon_area_px(points) * row_mm * col_mm == pytest.approx(float(area),
                                                                            rel=2e-3)
      else:
        assert not os.path.exists(path)
    myocardium = float(r['myocardium_area_mm2'])
    assert myocardium == pytest.approx(max(float(r['epi_area_mm2']) - float(r['area_mm2']), 0),
                                       abs=2e-4)
    cavity, ring = png == 255, png == 128
    if cavity.any():   # the share of the cavity's 8-neighbour ring that is myocardium
      outside = ndimage.binary_dilation(cavity, np.ones((3, 3), bool)) & ~cavity
      assert float(r['myocardial_coverage']) == pytest.approx(
          np.count_nonzero(outside & ring) / np.count_nonzero(outside), abs=1e-4)
    if int(r['phase_index']) == ed and 'myocardium' not in r['excluded']:
      myocardium_at_ed += myocardium * between / 1e3
  top, = read_csv(os.path.join(output, 'summary.csv'))
  assert float(top['lv_mass_g']) == pytest.approx(1.05 * myocardium_at_ed, abs=1e-3)
  assert int(top['num_excluded']) == sum(bool(r['excluded']) for r in rows)
  with open(os.path.join(folder, 'summary.json')) as f:
    saved = json.load(f)
  assert saved['nifti']['labels'] == {'1': 'LV cavity', '2': 'LV myocardium'}
  assert len(saved['excluded']) == int(top['num_excluded'])
  assert all(e['reason'].startswith(('basal: ', 'apical: ')) for e in saved['excluded'])
  assert os.path.exists(os.path.join(folder, 'overlays', f"{rows[0]['frame_id']}.png"))


def test_slice_rules_and_mass_from_three_class_predictions():
  """summarize_series on crafted predictions: 4 slices x 2 phases, base first, 1.5 mm pixels,
  10 mm apart. Cavity discs shrink towards the apex; the myocardium is a ring 6 px wide, cut
  to its upper-right quarter on the basal slice at ES; the apical cavity at ES is 4 pixels
  (9 mm^2 < 20 mm^2)."""
  shape, spacing = (64, 64), (1.5, 1.5)
  yy, xx = np.mgrid[0:64, 0:64]
  radius = {(0, 0): 14, (1, 0): 13, (2, 0): 10, (3, 0): 6,
            (0, 1): 12, (1, 1): 11, (2, 1): 8, (3, 1): 1}
  frames, predictions = [], []
  for (s, t), r in radius.items():
    frame = data.Frame(case='X', frame_id=f'IM-0001-{20 * s + t + 1:04d}', instance=20 * s + t + 1,
                       image=np.zeros(shape, np.float32), mask=None, contour=None,
                       pixel_spacing=spacing, spacing_source='dicom', slice_index=s,
                       phase_index=t, spacing_between_slices=10.0)
    d2 = (xx - 31.5) ** 2 + (yy - 31.5) ** 2
    cavity = (d2 <= r * r).astype(np.uint8)
    epi = (d2 <= (r + 6) ** 2)
    if (s, t) == (0, 1):
      epi = epi & (((xx > 31.5) & (yy < 31.5)) | (cavity == 1))
    frames.append(frame)
    predictions.append(predict.Prediction(
        frame=frame, probability=cavity.astype(np.float32), mask=cavity,
        contour=metrics.mask_to_contour(cavity), uncertainty=None,
        epi_mask=epi.astype(np.uint8), epi_contour=metrics.mask_to_contour(epi)))
  config = predict_config()
  config.predict.areas = 'pixels'
  series = predict.Series(name='X', kind='dicom', folder='', frames=frames, case='X')
  summary = predict.summarize_series(series, predictions, config)
  assert summary['base_first'] is True
  assert [(e['slice'], e['phase'], e['part']) for e in summary['excluded']] == [
      (0, 1, 'cavity+myocardium'), (3, 1, 'cavity')]
  assert summary['excluded'][0]['frame_id'] == 'IM-0001-0002'
  by_id = {r['frame_id']: r for r in summary['frames']}
  assert by_id['IM-0001-0002']['excluded'].startswith('cavity+myocardium: basal: ')
  assert by_id['IM-0001-0062']['excluded'].startswith('cavity: apical: cavity ')
  px = 1.5 * 1.5
  area = {k: np.count_nonzero((xx - 31.5) ** 2 + (yy - 31.5) ** 2 <= r * r) * px
          for k, r in radius.items()}
  ring = {k: np.count_nonzero((xx - 31.5) ** 2 + (yy - 31.5) ** 2 <= (r + 6) ** 2) * px - area[k]
          for k, r in radius.items()}
  volumes = summary['volumes']
  assert (volumes['ed_phase'], volumes['es_phase']) == (0, 1)
  assert volumes['edv_ml'] == pytest.approx(sum(area[(s, 0)] for s in range(4)) * 10 / 1e3)
  assert volumes['esv_ml'] == pytest.approx((area[(1, 1)] + area[(2, 1)]) * 10 / 1e3)
  assert summary['lv_mass_g'] == pytest.approx(1.05 * sum(ring[(s, 0)] for s in range(4)) * 10
                                               / 1e3)


@pytest.mark.parametrize('shape,mode,row,expected', [
    ((256, 256), 'crop', 0, True),      # window rows 64..191 of 256: the frame goes on above
    ((256, 256), 'crop', 127, True),    # ... and below
    ((256, 256), 'crop', 60, False),    # inside the window
    ((128, 128), 'crop', 0, False),     # the window is the whole frame
    ((100, 100), 'crop', 0, False),     # padded: nothing beyond the window's edge
    ((256, 256), 'resize', 0, False),   # resized: the window holds the whole frame
])
def test_lv_cut_by_the_crop_window_is_flagged(shape, mode, row, expected):
  geometry = data.Geometry.create(shape, 128, mode)
  foreground = np.zeros((128, 128), bool)
  foreground[row, 50:60] = True
  assert inference._cut_by_window(foreground, geometry) is expected
  assert inference._cut_by_window(foreground.T, geometry) is expected   # columns alike


def test_frames_cut_by_the_crop_window_are_named_in_the_summary():
  frame = data.Frame(case='X', frame_id='IM-0001-0001', instance=1,
                     image=np.zeros((8, 8), np.float32), mask=None, contour=None,
                     pixel_spacing=(1.0, 1.0), spacing_source='dicom')
  mask = np.zeros((8, 8), np.uint8)
  p = predict.Prediction(frame=frame, probability=mask.astype(np.float32), mask=mask,
                         contour=np.zeros((0, 2)), uncertainty=None, cut_by_window=True)
  config = predict_config()
  summary = predict.summarize_series(
      predict.Series(name='X', kind='png', folder='', frames=[frame], case='X'), [p], config)
  assert any(w.startswith('1 frame(s) (IM-0001-0001): the LV reaches the edge of the central '
                          f'{config.data.image_size}-pixel window') for w in summary['warnings'])
