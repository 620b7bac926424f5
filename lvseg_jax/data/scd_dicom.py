"""The SCD DICOM layout (Cardiac Atlas Project release) and single DICOM cine series.

`SCD_IMAGES_xx/<SCD id>/<series>/IM-k-NNNN.dcm` frames,
`SCD_ManualContours/<case>/contours-manual/IRCCI-expert/IM-0001-NNNN-icontour-manual.txt`
expert contours and `scd_patientdata.csv` (SCD id <-> case). A contour belongs to the frame
whose InstanceNumber is NNNN (the `IM-0001` prefix of contour files never matches the DICOM
prefix, so only NNNN is compared).
"""

import collections
import csv
import glob
import math
import os
import re
import warnings
from typing import Any

from absl import logging
import numpy as np
import pydicom
from pydicom import errors as pydicom_errors

from lvseg_jax import contours as contours_lib
from lvseg_jax.data.records import (DataError, Frame, LoadReport, normalize_case_id, root_dir,
                                    walk_files)

# Frames whose SliceLocation differs by less than this (mm) belong to one slice.
SLICE_TOLERANCE_MM = 0.01


def _float_or_none(value: Any) -> float | None:
  try:
    result = float(value)
  except (TypeError, ValueError):
    return None
  return result if math.isfinite(result) else None


def _floats_or_none(value: Any, count: int) -> tuple[float, ...] | None:
  try:
    result = tuple(float(v) for v in value)
  except (TypeError, ValueError):
    return None
  return result if len(result) == count and all(map(math.isfinite, result)) else None


def _instance_from_name(path: str) -> int | None:
  match = re.search(r'(\d+)(?:\.dcm)?$', os.path.basename(path), flags=re.IGNORECASE)
  return int(match[1]) if match else None


def _is_dicom_candidate(name: str) -> bool:
  # DICOM files from scanners often have no extension; DICOMDIR is an index, not a frame.
  if name.startswith('.') or name.upper() == 'DICOMDIR':
    return False
  stem, ext = os.path.splitext(name)
  return ext.lower() == '.dcm' or (ext == '' and bool(stem))


def list_dicom_files(folder: str) -> list[str]:
  """The files of `folder` that are DICOM frames by name (`*.dcm` or no extension), sorted."""
  return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                if _is_dicom_candidate(n) and os.path.isfile(os.path.join(folder, n)))


def read_dicom_frame(path: str, nominal_spacing_mm: float | None = None) -> Frame:
  """Reads one single-frame grayscale DICOM file into a `Frame` (case and indices unset).

  Raises:
    DataError: not a DICOM file, no or undecodable pixel data, multi-frame or colour data.
  """
  try:
    with warnings.catch_warnings():
      # The SCD headers carry UIDs with leading zeros; pydicom warns about each one.
      warnings.simplefilter('ignore')
      ds = pydicom.dcmread(path)
  except pydicom_errors.InvalidDicomError as e:
    raise DataError(path, f'not a DICOM file ({e})') from None
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(path, f'corrupt DICOM file ({type(e).__name__}: {e})') from None
  if 'PixelData' not in ds:
    raise DataError(path, 'DICOM file has no pixel data')
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      pixels = ds.pixel_array
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(path, f'cannot decode the DICOM pixel data ({type(e).__name__}: {e})') from None
  if pixels.ndim != 2:
    raise DataError(path, f'expected a single-frame grayscale image, got pixel array shape '
                    f'{pixels.shape}')
  image = pixels.astype(np.float32)
  slope = _float_or_none(ds.get('RescaleSlope'))
  intercept = _float_or_none(ds.get('RescaleIntercept'))
  if slope is not None and slope != 1.0:
    image = image * np.float32(slope)
  if intercept:
    image = image + np.float32(intercept)

  spacing = _floats_or_none(ds.get('PixelSpacing'), 2)
  spacing_source = 'dicom'
  if (spacing is None or min(spacing) <= 0) and nominal_spacing_mm is None:
    raise DataError(path, 'no valid PixelSpacing (set config.data.nominal_spacing_mm to use a '
                    'nominal spacing)')
  if spacing is None or min(spacing) <= 0:
    logging.warning('%s: no valid PixelSpacing; using the nominal %.4f mm', path,
                    nominal_spacing_mm)
    spacing, spacing_source = (nominal_spacing_mm, nominal_spacing_mm), 'nominal'
  position = _floats_or_none(ds.get('ImagePositionPatient'), 3)
  orientation = _floats_or_none(ds.get('ImageOrientationPatient'), 6)
  slice_position = None
  if position is not None and orientation is not None:
    normal = np.cross(orientation[:3], orientation[3:])
    slice_position = float(np.dot(position, normal))
  instance = ds.get('InstanceNumber')
  instance = int(instance) if instance not in (None, '') else _instance_from_name(path)
  return Frame(
      case=str(ds.get('PatientID', '') or ''), frame_id='', instance=instance, image=image,
      mask=None, contour=None, pixel_spacing=(float(spacing[0]), float(spacing[1])),
      spacing_source=spacing_source,
      slice_location=_float_or_none(ds.get('SliceLocation')),
      slice_thickness=_float_or_none(ds.get('SliceThickness')),
      spacing_between_slices=_float_or_none(ds.get('SpacingBetweenSlices')),
      trigger_time=_float_or_none(ds.get('TriggerTime')),
      image_position=position, image_orientation=orientation, source_path=str(path),
      slice_position=slice_position)


def _assign_slices_and_phases(frames: list[Frame]) -> None:
  """Sets slice_index (grouping by SliceLocation) and phase_index (order within the slice).

  Slices are numbered in acquisition order (smallest InstanceNumber first), which for the SCD
  equals (NNNN - 1) // 20; SliceLocation may run either way along the stack. Without
  SliceLocation the position along the slice normal is used; frames with neither keep None.
  """
  located = []
  for frame in frames:
    location = frame.slice_location if frame.slice_location is not None else frame.slice_position
    if location is not None:
      located.append((location, frame))
  located.sort(key=lambda lf: lf[0])
  groups: list[list[Frame]] = []
  last = None
  for location, frame in located:
    if last is None or location - last > SLICE_TOLERANCE_MM:
      groups.append([])
    groups[-1].append(frame)
    last = location
  groups.sort(key=lambda g: min(f.instance for f in g))
  for slice_index, group in enumerate(groups):
    group.sort(key=lambda f: (f.trigger_time if f.trigger_time is not None else math.inf,
                              f.instance))
    for phase_index, frame in enumerate(group):
      frame.slice_index, frame.phase_index = slice_index, phase_index


def load_dicom_series(folder: str, contour_dir: str | None = None, *, case: str | None = None,
                      contour: str = 'i', nominal_spacing_mm: float | None = None,
                      epicardium: bool = False, on_error: str = 'raise',
                      report: LoadReport | None = None) -> list[Frame]:
  """Loads one cine series (a folder of single-frame DICOMs), with expert contours if given.

  Works on a plain DICOM folder (prediction on new scans): every frame is returned, contoured
  or not, ordered by (slice_index, phase_index).

  Args:
    folder: the series folder (`*.dcm` files or extension-less DICOM files).
    contour_dir: SCD expert folder with `IM-0001-NNNN-<kind>contour-manual.txt` files, or None.
    case: case name for the frames; default: the DICOM PatientID, else the folder name.
    contour: contour kind that becomes `Frame.contour` / `Frame.mask` ('i', 'o', 'p1', 'p2').
    nominal_spacing_mm: used (with a warning) for files without PixelSpacing; None: such
      files are bad input.
    epicardium: also attach the `o` contours as `Frame.epi_contour` / `Frame.epi_mask`.
    on_error: 'raise' or 'skip' (ignored when `report` is given).
    report: collects skipped items across several series.

  Returns:
    The frames of the series.

  Raises:
    DataError: missing folder, unreadable file, frames of different sizes, duplicate instance
      numbers, bad contour file, or a contour without a matching frame (unless skipping).
  """
  report = report if report is not None else LoadReport(on_error)
  contours_lib.get_contour_kind(contour)
  if not os.path.isdir(folder):
    raise DataError(folder, 'DICOM series folder does not exist')
  paths = list_dicom_files(folder)
  known = set(paths)
  ignored = [n for n in sorted(os.listdir(folder)) if not n.startswith('.') and
             os.path.join(folder, n) not in known]
  if ignored:
    logging.warning('%s: ignoring %d entr(ies) that are not DICOM files by name: %s', folder,
                    len(ignored), ignored[:5])
  if not paths:
    report.problem(folder, 'no DICOM files (*.dcm or extension-less) in the series folder')
    return []
  frames = []
  for path in paths:
    try:
      frames.append(read_dicom_frame(path, nominal_spacing_mm))
    except DataError as e:
      report.problem(e.path, e.problem)

  # One series has one matrix size; a stray frame of another size would break stacking later.
  sizes = collections.Counter(f.shape for f in frames)
  if len(sizes) > 1:
    (common, count), = sizes.most_common(1)
    kept = []
    for frame in frames:
      if frame.shape != common:
        report.problem(frame.source_path,
                       f'frame size {frame.shape[0]}x{frame.shape[1]} differs from the '
                       f'{common[0]}x{common[1]} of the other {count} frames of series {folder}')
      else:
        kept.append(frame)
    frames = kept

  by_instance: dict[int, Frame] = {}
  kept = []
  for ordinal, frame in enumerate(frames, start=1):
    if frame.instance is None:
      frame.instance = ordinal  # No InstanceNumber and no number in the name: file order.
    if frame.instance in by_instance:
      report.problem(frame.source_path, f'InstanceNumber {frame.instance} also used by '
                     f'{by_instance[frame.instance].source_path}')
      continue
    by_instance[frame.instance] = frame
    kept.append(frame)
  frames = kept

  if case is None:
    case = (frames[0].case if frames and frames[0].case
            else os.path.basename(os.path.normpath(folder)))
  case = normalize_case_id(case)
  for frame in frames:
    frame.case = case
    frame.frame_id = f'IM-0001-{frame.instance:04d}'
  _assign_slices_and_phases(frames)

  if contour_dir is not None:
    attach_contours(frames, contour_dir, contour, report)
    if epicardium:
      attach_contours(frames, contour_dir, 'o', report, epicardium=True)
  frames.sort(key=lambda f: (f.slice_index if f.slice_index is not None else math.inf,
                             f.phase_index if f.phase_index is not None else 0, f.instance))
  return frames


def _contour_problem(report: LoadReport, path: str, error: Exception) -> None:
  """Reports a ContourError, whose message already starts with the file name."""
  message, prefix = str(error), f'{path}: '
  report.problem(path, message[len(prefix):] if message.startswith(prefix) else message)


def attach_contours(frames: list[Frame], contour_dir: str, kind: str, report: LoadReport,
                    every_contour_has_a_frame: bool = True, epicardium: bool = False) -> int:
  """Sets `contour` and `mask` of the frames whose InstanceNumber has a contour file of `kind`
  (`epi_contour` and `epi_mask` with `epicardium`).

  A contour file without a frame is bad input (a training case), or, with
  `every_contour_has_a_frame=False`, only logged (an expert folder beside a partial series).
  Returns the number of frames that got a contour.
  """
  if not os.path.isdir(contour_dir):
    report.problem(contour_dir, 'contour folder does not exist')
    return 0
  try:
    files = contours_lib.find_contour_files(contour_dir, kind)
  except contours_lib.ContourError as e:
    report.problem(contour_dir, str(e))
    return 0
  by_instance = {f.instance: f for f in frames}
  attached = 0
  for instance, path in sorted(files.items()):
    frame = by_instance.get(instance)
    if frame is None:
      folder = os.path.dirname(frames[0].source_path) if frames else '(no frames)'
      if every_contour_has_a_frame:
        report.problem(path, f'contour has no matching frame: no DICOM with InstanceNumber '
                       f'{instance} in {folder}')
      else:
        logging.info('%s: no frame with InstanceNumber %d in %s', path, instance, folder)
      continue
    try:
      points = contours_lib.read_contour_file(path, image_shape=frame.shape)
    except contours_lib.ContourError as e:
      _contour_problem(report, path, e)
      continue
    mask = contours_lib.polygon_to_mask(points, frame.shape)
    if epicardium:
      frame.epi_contour, frame.epi_mask = points, mask
    else:
      frame.contour, frame.mask = points, mask
    attached += 1
  return attached


def read_patient_sheet(path: str) -> dict[str, str]:
  """Reads `scd_patientdata.csv`: SCD id (PatientID) -> case (zero-padded OriginalID)."""
  if not os.path.isfile(path):
    raise DataError(path, 'patient sheet not found (needed to map SCD ids to case names)')
  with open(path, newline='', encoding='utf-8-sig') as f:
    reader = csv.DictReader(f)
    missing = {'PatientID', 'OriginalID'} - set(reader.fieldnames or ())
    if missing:
      raise DataError(path, f'patient sheet lacks column(s) {sorted(missing)}')
    sheet = {}
    for line, row in enumerate(reader, start=2):
      scd_id, original = (row['PatientID'] or '').strip(), (row['OriginalID'] or '').strip()
      if not scd_id and not original:
        continue
      if not scd_id or not original:
        raise DataError(path, f'line {line}: empty PatientID or OriginalID')
      if scd_id in sheet:
        raise DataError(path, f'line {line}: PatientID {scd_id} listed twice')
      sheet[scd_id] = normalize_case_id(original)
  return sheet


def expert_contour_dir(contour_root: str, case: str) -> str | None:
  """The folder holding a case's contour files (CAP: <case>/contours-manual/IRCCI-expert)."""
  for candidate in (os.path.join(contour_root, case, 'contours-manual', 'IRCCI-expert'),
                    os.path.join(contour_root, case)):
    if os.path.isdir(candidate):
      return candidate
  return None


def _pick_series(scd_dir: str, contour_numbers: set[int]) -> str | None:
  """The cine series folder of one SCD id; with several, the one that matches most contours."""
  subdirs = sorted(d for d in glob.glob(os.path.join(scd_dir, '*')) if os.path.isdir(d))
  candidates = [d for d in subdirs if list_dicom_files(d)]
  if not candidates:
    return scd_dir if list_dicom_files(scd_dir) else None
  if len(candidates) == 1:
    return candidates[0]
  cinesax = [d for d in candidates if os.path.basename(d).upper().startswith('CINESAX')]
  candidates = cinesax or candidates

  def matches(d):
    return len(contour_numbers & {_instance_from_name(p) for p in list_dicom_files(d)})

  best = max(candidates, key=matches)
  logging.info('%s: %d series folders; using %s (matches %d contour frame numbers)', scd_dir,
               len(candidates), os.path.basename(best), matches(best))
  return best


def _dicom_layout(data_config: Any) -> tuple[str, str, str]:
  root = root_dir(data_config)
  return (root, os.path.join(root, data_config.contours_dir),
          os.path.join(root, data_config.patient_sheet))


def _scd_dirs(data_config: Any) -> list[str]:
  root = root_dir(data_config)
  pattern = os.path.join(root, data_config.dicom_glob, '*')
  return sorted(d for d in glob.glob(pattern) if os.path.isdir(d))


def load_source(data_config: Any, cases: set[str] | None, contoured_only: bool,
                       report: LoadReport) -> list[Frame]:
  """All frames of the CAP layout (the `dicom` source; see the module docstring)."""
  root, contour_root, sheet_path = _dicom_layout(data_config)
  kind = data_config.contour
  scd_dirs = _scd_dirs(data_config)
  if not scd_dirs:
    raise DataError(root, f'no DICOM folders {data_config.dicom_glob}/<SCD id>/ '
                    '(expected the Cardiac Atlas Project layout, see README "Data")')
  sheet = read_patient_sheet(sheet_path)
  if not os.path.isdir(contour_root):
    if contoured_only:
      raise DataError(contour_root, 'expert contour folder does not exist')
    logging.warning('%s does not exist: loading DICOM frames without contours', contour_root)
  frames: list[Frame] = []
  seen_cases = set()   # cases whose image folder was loaded or reported
  for scd_dir in scd_dirs:
    scd_id = os.path.basename(scd_dir)
    if scd_id not in sheet:
      report.problem(scd_dir, f'SCD id {scd_id} is not in the patient sheet {sheet_path}, so '
                     'its case (and contours) are unknown')
      continue
    case = sheet[scd_id]
    if cases is not None and case not in cases:
      continue
    seen_cases.add(case)
    contour_dir = expert_contour_dir(contour_root, case) if os.path.isdir(contour_root) else None
    if contour_dir is None and contoured_only:
      report.problem(os.path.join(contour_root, case), f'no contour folder for case {case} '
                     f'(SCD id {scd_id})')
      continue
    try:
      numbers = set(contours_lib.find_contour_files(contour_dir, kind)) if contour_dir else set()
    except contours_lib.ContourError as e:
      report.problem(contour_dir, str(e))
      continue
    series = _pick_series(scd_dir, numbers)
    if series is None:
      report.problem(scd_dir, f'no DICOM series folder for case {case}')
      continue
    series_frames = load_dicom_series(
        series, contour_dir, case=case, contour=kind,
        nominal_spacing_mm=float(data_config.nominal_spacing_mm),
        epicardium=bool(data_config.myocardium), report=report)
    for frame in series_frames:
      frame.scd_id = scd_id
    if contoured_only:
      contoured = [f for f in series_frames if f.mask is not None]
      logging.info('%s (%s): %d frames, %d with %scontours', case, scd_id, len(series_frames),
                   len(contoured), kind)
      series_frames = contoured
    frames.extend(series_frames)
  if os.path.isdir(contour_root):
    by_case = {case: scd_id for scd_id, case in sheet.items()}
    for name in sorted(os.listdir(contour_root)):
      case = normalize_case_id(name)
      if (not os.path.isdir(os.path.join(contour_root, name)) or case in seen_cases or
          (cases is not None and case not in cases)):
        continue
      report.problem(os.path.join(contour_root, name),
                     f'contours but no DICOM frames: no {data_config.dicom_glob}/'
                     f'{by_case.get(case, "<SCD id>")} folder for case {case}'
                     + ('' if case in by_case else ' (case not in the patient sheet)'))
  return frames


def source_files(data_config: Any) -> list[str]:
  """Every file the `dicom` source may read (the cache key)."""
  _, contour_root, sheet_path = _dicom_layout(data_config)
  files = [sheet_path]
  for scd_dir in _scd_dirs(data_config):
    files.extend(walk_files(scd_dir))
  return files + walk_files(contour_root)


def source_cases(data_config: Any) -> list[str]:
  """Cases present, from the folder names and the patient sheet."""
  _, _, sheet_path = _dicom_layout(data_config)
  if not os.path.isfile(sheet_path):
    return []
  sheet = read_patient_sheet(sheet_path)
  return sorted({sheet[os.path.basename(d)] for d in _scd_dirs(data_config)
                 if os.path.basename(d) in sheet})
