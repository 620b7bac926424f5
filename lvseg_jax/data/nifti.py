"""NIfTI volumes as frames: 3D (column, row, slice: one phase) or 4D cines (+ phase).

The axis convention and the affine are those `predict` writes (`export.write_nifti`): array
axes [column, row, slice(, phase)] and a RAS affine. Each frame gets its pixel spacing, slice
spacing and DICOM-style patient geometry (ImagePositionPatient / ImageOrientationPatient, LPS)
back from the affine, so volumes, slice order and the NIfTI written by predict match those of
the DICOM series the volume came from.
"""

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from lvseg_jax import export
from lvseg_jax.data.records import DataError, Frame

if TYPE_CHECKING:   # nibabel is imported where a file is read: `import lvseg_jax` stays light
  import nibabel as nib

SUFFIXES = ('.nii.gz', '.nii')


def is_nifti(path: str) -> bool:
  return path.lower().endswith(SUFFIXES)


def case_name(path: str) -> str:
  """'patient001_4d' for '.../patient001_4d.nii.gz'."""
  name = os.path.basename(path)
  for suffix in SUFFIXES:
    if name.lower().endswith(suffix):
      return name[:-len(suffix)]
  return name


def _time_step_ms(image: 'nib.Nifti1Image') -> float | None:
  zooms = image.header.get_zooms()
  if len(zooms) < 4 or not zooms[3]:
    return None
  unit = image.header.get_xyzt_units()[1]
  return float(zooms[3]) * {'sec': 1000.0, 'usec': 1e-3}.get(unit, 1.0)


def load_nifti_series(path: str) -> list[Frame]:
  """The frames of a 3D or 4D NIfTI volume (`path`), slice-major then phase, at native
  resolution; `frame_id` is 'sliceKK-phaseTT'.

  Raises:
    DataError: an unreadable file, or not a 3D/4D volume.
  """
  import nibabel as nib  # pylint: disable=g-import-not-at-top,redefined-outer-name
  try:
    image = nib.load(path)
    data = np.asarray(image.dataobj)
  except Exception as e:  # pylint: disable=broad-except  # nibabel raises many kinds
    raise DataError(path, f'not a readable NIfTI file ({type(e).__name__}: {e})') from None
  if data.ndim == 4 and data.shape[3] == 1:
    data = data[..., 0]
  if data.ndim == 3:
    data = data[..., None]
  if data.ndim != 4 or min(data.shape[:2]) < 2:
    raise DataError(path, 'expected a 3D (x, y, slice) or 4D (x, y, slice, time) volume, got '
                    f'shape {np.asarray(image.dataobj).shape}')
  lps = export.LPS_TO_RAS @ np.asarray(image.affine, np.float64)   # the map is its own inverse
  col_spacing, row_spacing = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
  if not (col_spacing > 0 and row_spacing > 0):
    raise DataError(path, f'the affine has a zero pixel spacing: {image.affine.tolist()}')
  row_cosines, col_cosines = lps[:3, 0] / col_spacing, lps[:3, 1] / row_spacing
  step = lps[:3, 2]
  normal = np.cross(row_cosines, col_cosines)
  time_step = _time_step_ms(image)
  case = case_name(path)
  num_slices, num_phases = data.shape[2], data.shape[3]
  frames = []
  for k in range(num_slices):
    position = lps[:3, 3] + k * step
    for t in range(num_phases):
      frames.append(Frame(
          case=case, frame_id=f'slice{k:02d}-phase{t:02d}', instance=k * num_phases + t + 1,
          image=np.ascontiguousarray(data[:, :, k, t].T, dtype=np.float32), mask=None,
          contour=None, pixel_spacing=(float(row_spacing), float(col_spacing)),
          spacing_source='nifti', spacing_between_slices=float(np.linalg.norm(step)) or None,
          slice_index=k, phase_index=t,
          trigger_time=None if time_step is None else t * time_step,
          image_position=tuple(float(v) for v in position),
          image_orientation=tuple(float(v) for v in np.concatenate([row_cosines, col_cosines])),
          slice_position=float(np.dot(position, normal)), source_path=path))
  return frames


def load_labelled_volume(image_path: str, label_path: str, data_config: Any) -> list[Frame]:
  """The frames of an image volume (`load_nifti_series`) with the masks of its label volume
  (the same [x, y, slice(, time)] shape): the cavity is the label `data.labels.cavity`; with
  `data.myocardium`, the epicardium is the cavity and `data.labels.myocardium`.

  Raises:
    DataError: an unreadable volume, or a label volume of another shape.
  """
  import nibabel as nib  # pylint: disable=g-import-not-at-top,redefined-outer-name
  frames = load_nifti_series(image_path)
  try:
    labels = np.asarray(nib.load(label_path).dataobj)
  except Exception as e:  # pylint: disable=broad-except  # nibabel raises many kinds
    raise DataError(label_path, f'not a readable NIfTI file ({type(e).__name__}: {e})') from None
  height, width = frames[0].shape
  num_slices, num_phases = frames[-1].slice_index + 1, frames[-1].phase_index + 1
  grid = labels if labels.ndim == 4 else labels[..., None]
  if grid.shape != (width, height, num_slices, num_phases):
    raise DataError(label_path, f'label volume {labels.shape} does not match its image volume '
                    f'{(width, height, num_slices) + ((num_phases,) if num_phases > 1 else ())}')
  cavity, myocardium = int(data_config.labels.cavity), int(data_config.labels.myocardium)
  for frame in frames:
    label = grid[:, :, frame.slice_index, frame.phase_index].T
    frame.mask = (label == cavity).astype(np.uint8)
    if data_config.myocardium:
      frame.epi_mask = np.isin(label, (cavity, myocardium)).astype(np.uint8)
  return frames
