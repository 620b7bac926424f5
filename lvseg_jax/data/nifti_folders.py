"""The `nifti` source: a folder of image volumes and a folder of label volumes of the same
names, as nnU-Net's raw data (and the Medical Segmentation Decathlon) lay them out:

  <data.root>/imagesTr/patient001_frame01_0000.nii.gz   (`data.nifti_images`; nnU-Net's channel
  <data.root>/labelsTr/patient001_frame01.nii.gz         suffix _0000 is optional)

Volumes are 3D [x, y, slice] (one phase) or 4D [x, y, slice, time], with a label volume of the
same shape (values: `data.labels`). A case is one patient: the first group of `data.case_regex`
on the volume's name (the whole name when empty), so that several volumes of a patient (ED and
ES, or a cine) stay in one fold. A case's volumes are its phases, in name order. Folds are
shuffled (seeded) but not stratified: the layout has no pathology groups.
"""

import collections
import functools
import os
import re
from typing import Any

from lvseg_jax.data import nifti
from lvseg_jax.data.records import DataError, Frame, LoadReport, load_cases, root_dir

CHANNEL_SUFFIX = re.compile(r'_(\d{4})$')   # nnU-Net: <name>_0000 is channel 0 of <name>


def _folder(data_config: Any, field: str) -> str:
  folder = os.path.join(root_dir(data_config), str(data_config[field]))
  if not os.path.isdir(folder):
    raise DataError(folder, f'no such folder (config.data.{field}, under data.root)')
  return folder


def case_of(name: str, data_config: Any, path: str) -> str:
  """The case (patient) of volume `name` by `data.case_regex`."""
  if not data_config.case_regex:
    return name
  match = re.match(data_config.case_regex, name)
  if match is None:
    raise DataError(path, f'its name {name!r} does not match config.data.case_regex '
                    f'{data_config.case_regex!r}')
  return match.group(1) if match.groups() else match.group(0)


def _volumes(data_config: Any) -> dict[str, list[tuple[str, str]]]:
  """Case -> [(volume name, image path)] in name order."""
  cases, folder = collections.defaultdict(list), _folder(data_config, 'nifti_images')
  for entry in sorted(os.listdir(folder)):
    path = os.path.join(folder, entry)
    if not nifti.is_nifti(path):
      continue
    name = nifti.case_name(path)
    channel = CHANNEL_SUFFIX.search(name)
    if channel:
      if channel.group(1) != '0000':
        raise DataError(path, 'a second image channel: single-channel (cine MR) volumes only')
      name = name[:channel.start()]
    cases[case_of(name, data_config, path)].append((name, path))
  return dict(cases)


def _label_path(data_config: Any, name: str) -> str:
  folder = _folder(data_config, 'nifti_labels')
  for suffix in nifti.SUFFIXES:
    if os.path.exists(os.path.join(folder, name + suffix)):
      return os.path.join(folder, name + suffix)
  return os.path.join(folder, name + '.nii.gz')


def _load_case(case: str, volumes: list[tuple[str, str]], data_config: Any) -> list[Frame]:
  frames, phase = [], 0
  for name, image_path in volumes:
    label_path = _label_path(data_config, name)
    if not os.path.exists(label_path):
      raise DataError(label_path, f'missing: the label volume of {image_path}')
    loaded = nifti.load_labelled_volume(image_path, label_path, data_config)
    timed = loaded[-1].phase_index > 0
    for frame in loaded:
      frame.frame_id = f'{name}-slice{frame.slice_index:02d}' + (
          f'-phase{frame.phase_index:02d}' if timed else '')
      frame.case, frame.phase_index = case, phase + frame.phase_index
      frame.instance = len(frames) + 1
      frames.append(frame)
    phase += loaded[-1].phase_index + 1
  return frames


def load_source(data_config: Any, cases: set[str] | None, contoured_only: bool,
                report: LoadReport) -> list[Frame]:
  """The slices of every labelled volume (`cases`: only those); slices without a cavity label
  are left out with `contoured_only`."""
  return load_cases(_volumes(data_config),
                    functools.partial(_load_case, data_config=data_config), cases,
                    contoured_only, report)


def source_files(data_config: Any) -> list[str]:
  """The image volumes and their label volumes (the cache key)."""
  return [p for volumes in _volumes(data_config).values() for name, image in volumes
          for p in (image, _label_path(data_config, name)) if os.path.exists(p)]


def source_cases(data_config: Any) -> list[str]:
  return sorted(_volumes(data_config))


def groups(data_config: Any) -> dict[str, str]:
  """One group for every case: folds shuffled, not stratified."""
  return {case: '' for case in source_cases(data_config)}
