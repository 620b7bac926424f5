"""NIfTI volumes as input: the round trip through predict's own NIfTI writer, and bad files."""

import glob
import json
import os

import nibabel as nib
import numpy as np
import pytest

from configs import default
from lvseg_jax import checkpointing
from lvseg_jax import data
from lvseg_jax import models
from lvseg_jax import predict
from lvseg_jax import pretrained
from lvseg_jax.predict import pipeline

SERIES = 'SCD0000201'   # SC-HF-I-02: 9 slices x 2 phases, 256 x 256, int16 intensities


@pytest.fixture(scope='module')
def round_trip(data_root, tmp_path_factory):
  """Predicts the DICOM series with the shipped model, then the `_image.nii.gz` that
  prediction wrote: (dicom series, nifti series, dicom output, nifti output)."""
  trained, variables = checkpointing.load_for_inference(pretrained.path())
  run = pipeline.inference_config(default.get_config(), trained)
  run.predict.progress = False
  model = models.get_model(run.model)
  out = tmp_path_factory.mktemp('nifti')
  (dicom,) = predict.find_series(os.path.join(data_root, 'SCD_IMAGES_01', SERIES), run)
  pipeline.run_series(model, variables, [dicom], run, str(out / 'dicom'))
  (image_path,) = glob.glob(str(out / 'dicom' / '*' / '*_image.nii.gz'))
  (nifti,) = predict.find_series(image_path, run)
  pipeline.run_series(model, variables, [nifti], run, str(out / 'nifti'))
  return dicom, nifti, out / 'dicom', out / 'nifti'


def test_a_volume_predict_wrote_loads_back_as_the_same_frames(round_trip):
  dicom, nifti, _, _ = round_trip
  assert nifti.kind == 'nifti' and len(nifti.frames) == len(dicom.frames) == 18
  by_cell = {(f.slice_index, f.phase_index): f for f in dicom.frames}
  for f in nifti.frames:
    d = by_cell[(f.slice_index, f.phase_index)]
    np.testing.assert_array_equal(f.image, d.image)   # int16 in the file: exact
    # Spacing and cosines pass through the affine's column norms (float64; the DICOM cosines
    # are unit vectors to ~1e-6), so 1e-6 relative. Positions: the affine holds one slice step,
    # (last - first) / (n - 1), and the DICOM positions carry 3 decimals, so a slice between
    # the first and last may differ by up to 5e-4 mm; 1e-3 mm is still a 1/8000 of a slice.
    np.testing.assert_allclose(f.pixel_spacing, d.pixel_spacing, rtol=1e-6)
    np.testing.assert_allclose(f.image_position, d.image_position, atol=1e-3)
    np.testing.assert_allclose(f.image_orientation, d.image_orientation, atol=1e-6)
    assert f.slice_position == pytest.approx(d.slice_position, abs=1e-3)
  assert nifti.frames[0].spacing_between_slices == pytest.approx(
      dicom.frames[0].spacing_between_slices, rel=1e-5)


def test_a_volume_predicts_to_the_masks_and_volumes_of_its_dicom_series(round_trip):
  _, _, dicom_out, nifti_out = round_trip
  (dicom_mask,) = glob.glob(str(dicom_out / '*' / '*_mask.nii.gz'))
  (nifti_mask,) = glob.glob(str(nifti_out / '*' / '*_mask.nii.gz'))
  a, b = nib.load(dicom_mask), nib.load(nifti_mask)
  labels = np.asarray(a.dataobj)
  assert labels.shape == (256, 256, 9, 2) and set(np.unique(labels)) == {0, 1, 2}
  np.testing.assert_array_equal(np.asarray(b.dataobj), labels)
  np.testing.assert_allclose(b.affine, a.affine, atol=1e-4)
  with open(dicom_out / 'summary.json') as f:
    d = json.load(f)['series'][0]
  with open(nifti_out / 'summary.json') as f:
    n = json.load(f)['series'][0]
  # The same areas and a slice spacing equal to 1e-5: volumes agree to 1e-5 relative.
  for key in ('edv_ml', 'esv_ml'):
    assert n['volumes'][key] == pytest.approx(d['volumes'][key], rel=1e-5)
  assert (n['volumes']['ed_phase'], n['volumes']['es_phase']) == (
      d['volumes']['ed_phase'], d['volumes']['es_phase'])


def test_folders_of_volumes_label_volumes_and_bad_files(tmp_path, round_trip):
  _, _, dicom_out, _ = round_trip
  (image_path,) = glob.glob(str(dicom_out / '*' / '*_image.nii.gz'))
  folder = tmp_path / 'in'
  folder.mkdir()
  volume = nib.load(image_path)
  nib.save(volume, folder / 'patient001_4d.nii.gz')
  one_phase = nib.Nifti1Image(np.asarray(volume.dataobj)[..., 0], volume.affine)
  nib.save(one_phase, folder / 'patient001_frame01.nii.gz')
  nib.save(one_phase, folder / 'patient001_frame01_gt.nii.gz')   # ACDC labels: not an image
  config = default.get_config()
  found = predict.find_series(str(folder), config)
  assert [(s.name, len(s.frames)) for s in found] == [('patient001_4d', 18),
                                                      ('patient001_frame01', 9)]
  assert {f.phase_index for f in found[1].frames} == {0}
  (folder / 'broken.nii.gz').write_bytes(b'not a nifti file')
  with pytest.raises(data.DataError, match=r'broken\.nii\.gz: not a readable NIfTI file'):
    predict.find_series(str(folder), config)
  config.predict.on_error = 'skip'
  report = data.LoadReport('skip')
  assert len(predict.find_series(str(folder), config, report)) == 2
  assert report.skipped[0][0].endswith('broken.nii.gz')
  flat = tmp_path / 'flat.nii'
  nib.save(nib.Nifti1Image(np.zeros((8, 1, 1), np.int16), np.eye(4)), flat)
  with pytest.raises(data.DataError, match=r'flat\.nii: expected a 3D .* got shape \(8, 1, 1\)'):
    data.load_nifti_series(str(flat))

