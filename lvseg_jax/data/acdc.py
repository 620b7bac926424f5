"""The ACDC layout (Bernard et al., IEEE TMI 2018): one folder per patient under `data.root`
(at any depth, e.g. `training/patient001/`), each with

  Info.cfg                       ED: 1, ES: 12, Group: DCM, Height: ..., Weight: ...
  patient001_frame01.nii.gz      the ED volume [x, y, slice]; patient001_frame12.nii.gz ES
  patient001_frame01_gt.nii.gz   its labels (`data.labels`: ACDC 1 RV, 2 myocardium, 3 LV cavity)
  patient001_4d.nii.gz           the cine (prediction input; not read for training)

Frames are the slices of the ED and ES volumes (phase 0 = ED, 1 = ES); the cavity mask is the
label `data.labels.cavity`, the epicardium the cavity and `data.labels.myocardium`. Info.cfg's
Group stratifies the k-fold split.
"""

import functools
import os
from typing import Any

from lvseg_jax.data import nifti
from lvseg_jax.data.records import (DataError, Frame, LoadReport, load_cases, root_dir,
                                    walk_files)


def _patients(data_config: Any) -> dict[str, str]:
  """Patient name -> folder, for every folder under the root that holds an Info.cfg."""
  found = {}
  for path in walk_files(root_dir(data_config)):
    if os.path.basename(path) == 'Info.cfg':
      folder = os.path.dirname(path)
      found.setdefault(os.path.basename(folder), folder)
  return found


def read_info(path: str) -> dict[str, str]:
  """Info.cfg as {key: value} ('ED', 'ES', 'Group', 'Height', 'NbFrame', 'Weight')."""
  info = {}
  with open(path) as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      key, sep, value = line.partition(':')
      if not sep:
        raise DataError(path, f'line {number}: expected "key: value", got {line.strip()!r}')
      info[key.strip()] = value.strip()
  for key in ('ED', 'ES'):
    if not info.get(key, '').isdigit():
      raise DataError(path, f'{key} must be a frame number, got {info.get(key)!r}')
  return info


def groups(data_config: Any) -> dict[str, str]:
  """Patient -> pathology group (Info.cfg 'Group'), for stratified folds."""
  return {case: read_info(os.path.join(folder, 'Info.cfg')).get('Group', '')
          for case, folder in _patients(data_config).items()}


def _load_patient(case: str, folder: str, data_config: Any) -> list[Frame]:
  info = read_info(os.path.join(folder, 'Info.cfg'))
  frames = []
  for phase, key in enumerate(('ED', 'ES')):
    stem = os.path.join(folder, f'{case}_frame{int(info[key]):02d}')
    image_path, label_path = stem + '.nii.gz', stem + '_gt.nii.gz'
    for path in (image_path, label_path):
      if not os.path.exists(path):
        raise DataError(path, f'missing: Info.cfg names frame {info[key]} as {key}')
    images = nifti.load_labelled_volume(image_path, label_path, data_config)
    for k, frame in enumerate(images):
      frame.case, frame.phase_index = case, phase
      frame.frame_id = f'frame{int(info[key]):02d}-slice{k:02d}'
      frame.instance = phase * len(images) + k + 1
      frames.append(frame)
  return frames


def load_source(data_config: Any, cases: set[str] | None, contoured_only: bool,
                report: LoadReport) -> list[Frame]:
  """The ED and ES slices of every patient (`cases`: only those); slices without a cavity
  label are left out with `contoured_only` (as uncontoured SCD frames are)."""
  return load_cases(_patients(data_config),
                    functools.partial(_load_patient, data_config=data_config), cases,
                    contoured_only, report)


def source_files(data_config: Any) -> list[str]:
  """Info.cfg and the frame volumes of every patient (the cache key)."""
  return [p for folder in sorted(_patients(data_config).values()) for p in walk_files(folder)
          if os.path.basename(p) == 'Info.cfg' or
          (nifti.is_nifti(p) and not p.endswith(('_4d.nii.gz', '_4d.nii')))]


def source_cases(data_config: Any) -> list[str]:
  return sorted(_patients(data_config))
