"""DICOM SEG output: written per phase by predict, read back with highdicom and pydicom."""

import glob
import json
import os

import highdicom as hd
import numpy as np
import pydicom
import pytest

from configs import default
from lvseg_jax import checkpointing
from lvseg_jax import models
from lvseg_jax import predict
from lvseg_jax import pretrained
from lvseg_jax.predict import outputs
from lvseg_jax.predict import pipeline


def _shipped_with_seg():
  """(config, variables) of the shipped model with predict.save_dicom_seg on."""
  trained, variables = checkpointing.load_for_inference(pretrained.path())
  config = default.get_config()
  config.predict.save_dicom_seg = True
  config.predict.progress = False
  return pipeline.inference_config(config, trained, ['predict.save_dicom_seg']), variables


@pytest.mark.filterwarnings('ignore:Invalid value for VR UI')   # the SCD's anonymized UIDs
def test_seg_files_read_back_to_the_predicted_label_maps(data_root, tmp_path):
  # SC-HF-I-02: 9 slices x 2 phases; the shipped three-class model.
  run, variables = _shipped_with_seg()
  (series,) = predict.find_series(os.path.join(data_root, 'SCD_IMAGES_01', 'SCD0000201'), run)
  collected = []
  pipeline.run_series(models.get_model(run.model), variables, [series], run, str(tmp_path),
                      collect=collected)
  (_, predictions, summary), = collected
  files = sorted(glob.glob(str(tmp_path / series.name / 'dicom_seg' / '*.dcm')))
  assert [os.path.basename(f) for f in files] == ['phase00.dcm', 'phase01.dcm']
  assert summary['outputs']['dicom_seg']['count'] == 2
  # The SCD's anonymized headers: each image its own Frame of Reference, dates of month 0.
  assert any('DICOM SEG: source attributes' in w for w in summary['warnings'])
  uids = set()
  for phase, path in enumerate(files):
    ds = pydicom.dcmread(path)
    assert ds.Modality == 'SEG' and int(ds.NumberOfFrames) == 9 * 2   # 9 slices x 2 segments
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ['LV cavity', 'LV myocardium']
    uids.add(ds.SeriesInstanceUID)
    group = sorted((p for p in predictions if p.frame.phase_index == phase),
                   key=lambda p: p.frame.slice_index)
    sources = [pydicom.dcmread(p.frame.source_path, stop_before_pixels=True) for p in group]
    seg = hd.seg.segread(path)
    labels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[s.SOPInstanceUID for s in sources], combine_segments=True)
    expected = np.stack([outputs.label_map(p) for p in group])
    assert set(np.unique(expected)) == {0, 1, 2}
    np.testing.assert_array_equal(labels, expected)
  assert len(uids) == 1   # the phases of one cine form one SEG series


def test_seg_is_only_for_dicom_input(data_root, tmp_path):
  run, variables = _shipped_with_seg()
  images = tmp_path / 'pngs'
  images.mkdir()
  name = 'SC-HF-I-01-IM-0001-0048.dcm.png'
  os.symlink(os.path.join(data_root, 'derived_png_meow2', 'images', name), images / name)
  summaries = pipeline.run_series(models.get_model(run.model), variables,
                                  predict.find_series(str(images), run), run,
                                  str(tmp_path / 'out'))
  assert any('not a DICOM series; no DICOM SEG written' in w for w in summaries[0]['warnings'])
  with open(tmp_path / 'out' / summaries[0]['series'] / 'summary.json') as f:
    assert 'dicom_seg' not in json.load(f)['outputs']
