"""Sunnybrook Cardiac Data (SCD): loaders, case index and splits, preprocessing, cache, batches.

Two layouts load into the same `Frame` records (see docs/ARCHITECTURE.md and README "Data"):

* `dicom`: the Cardiac Atlas Project release. `SCD_IMAGES_xx/<SCD id>/<series>/IM-k-NNNN.dcm`
  frames, `SCD_ManualContours/<case>/contours-manual/IRCCI-expert/IM-0001-NNNN-icontour-manual.txt`
  expert contours and `scd_patientdata.csv` (SCD id <-> case). A contour belongs to the frame
  whose InstanceNumber is NNNN (the `IM-0001` prefix of contour files never matches the DICOM
  prefix, so only NNNN is compared).
* `png`: a folder with `images/<case>-IM-0001-NNNN.dcm.png` and matching `i_labels/` (and
  optionally `o_labels/`) masks, such as the Meow-2 copy `derived_png_meow2`. No headers: the
  pixel spacing comes from a per-case table or a nominal value (logged, and recorded per frame
  in `Frame.spacing_source`).

Cases are named by their zero-padded contour-folder name (`SC-HF-I-01`); the challenge's
`OriginalID` form (`SC-HF-I-1`) is accepted everywhere and normalized.

Bad input raises `DataError` naming the file and the problem, or with `on_error='skip'` is
logged, left out, and counted in the `LoadReport` summary. Nothing is dropped silently.
"""

import collections
import csv
import dataclasses
import functools
import glob
import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from typing import Any, Callable, Iterator, NamedTuple, Sequence

from absl import logging
import jax
import numpy as np
from PIL import Image
import pydicom
from pydicom import errors as pydicom_errors
from scipy import sparse

from lvseg_jax import contours as contours_lib

# The most common in-plane spacing of the SCD (1.3672 mm): used for PNG data without a table.
NOMINAL_SPACING_MM = 1.3672
# Bump when the cached arrays or Frame fields change meaning, so old caches are not reused.
CACHE_VERSION = 1
# Frames whose SliceLocation differs by less than this (mm) belong to one slice.
SLICE_TOLERANCE_MM = 0.01

# Official 2009 MICCAI LV Segmentation Challenge split (SPLITS.md), contour-folder names.
OFFICIAL_SETS = {
    'training': (
        'SC-HF-I-01', 'SC-HF-I-02', 'SC-HF-I-04', 'SC-HF-I-40', 'SC-HF-NI-03', 'SC-HF-NI-04',
        'SC-HF-NI-34', 'SC-HF-NI-36', 'SC-HYP-01', 'SC-HYP-03', 'SC-HYP-38', 'SC-HYP-40',
        'SC-N-02', 'SC-N-03', 'SC-N-40'),
    'validation': (
        'SC-HF-I-05', 'SC-HF-I-06', 'SC-HF-I-07', 'SC-HF-I-08', 'SC-HF-NI-07', 'SC-HF-NI-11',
        'SC-HF-NI-31', 'SC-HF-NI-33', 'SC-HYP-06', 'SC-HYP-07', 'SC-HYP-08', 'SC-HYP-37',
        'SC-N-05', 'SC-N-06', 'SC-N-07'),
    'online': (
        'SC-HF-I-09', 'SC-HF-I-10', 'SC-HF-I-11', 'SC-HF-I-12', 'SC-HF-NI-12', 'SC-HF-NI-13',
        'SC-HF-NI-14', 'SC-HF-NI-15', 'SC-HYP-09', 'SC-HYP-10', 'SC-HYP-11', 'SC-HYP-12',
        'SC-N-09', 'SC-N-10', 'SC-N-11'),
}
# Set name meaning "every case present in the data" (for data outside the official lists).
ALL_CASES = 'all'

ON_ERROR = ('raise', 'skip')

# config.data fields that change what is loaded or how it is preprocessed (the cache key).
_CACHE_CONFIG_KEYS = ('source', 'png_dir', 'contour', 'image_size', 'resize_mode',
                      'clip_percentiles', 'nominal_spacing_mm', 'spacing_table', 'on_error',
                      'dicom_glob', 'contours_dir', 'patient_sheet')

# Defaults for config.data fields, so configs written before a field existed keep working.
_DEFAULTS = {
    'source': 'png', 'png_dir': 'derived_png_meow2', 'contour': 'i', 'split': 'official',
    'train_sets': ('training',), 'eval_sets': ('validation',),
    'kfold_sets': ('training', 'validation'), 'num_folds': 5, 'fold': 0, 'kfold_seed': 0,
    'image_size': 256, 'resize_mode': 'resize', 'clip_percentiles': (1.0, 99.0),
    'nominal_spacing_mm': NOMINAL_SPACING_MM, 'spacing_table': '', 'cache_dir': '',
    'on_error': 'raise', 'dicom_glob': 'SCD_IMAGES_*', 'contours_dir': 'SCD_ManualContours',
    'patient_sheet': 'scd_patientdata.csv',
}


def _get(data_config: Any, key: str) -> Any:
  """config.data[key], falling back to `_DEFAULTS` (ConfigDict or plain dict)."""
  if hasattr(data_config, 'get'):
    value = data_config.get(key, None)
  else:
    value = getattr(data_config, key, None)
  return _DEFAULTS.get(key) if value is None else value


def _root(data_config: Any) -> str:
  return os.path.abspath(os.path.expanduser(str(_get(data_config, 'root') or '')))


# ------------------------------------------------------------------------------ records, errors


@dataclasses.dataclass
class Frame:
  """One 2D frame at its original resolution, with everything known about it.

  `mask` and `contour` are None for frames without an expert contour. For PNG frames the DICOM
  geometry fields are None and `pixel_spacing` comes from a table or the nominal spacing
  (`spacing_source` says which).
  """
  case: str                                   # contour-folder name, e.g. 'SC-HF-I-01'
  frame_id: str                               # 'IM-0001-NNNN' (NNNN = InstanceNumber)
  instance: int                               # NNNN
  image: np.ndarray = dataclasses.field(repr=False)          # (H, W) float32 raw intensities
  mask: np.ndarray | None = dataclasses.field(repr=False)    # (H, W) uint8 {0, 1}
  contour: np.ndarray | None = dataclasses.field(repr=False)  # (P, 2) expert (x, y) polygon
  pixel_spacing: tuple[float, float]          # (row, col) mm
  spacing_source: str                         # 'dicom' | 'table' | 'nominal'
  slice_location: float | None = None         # DICOM SliceLocation (mm)
  slice_thickness: float | None = None        # DICOM SliceThickness (mm)
  spacing_between_slices: float | None = None  # DICOM SpacingBetweenSlices (mm)
  slice_index: int | None = None              # slice number within the series, from 0
  phase_index: int | None = None              # order within the slice (trigger time), from 0
  trigger_time: float | None = None           # DICOM TriggerTime (ms)
  image_position: tuple | None = None         # DICOM ImagePositionPatient (mm)
  image_orientation: tuple | None = None      # DICOM ImageOrientationPatient (6 cosines)
  source_path: str = ''                       # the DICOM or PNG file
  # Added fields (not in the architecture sketch):
  scd_id: str | None = None                   # Cardiac Atlas Project id, e.g. 'SCD0000101'
  slice_position: float | None = None         # ImagePositionPatient along the slice normal (mm)

  @property
  def shape(self) -> tuple[int, int]:
    return (int(self.image.shape[0]), int(self.image.shape[1]))


_ARRAY_FIELDS = ('image', 'mask', 'contour')
_TUPLE_FIELDS = ('pixel_spacing', 'image_position', 'image_orientation')


class DataError(ValueError):
  """A data file or folder that cannot be used. `str(e)` is '<path>: <what is wrong>'."""

  def __init__(self, path: str, problem: str):
    super().__init__(f'{path}: {problem}')
    self.path = str(path)
    self.problem = problem


@dataclasses.dataclass
class LoadReport:
  """Collects bad input: raises `DataError` (on_error='raise') or logs and counts ('skip')."""
  on_error: str = 'raise'
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

  def __post_init__(self):
    if self.on_error not in ON_ERROR:
      raise ValueError(f'Unknown on_error {self.on_error!r}; choices: {list(ON_ERROR)}')

  def problem(self, path: str, problem: str) -> None:
    """Reports one unusable item: raises, or (skip) warns and records it."""
    if self.on_error == 'raise':
      raise DataError(path, problem)
    logging.warning('Skipping %s: %s', path, problem)
    self.skipped.append((str(path), problem))

  def log_summary(self, what: str = 'data') -> None:
    if self.skipped:
      logging.warning('Skipped %d item(s) while loading %s (on_error=skip); see the warnings '
                      'above. First: %s: %s', len(self.skipped), what, *self.skipped[0])


def normalize_case_id(name: str) -> str:
  """'SC-HF-I-1' -> 'SC-HF-I-01' (the CAP contour-folder name); other names unchanged."""
  name = str(name).strip()
  match = re.fullmatch(r'(SC-[A-Z-]+?-)(\d+)', name, flags=re.IGNORECASE)
  if match is None:
    return name
  return match[1].upper() + match[2].zfill(2)


def case_group(case: str) -> str:
  """Pathology group of an SCD case name: 'SC-HF-NI-03' -> 'SC-HF-NI' (used to stratify)."""
  return re.sub(r'-\d+$', '', case)


def get_official_set(name: str) -> tuple[str, ...]:
  """Case list of an official challenge set ('training', 'validation', 'online')."""
  if name not in OFFICIAL_SETS:
    raise ValueError(f'Unknown SCD set {name!r}; choices: {sorted(OFFICIAL_SETS)} or '
                     f'{ALL_CASES!r}')
  return OFFICIAL_SETS[name]


# ------------------------------------------------------------------------------ DICOM


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


def read_dicom_frame(path: str, nominal_spacing_mm: float = NOMINAL_SPACING_MM) -> Frame:
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
                      contour: str = 'i', nominal_spacing_mm: float = NOMINAL_SPACING_MM,
                      on_error: str = 'raise', report: LoadReport | None = None) -> list[Frame]:
  """Loads one cine series (a folder of single-frame DICOMs), with expert contours if given.

  Works on a plain DICOM folder (prediction on new scans): every frame is returned, contoured
  or not, ordered by (slice_index, phase_index).

  Args:
    folder: the series folder (`*.dcm` files or extension-less DICOM files).
    contour_dir: SCD expert folder with `IM-0001-NNNN-<kind>contour-manual.txt` files, or None.
    case: case name for the frames; default: the DICOM PatientID, else the folder name.
    contour: contour kind that becomes `Frame.contour` / `Frame.mask` ('i', 'o', 'p1', 'p2').
    nominal_spacing_mm: used (with a warning) for files without PixelSpacing.
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
    _attach_contours(by_instance, contour_dir, contour, folder, report)
  frames.sort(key=lambda f: (f.slice_index if f.slice_index is not None else math.inf,
                             f.phase_index if f.phase_index is not None else 0, f.instance))
  return frames


def _contour_problem(report: LoadReport, path: str, error: Exception) -> None:
  """Reports a ContourError, whose message already starts with the file name."""
  message, prefix = str(error), f'{path}: '
  report.problem(path, message[len(prefix):] if message.startswith(prefix) else message)


def _attach_contours(by_instance: dict[int, Frame], contour_dir: str, kind: str, folder: str,
                     report: LoadReport) -> None:
  """Reads the contour files of one kind and sets `contour` and `mask` of the matching frames."""
  if not os.path.isdir(contour_dir):
    report.problem(contour_dir, 'contour folder does not exist')
    return
  try:
    files = contours_lib.find_contour_files(contour_dir, kind)
  except contours_lib.ContourError as e:
    report.problem(contour_dir, str(e))
    return
  for instance, path in sorted(files.items()):
    frame = by_instance.get(instance)
    if frame is None:
      report.problem(path, f'contour has no matching frame: no DICOM with InstanceNumber '
                     f'{instance} in {folder}')
      continue
    try:
      points = contours_lib.read_contour_file(path, image_shape=frame.shape)
    except contours_lib.ContourError as e:
      _contour_problem(report, path, e)
      continue
    frame.contour = points
    frame.mask = contours_lib.polygon_to_mask(points, frame.shape)


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
  root = _root(data_config)
  return (root, os.path.join(root, _get(data_config, 'contours_dir')),
          os.path.join(root, _get(data_config, 'patient_sheet')))


def _scd_dirs(data_config: Any) -> list[str]:
  root = _root(data_config)
  pattern = os.path.join(root, _get(data_config, 'dicom_glob'), '*')
  return sorted(d for d in glob.glob(pattern) if os.path.isdir(d))


def _load_dicom_source(data_config: Any, cases: set[str] | None, contoured_only: bool,
                       report: LoadReport) -> list[Frame]:
  """All frames of the CAP layout (see module docstring)."""
  root, contour_root, sheet_path = _dicom_layout(data_config)
  kind = _get(data_config, 'contour')
  scd_dirs = _scd_dirs(data_config)
  if not scd_dirs:
    raise DataError(root, f'no DICOM folders {_get(data_config, "dicom_glob")}/<SCD id>/ '
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
        nominal_spacing_mm=float(_get(data_config, 'nominal_spacing_mm')), report=report)
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
                     f'contours but no DICOM frames: no {_get(data_config, "dicom_glob")}/'
                     f'{by_case.get(case, "<SCD id>")} folder for case {case}'
                     + ('' if case in by_case else ' (case not in the patient sheet)'))
  return frames


# ------------------------------------------------------------------------------ PNG


_PNG_NAME_RE = re.compile(r'^(?P<case>.+?)-(?P<frame_id>IM-\d+-(?P<instance>\d+))(?:\.dcm)?\.png$',
                          flags=re.IGNORECASE)


def parse_png_name(name: str) -> tuple[str, str, int] | None:
  """'<case>-IM-0001-NNNN.dcm.png' -> (case, 'IM-0001-NNNN', NNNN); None if it does not match."""
  match = _PNG_NAME_RE.match(os.path.basename(name))
  if match is None:
    return None
  return normalize_case_id(match['case']), match['frame_id'].upper(), int(match['instance'])


def read_png(path: str) -> np.ndarray:
  """A grayscale PNG as a 2D array (native dtype); DataError if unreadable or coloured."""
  try:
    with Image.open(path) as image:
      image_format = image.format
      if image.mode == 'P':
        image = image.convert('L')
      array = np.asarray(image)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(path, f'not a readable PNG image ({type(e).__name__}: {e})') from None
  if image_format != 'PNG':
    raise DataError(path, f'not a PNG file (format {image_format})')
  if array.ndim == 3:
    colour = array[..., :3]
    if not (colour == colour[..., :1]).all():
      raise DataError(path, f'colour image (mode with {array.shape[-1]} channels); expected '
                      'grayscale')
    array = array[..., 0]
  if array.ndim != 2:
    raise DataError(path, f'unexpected PNG array shape {array.shape}')
  return array


def _read_png_mask(path: str, image_shape: tuple[int, int]) -> np.ndarray:
  array = read_png(path)
  if array.shape != image_shape:
    raise DataError(path, f'mask size {array.shape[0]}x{array.shape[1]} differs from the image '
                    f'size {image_shape[0]}x{image_shape[1]}')
  values = np.unique(array)
  if not (set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}):
    shown = values[:8].tolist()
    raise DataError(path, f'not a binary mask: values {shown}{"..." if len(values) > 8 else ""} '
                    '(expected {0, 255} or {0, 1})')
  return (array > 0).astype(np.uint8)


def read_spacing_table(path: str) -> dict[str, tuple[float, float]]:
  """Reads a per-case spacing CSV: `case,pixel_spacing_mm` or `case,row_mm,col_mm`."""
  if not os.path.isfile(path):
    raise DataError(path, 'spacing table not found')
  table = {}
  with open(path, newline='', encoding='utf-8-sig') as f:
    reader = csv.DictReader(f)
    fields = set(reader.fieldnames or ())
    if 'case' not in fields or not ({'pixel_spacing_mm'} <= fields or
                                    {'row_mm', 'col_mm'} <= fields):
      raise DataError(path, 'spacing table needs columns case,pixel_spacing_mm or '
                      f'case,row_mm,col_mm; got {sorted(fields)}')
    for line, row in enumerate(reader, start=2):
      try:
        if 'row_mm' in fields and row.get('row_mm'):
          spacing = (float(row['row_mm']), float(row['col_mm']))
        else:
          spacing = (float(row['pixel_spacing_mm']),) * 2
      except (TypeError, ValueError):
        raise DataError(path, f'line {line}: spacing is not a number: {row}') from None
      if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise DataError(path, f'line {line}: spacing must be positive, got {spacing}')
      table[normalize_case_id(row['case'])] = spacing
  return table


def write_spacing_table(path: str, spacing: dict[str, tuple[float, float]]) -> None:
  """Writes `case,row_mm,col_mm` (e.g. spacing read from DICOM headers, for a PNG copy)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f, lineterminator='\n')
    writer.writerow(['case', 'row_mm', 'col_mm'])
    for case in sorted(spacing):
      writer.writerow([case, repr(float(spacing[case][0])), repr(float(spacing[case][1]))])


def load_png_folder(folder: str, *, contour: str = 'i', cases: set[str] | None = None,
                    spacing_table: dict[str, tuple[float, float]] | None = None,
                    nominal_spacing_mm: float = NOMINAL_SPACING_MM, contoured_only: bool = True,
                    on_error: str = 'raise', report: LoadReport | None = None) -> list[Frame]:
  """Loads `folder/images/*.png` with masks from `folder/<contour>_labels/` (same file names).

  Args:
    folder: e.g. `derived_png_meow2`.
    contour: which label folder gives the mask ('i' -> i_labels, 'o' -> o_labels).
    cases: only these cases (normalized names); None for all.
    spacing_table: case -> (row, col) mm. Cases not in it get `nominal_spacing_mm` (warned).
    nominal_spacing_mm: fallback spacing, recorded as spacing_source='nominal'.
    contoured_only: drop images without a mask (counted in the log), else keep with mask=None.
    on_error: 'raise' or 'skip' (ignored when `report` is given).
    report: collects skipped items.

  Returns:
    Frames sorted by (case, instance).
  """
  report = report if report is not None else LoadReport(on_error)
  image_dir = os.path.join(folder, 'images')
  label_dir = os.path.join(folder, f'{contour}_labels')
  if not os.path.isdir(image_dir):
    raise DataError(image_dir, 'PNG image folder does not exist')
  names = sorted(os.listdir(image_dir))
  pngs = [n for n in names if n.lower().endswith('.png') and not n.startswith('.')]
  others = [n for n in names if n not in pngs]
  if others:
    logging.warning('%s: ignoring %d non-PNG file(s): %s', image_dir, len(others), others[:5])
  if not pngs:
    raise DataError(image_dir, 'no PNG images in the folder')
  if not os.path.isdir(label_dir):
    if contoured_only:
      raise DataError(label_dir, f'mask folder for contour {contour!r} does not exist')
    label_names = set()
  else:
    label_names = {n for n in os.listdir(label_dir) if not n.startswith('.')}
  for name in sorted(label_names - set(pngs)):
    report.problem(os.path.join(label_dir, name), f'mask has no matching image in {image_dir}')

  spacing_table = spacing_table or {}
  frames, unlabelled, nominal_cases = [], 0, set()
  for name in pngs:
    path = os.path.join(image_dir, name)
    parsed = parse_png_name(name)
    if parsed is None:
      report.problem(path, 'file name does not match <case>-IM-XXXX-NNNN[.dcm].png, so its case '
                     'and frame are unknown')
      continue
    case, frame_id, instance = parsed
    if cases is not None and case not in cases:
      continue
    has_label = name in label_names
    if not has_label and contoured_only:
      unlabelled += 1
      continue
    try:
      image = read_png(path)
      mask = (_read_png_mask(os.path.join(label_dir, name), image.shape) if has_label else None)
    except DataError as e:
      report.problem(e.path, e.problem)
      continue
    if case in spacing_table:
      spacing, source = spacing_table[case], 'table'
    else:
      spacing, source = (nominal_spacing_mm, nominal_spacing_mm), 'nominal'
      nominal_cases.add(case)
    frames.append(Frame(
        case=case, frame_id=frame_id, instance=instance, image=image.astype(np.float32),
        mask=mask, contour=None, pixel_spacing=(float(spacing[0]), float(spacing[1])),
        spacing_source=source, source_path=path))
  if unlabelled:
    logging.info('%s: %d image(s) without a %s_labels mask not used (contoured_only)', folder,
                 unlabelled, contour)
  if nominal_cases:
    logging.warning('No pixel spacing for %d PNG case(s) (%s%s): using the nominal %.4f mm '
                    '(config.data.nominal_spacing_mm); their frames record '
                    "spacing_source='nominal'", len(nominal_cases),
                    ', '.join(sorted(nominal_cases)[:5]), ', ...' if len(nominal_cases) > 5
                    else '', nominal_spacing_mm)
  frames.sort(key=lambda f: (f.case, f.instance))
  return frames


def _png_folder(data_config: Any) -> str:
  return os.path.join(_root(data_config), _get(data_config, 'png_dir'))


def _load_png_source(data_config: Any, cases: set[str] | None, contoured_only: bool,
                     report: LoadReport) -> list[Frame]:
  table_path = _get(data_config, 'spacing_table')
  table = None
  if table_path:
    if not os.path.isabs(table_path) and not os.path.exists(table_path):
      table_path = os.path.join(_root(data_config), table_path)
    table = read_spacing_table(table_path)
  return load_png_folder(
      _png_folder(data_config), contour=_get(data_config, 'contour'), cases=cases,
      spacing_table=table, nominal_spacing_mm=float(_get(data_config, 'nominal_spacing_mm')),
      contoured_only=contoured_only, report=report)


# ------------------------------------------------------------------------------ sources


def _walk_files(folder: str) -> list[str]:
  found = []
  for dirpath, dirnames, filenames in os.walk(folder):
    dirnames.sort()
    found.extend(os.path.join(dirpath, n) for n in sorted(filenames))
  return found


def _png_files(data_config: Any) -> list[str]:
  folder = _png_folder(data_config)
  files = []
  for sub in ('images', f'{_get(data_config, "contour")}_labels'):
    files.extend(_walk_files(os.path.join(folder, sub)))
  table = _get(data_config, 'spacing_table')
  if table:
    files.append(table if os.path.isabs(table) or os.path.exists(table)
                 else os.path.join(_root(data_config), table))
  return files


def _png_cases(data_config: Any) -> list[str]:
  image_dir = os.path.join(_png_folder(data_config), 'images')
  if not os.path.isdir(image_dir):
    return []
  parsed = (parse_png_name(n) for n in os.listdir(image_dir))
  return sorted({p[0] for p in parsed if p is not None})


def _dicom_source_files(data_config: Any) -> list[str]:
  _, contour_root, sheet_path = _dicom_layout(data_config)
  files = [sheet_path]
  for scd_dir in _scd_dirs(data_config):
    files.extend(_walk_files(scd_dir))
  files.extend(_walk_files(contour_root))
  return files


def _dicom_cases(data_config: Any) -> list[str]:
  _, _, sheet_path = _dicom_layout(data_config)
  if not os.path.isfile(sheet_path):
    return []
  sheet = read_patient_sheet(sheet_path)
  return sorted({sheet[os.path.basename(d)] for d in _scd_dirs(data_config)
                 if os.path.basename(d) in sheet})


class Source(NamedTuple):
  load: Callable[[Any, set[str] | None, bool, LoadReport], list[Frame]]
  files: Callable[[Any], list[str]]     # every file the loader may read (the cache key)
  cases: Callable[[Any], list[str]]     # cases present, from names only (cheap)


SOURCES = {
    'png': Source(_load_png_source, _png_files, _png_cases),
    'dicom': Source(_load_dicom_source, _dicom_source_files, _dicom_cases),
}


def get_source(name: str) -> Source:
  if name not in SOURCES:
    raise ValueError(f'Unknown data source {name!r}; choices: {sorted(SOURCES)}')
  return SOURCES[name]


def _check_root(data_config: Any) -> str:
  if not str(_get(data_config, 'root') or '').strip():
    raise DataError('config.data.root', 'not set (or set $LVSEG_DATA_DIR; see README "Data")')
  root = _root(data_config)
  if not os.path.isdir(root):
    raise DataError(root, 'data directory does not exist (set config.data.root or '
                    '$LVSEG_DATA_DIR; see README "Data")')
  if not os.listdir(root):
    raise DataError(root, 'data directory is empty')
  return root


def available_cases(data_config: Any) -> list[str]:
  """Cases present in the configured data, from file and folder names only."""
  _check_root(data_config)
  return get_source(_get(data_config, 'source')).cases(data_config)


def load_frames(data_config: Any, cases: Sequence[str] | None = None,
                contoured_only: bool = True, report: LoadReport | None = None) -> list[Frame]:
  """Loads the frames of the configured source (`config.data.source`: png | dicom).

  Args:
    data_config: `config.data`.
    cases: case names (either naming form) to load; None for all.
    contoured_only: only frames with an expert mask (training/evaluation data).
    report: collects skipped items; default: a new one with `config.data.on_error`.

  Returns:
    Frames sorted by case, then slice/phase (DICOM) or frame number (PNG).

  Raises:
    DataError: missing or empty data directory, no usable frames, or bad input with
      on_error='raise'.
  """
  source = get_source(_get(data_config, 'source'))
  report = report if report is not None else LoadReport(_get(data_config, 'on_error'))
  root = _check_root(data_config)
  wanted = None if cases is None else {normalize_case_id(c) for c in cases}
  frames = source.load(data_config, wanted, contoured_only, report)
  report.log_summary(root)
  if wanted is not None:
    absent = sorted(wanted - {f.case for f in frames})
    if absent:
      logging.warning('Requested case(s) with no %sframes in %s: %s',
                      'contoured ' if contoured_only else '', root, absent)
  if not frames:
    raise DataError(root, f'no usable {"contoured " if contoured_only else ""}frames for source '
                    f'{_get(data_config, "source")!r}' +
                    (f' and cases {sorted(wanted)}' if wanted is not None else '') +
                    (f' ({len(report.skipped)} item(s) skipped)' if report.skipped else ''))
  frames.sort(key=lambda f: (f.case, f.slice_index if f.slice_index is not None else -1,
                             f.phase_index if f.phase_index is not None else -1, f.instance))
  return frames


# ------------------------------------------------------------------------------ splits


def _resolve_sets(names: Sequence[str] | str, available: set[str]) -> dict[str, list[str]]:
  """Set name -> its cases (`'all'` -> every available case); names validated."""
  if isinstance(names, str):
    names = [n for n in names.replace(',', ' ').split() if n]
  resolved = {}
  for name in names:
    resolved[name] = sorted(available) if name == ALL_CASES else list(get_official_set(name))
  return resolved


def kfold_assignments(cases: Sequence[str], num_folds: int, seed: int = 0) -> dict[str, int]:
  """Patient-level folds: case -> fold in [0, num_folds).

  Cases are shuffled (seeded) within their pathology group and dealt round-robin across
  groups, so fold sizes differ by at most one and each fold gets a share of every group.
  """
  cases = sorted(set(cases))
  if num_folds < 2:
    raise ValueError(f'num_folds must be >= 2, got {num_folds}')
  if len(cases) < num_folds:
    raise ValueError(f'{len(cases)} case(s) cannot fill {num_folds} folds')
  rng = np.random.default_rng(seed)
  groups = collections.defaultdict(list)
  for case in cases:
    groups[case_group(case)].append(case)
  assignment, position = {}, 0
  for group in sorted(groups):
    members = groups[group]
    for k in rng.permutation(len(members)):
      assignment[members[k]] = position % num_folds
      position += 1
  return assignment


def case_splits(data_config: Any, available: Sequence[str] | None = None) -> dict[str, list[str]]:
  """Train / eval case lists for `config.data.split` (official | kfold), with a missing report.

  Official: train = union of `train_sets`, eval = union of `eval_sets` (official set names or
  'all'). K-fold: the cases of `kfold_sets` present in the data are split into `num_folds`
  patient-level folds; fold `fold` is eval, the rest train.

  Args:
    data_config: `config.data`.
    available: cases present in the data; default: scanned from the file names.

  Returns:
    {'train': [...], 'eval': [...], 'unassigned': cases in the data but in neither,
     'missing:<set>': cases an official set names that the data lacks (all three sets),
     and for k-fold 'fold:<k>': the cases of each fold}.

  Raises:
    ValueError: unknown split or set name, train and eval sharing cases, bad fold settings.
    DataError: a requested set none of whose cases are in the data.
  """
  split = _get(data_config, 'split')
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; choices: {sorted(SPLITS)}')
  if available is None:
    available = available_cases(data_config)
  available = {normalize_case_id(c) for c in available}
  result = SPLITS[split](data_config, available)
  for name, cases in OFFICIAL_SETS.items():
    result[f'missing:{name}'] = [c for c in cases if c not in available]
  used = set(result['train']) | set(result['eval'])
  result['unassigned'] = sorted(available - used)
  return result


def _present(data_config: Any, sets: dict[str, list[str]], available: set[str],
             role: str) -> list[str]:
  """Present cases of the requested sets (ordered, unique); warns on gaps, fails on none."""
  cases = []
  for name, members in sets.items():
    present = [c for c in members if c in available]
    if not present:
      raise DataError(_root(data_config), f'{role} set {name!r} was requested but none of its '
                      f'{len(members)} cases are in the {_get(data_config, "source")} data')
    missing = [c for c in members if c not in available]
    if missing:
      logging.warning('%s set %r: %d of %d cases are not in the data: %s', role, name,
                      len(missing), len(members), missing)
    cases.extend(c for c in present if c not in cases)
  return cases


def _official_split(data_config: Any, available: set[str]) -> dict[str, list[str]]:
  train_sets = _resolve_sets(_get(data_config, 'train_sets'), available)
  eval_sets = _resolve_sets(_get(data_config, 'eval_sets'), available)
  train = _present(data_config, train_sets, available, 'train')
  evaluate = _present(data_config, eval_sets, available, 'eval')
  shared = sorted(set(train) & set(evaluate))
  if shared:
    raise ValueError(f'train_sets {list(train_sets)} and eval_sets {list(eval_sets)} share '
                     f'{len(shared)} case(s): {shared}')
  return {'train': train, 'eval': evaluate}


def _kfold_split(data_config: Any, available: set[str]) -> dict[str, list[str]]:
  pool = _present(data_config, _resolve_sets(_get(data_config, 'kfold_sets'), available),
                  available, 'kfold')
  num_folds, fold = int(_get(data_config, 'num_folds')), int(_get(data_config, 'fold'))
  if not 0 <= fold < num_folds:
    raise ValueError(f'fold must be in [0, {num_folds}), got {fold}')
  folds = kfold_assignments(pool, num_folds, int(_get(data_config, 'kfold_seed')))
  result = {'train': [c for c in pool if folds[c] != fold],
            'eval': [c for c in pool if folds[c] == fold]}
  for k in range(num_folds):
    result[f'fold:{k}'] = [c for c in pool if folds[c] == k]
  return result


SPLITS = {'official': _official_split, 'kfold': _kfold_split}


# ------------------------------------------------------------------------------ preprocessing


def _resize_scale(shape: tuple[int, int], size: int) -> float:
  return size / max(shape)   # longer side to `size`, aspect kept, shorter side padded


def _crop_scale(shape: tuple[int, int], size: int) -> float:
  del shape, size
  return 1.0                 # native resolution, centre crop / pad


RESIZE_MODES = {'resize': _resize_scale, 'crop': _crop_scale}


def get_resize_mode(name: str) -> Callable[[tuple[int, int], int], float]:
  if name not in RESIZE_MODES:
    raise ValueError(f'Unknown resize_mode {name!r}; choices: {sorted(RESIZE_MODES)}')
  return RESIZE_MODES[name]


@functools.lru_cache(maxsize=64)
def _linear_weights(n_in: int, n_out: int) -> sparse.csr_matrix:
  """(n_out, n_in) linear-interpolation matrix, half-pixel centres, antialiased when shrinking.

  The triangle kernel is widened by the shrink factor (area-like averaging, no aliasing) and
  each row is normalized over the input pixels it reaches, which clamps at the borders. This is
  the convention of `jax.image.resize(method='linear', antialias=True)`. Sparse because it is
  banded: products cost O(pixels) and, unlike BLAS, spawn no threads (10x faster on a busy
  machine). Memoized: a pure function of two sizes.
  """
  scale = n_out / n_in
  width = max(1.0, 1.0 / scale)
  centres = (np.arange(n_out) + 0.5) / scale - 0.5
  weights = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in)[None, :] - centres[:, None]) / width)
  return sparse.csr_matrix(weights / weights.sum(axis=1, keepdims=True))


def _separable(rows: sparse.csr_matrix, array: np.ndarray, cols: sparse.csr_matrix
               ) -> np.ndarray:
  """rows @ array @ cols.T over the first two axes of (H, W[, C]), channel by channel."""
  flat = array.reshape(array.shape[:2] + (-1,))
  out = np.stack([(cols @ (rows @ flat[..., c]).T).T for c in range(flat.shape[-1])], axis=-1)
  return out.reshape(out.shape[:2] + array.shape[2:])


def _resample(array: np.ndarray, shape: tuple[int, int], labels: bool) -> np.ndarray:
  """Separable linear resampling of (H, W[, C]); labels via one-hot, resample, argmax."""
  shape = (int(shape[0]), int(shape[1]))
  if tuple(array.shape[:2]) == shape:
    return array.copy()
  rows = _linear_weights(array.shape[0], shape[0])
  cols = _linear_weights(array.shape[1], shape[1])
  if labels:
    num_classes = int(array.max()) + 1 if array.size else 1
    if num_classes <= 2:
      # Binary: the class-1 fraction decides; a tie (exactly 0.5) goes to background.
      fraction = _separable(rows, (array == 1).astype(np.float64), cols)
      return (fraction > 0.5).astype(array.dtype)
    one_hot = (array[..., None] == np.arange(num_classes)).astype(np.float64)
    # argmax picks the lowest class on ties, consistent with the binary rule.
    return np.argmax(_separable(rows, one_hot, cols), axis=-1).astype(array.dtype)
  return _separable(rows, array.astype(np.float64), cols).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Maps an (H, W) frame to the (S, S) network grid and back.

  The frame is first resampled to `scaled_shape` (identity in 'crop' mode), then the S x S
  window starting at `offset` (row, col) in the scaled frame is taken; negative offsets mean
  padding. Both steps are inverted by `invert`.
  """
  original_shape: tuple[int, int]
  size: int
  scaled_shape: tuple[int, int]
  offset: tuple[int, int]

  @classmethod
  def create(cls, shape: tuple[int, int], size: int, mode: str = 'resize') -> 'Geometry':
    scale = get_resize_mode(mode)(tuple(shape[:2]), size)
    shape = (int(shape[0]), int(shape[1]))
    scaled = shape if scale == 1.0 else tuple(max(1, int(round(n * scale))) for n in shape)
    offset = tuple((n - size) // 2 for n in scaled)
    return cls(shape, int(size), scaled, offset)

  def _windows(self) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """(slices in the scaled frame, slices in the S x S grid) of the overlapping region."""
    src, dst = [], []
    for n, o in zip(self.scaled_shape, self.offset):
      lo, hi = max(o, 0), min(o + self.size, n)
      src.append(slice(lo, hi))
      dst.append(slice(lo - o, hi - o))
    return tuple(src), tuple(dst)

  def apply(self, array: np.ndarray, labels: bool = False, fill: float = 0.0) -> np.ndarray:
    """(H, W[, C]) -> (S, S[, C]); labels are resampled as class maps."""
    scaled = _resample(np.asarray(array), self.scaled_shape, labels)
    out = np.full((self.size, self.size) + scaled.shape[2:], fill, dtype=scaled.dtype)
    src, dst = self._windows()
    out[dst] = scaled[src]
    return out

  def invert(self, array_s: np.ndarray, labels: bool | None = None,
             fill: float = 0.0) -> np.ndarray:
    """(S, S[, C]) -> (H, W[, C]) on the original grid.

    Integer/bool maps are treated as class labels (one-hot, bilinear, argmax); float maps
    (probabilities, logits) are resampled bilinearly per channel; take the argmax afterwards.
    Pixels outside the S x S window (crop mode) get `fill` (0 = background).
    """
    array_s = np.asarray(array_s)
    if array_s.shape[:2] != (self.size, self.size):
      raise ValueError(f'expected a ({self.size}, {self.size}[, C]) array, got {array_s.shape}')
    if labels is None:
      labels = not np.issubdtype(array_s.dtype, np.floating)
    if array_s.dtype == bool:
      array_s = array_s.astype(np.uint8)
    canvas = np.full(self.scaled_shape + array_s.shape[2:], fill, dtype=array_s.dtype)
    src, dst = self._windows()
    canvas[src] = array_s[dst]
    return _resample(canvas, self.original_shape, labels)


def normalize_intensity(image: np.ndarray,
                        clip_percentiles: Sequence[float] | None = (1.0, 99.0)) -> np.ndarray:
  """Clips to the image's own percentiles, then zero mean and unit variance (float32).

  A constant image maps to zeros.
  """
  image = np.asarray(image, dtype=np.float64)
  if not np.isfinite(image).all():
    raise ValueError('image has non-finite values')
  if clip_percentiles:
    low, high = (float(p) for p in clip_percentiles)
    if not 0.0 <= low < high <= 100.0:
      raise ValueError(f'clip_percentiles must satisfy 0 <= low < high <= 100, got '
                       f'{tuple(clip_percentiles)}')
    image = np.clip(image, *np.percentile(image, [low, high]))
  std = image.std()
  if std < 1e-8:
    return np.zeros(image.shape, np.float32)
  return ((image - image.mean()) / std).astype(np.float32)


def preprocess_image(image: np.ndarray, data_config: Any) -> tuple[np.ndarray, Geometry]:
  """The one preprocessing path for train, evaluate and predict.

  Normalizes intensities on the original grid (`normalize_intensity` with
  `clip_percentiles`), then maps to the `image_size` grid (`resize_mode`); padding gets the
  darkest normalized value.

  Args:
    image: (H, W) or (H, W, 1) raw intensities.
    data_config: `config.data`.

  Returns:
    ((S, S, 1) float32 image, Geometry to map predictions back with `Geometry.invert`).
  """
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim != 2:
    raise ValueError(f'expected a 2D image, got shape {image.shape}')
  geometry = Geometry.create(image.shape, int(_get(data_config, 'image_size')),
                             _get(data_config, 'resize_mode'))
  normalized = normalize_intensity(image, _get(data_config, 'clip_percentiles'))
  out = geometry.apply(normalized, labels=False, fill=float(normalized.min()))
  return out[..., None].astype(np.float32), geometry


def preprocess_mask(mask: np.ndarray, geometry: Geometry) -> np.ndarray:
  """(H, W) class map -> (S, S) int32 on the network grid."""
  return geometry.apply(np.asarray(mask).astype(np.int32), labels=True, fill=0).astype(np.int32)


# ------------------------------------------------------------------------------ Dataset


class Dataset:
  """Preprocessed arrays for a list of frames, plus the originals for metrics.

  Attributes:
    images: (N, S, S, 1) float32, normalized.
    masks: (N, S, S) int32 class maps (zeros where `has_mask` is False).
    has_mask: (N,) bool, whether the frame has an expert mask.
    frames: the original `Frame`s (original resolution, spacing, DICOM geometry).
    geometries: per-frame `Geometry` (network grid <-> original grid).
    name: e.g. 'train', 'eval'.
    skipped: (path, problem) items skipped while loading (on_error='skip').
  """

  def __init__(self, images: np.ndarray, masks: np.ndarray, frames: Sequence[Frame],
               geometries: Sequence[Geometry], *, has_mask: np.ndarray | None = None,
               name: str = '', skipped: Sequence[tuple[str, str]] = ()):
    if not len(images) == len(masks) == len(frames) == len(geometries):
      raise ValueError(f'length mismatch: {len(images)} images, {len(masks)} masks, '
                       f'{len(frames)} frames, {len(geometries)} geometries')
    self.images = images
    self.masks = masks
    self.frames = list(frames)
    self.geometries = list(geometries)
    self.has_mask = (np.asarray(has_mask, bool) if has_mask is not None
                     else np.array([f.mask is not None for f in self.frames], bool))
    self.name = name
    self.skipped = list(skipped)

  def __len__(self) -> int:
    return len(self.frames)

  def __repr__(self) -> str:
    return (f'Dataset({self.name!r}, {len(self)} frames, {len(self.cases)} cases, '
            f'images {self.images.shape})')

  @property
  def cases(self) -> list[str]:
    return sorted({f.case for f in self.frames})

  def frames_per_case(self) -> dict[str, int]:
    return dict(sorted(collections.Counter(f.case for f in self.frames).items()))

  def subset(self, indices: Sequence[int], name: str | None = None) -> 'Dataset':
    indices = np.asarray(indices, dtype=np.int64)
    return Dataset(self.images[indices], self.masks[indices],
                   [self.frames[i] for i in indices], [self.geometries[i] for i in indices],
                   has_mask=self.has_mask[indices], name=self.name if name is None else name,
                   skipped=self.skipped)

  def select_cases(self, cases: Sequence[str], name: str | None = None) -> 'Dataset':
    wanted = {normalize_case_id(c) for c in cases}
    return self.subset([i for i, f in enumerate(self.frames) if f.case in wanted], name)

  def to_original(self, i: int, array_s: np.ndarray) -> np.ndarray:
    """Maps an (S, S[, C]) network-grid array of frame `i` to its original (H, W[, C]) grid.

    Integer/bool arrays are class maps (resampled one-hot, argmax). Float arrays are
    resampled bilinearly per channel: pass probabilities and take the argmax afterwards.
    """
    return self.geometries[i].invert(array_s)

  def num_batches(self, batch_size: int, drop_remainder: bool = True) -> int:
    return len(self) // batch_size if drop_remainder else -(-len(self) // batch_size)

  def batches(self, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
              drop_remainder: bool = True, process_index: int | None = None,
              process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Host-side NumPy batches for one epoch.

    The order is a permutation drawn from `np.random.default_rng([seed, epoch])`, so it is the
    same on every process and for every rerun. Each process gets rows
    [p * B/P, (p + 1) * B/P) of every global batch of `batch_size` rows.

    Args:
      batch_size: the global batch size B (divisible by the process count).
      seed, epoch: determine the shuffle.
      shuffle: False keeps the dataset order (evaluation).
      drop_remainder: drop the last partial global batch; False pads it to B rows with
        zero images/masks, `valid=False` and `index=-1`.
      process_index, process_count: default `jax.process_index()` / `jax.process_count()`.

    Yields:
      {'image': (B/P, S, S, 1) float32, 'mask': (B/P, S, S) int32, 'valid': (B/P,) bool,
       'index': (B/P,) int32 row into this dataset (-1 for padding)}.

    Raises:
      ValueError: bad sizes, or fewer frames than one batch with drop_remainder=True.
    """
    if process_index is None:
      process_index = jax.process_index()
    if process_count is None:
      process_count = jax.process_count()
    if batch_size <= 0 or batch_size % process_count:
      raise ValueError(f'batch_size {batch_size} must be positive and divisible by the '
                       f'process count {process_count}')
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} not in [0, {process_count})')
    if seed < 0 or epoch < 0:
      raise ValueError(f'seed and epoch must be >= 0, got {seed}, {epoch}')
    num_batches = self.num_batches(batch_size, drop_remainder)
    if num_batches == 0:
      raise ValueError(f'dataset {self.name!r} has {len(self)} frames, fewer than one batch of '
                       f'{batch_size} (drop_remainder={drop_remainder})')
    return self._batches(batch_size, seed, epoch, shuffle, num_batches, process_index,
                         process_count)

  def _batches(self, batch_size, seed, epoch, shuffle, num_batches, process_index,
               process_count):
    n = len(self)
    order = (np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n))
    local = batch_size // process_count
    start = process_index * local
    for b in range(num_batches):
      index = np.full(batch_size, -1, dtype=np.int64)
      chunk = order[b * batch_size:(b + 1) * batch_size]
      index[:len(chunk)] = chunk
      index = index[start:start + local]
      valid = index >= 0
      rows = np.where(valid, index, 0)
      image = self.images[rows]
      mask = self.masks[rows]
      image[~valid] = 0.0
      mask[~valid] = 0
      yield {'image': image.astype(np.float32, copy=False),
             'mask': mask.astype(np.int32, copy=False), 'valid': valid,
             'index': index.astype(np.int32)}


def build_dataset(frames: Sequence[Frame], data_config: Any, name: str = '',
                  skipped: Sequence[tuple[str, str]] = ()) -> Dataset:
  """Preprocesses frames (`preprocess_image`, `preprocess_mask`) into a `Dataset`."""
  size = int(_get(data_config, 'image_size'))
  images = np.zeros((len(frames), size, size, 1), np.float32)
  masks = np.zeros((len(frames), size, size), np.int32)
  geometries = []
  for i, frame in enumerate(frames):
    images[i], geometry = preprocess_image(frame.image, data_config)
    if frame.mask is not None:
      masks[i] = preprocess_mask(frame.mask, geometry)
    geometries.append(geometry)
  return Dataset(images, masks, frames, geometries, name=name, skipped=skipped)


# ------------------------------------------------------------------------------ cache


def cache_key(data_config: Any, cases: Sequence[str] | None = None,
              contoured_only: bool = True) -> str:
  """Hex key over the source files (path, size, mtime) and the loading/preprocessing config."""
  root = _check_root(data_config)
  files = []
  for path in get_source(_get(data_config, 'source')).files(data_config):
    try:
      stat = os.stat(path)
      files.append((os.path.relpath(path, root), stat.st_size, stat.st_mtime_ns))
    except OSError:
      files.append((os.path.relpath(path, root), -1, -1))
  settings = {}
  for key in _CACHE_CONFIG_KEYS:
    value = _get(data_config, key)
    settings[key] = list(value) if isinstance(value, (tuple, list)) else value
  payload = {'version': CACHE_VERSION, 'root': os.path.realpath(root), 'files': files,
             'config': settings, 'contoured_only': bool(contoured_only),
             'cases': None if cases is None else sorted({normalize_case_id(c) for c in cases})}
  return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _compact(arrays: list[np.ndarray]) -> np.ndarray:
  """Concatenates flattened arrays in the smallest dtype that stores them exactly."""
  flat = np.concatenate([a.ravel() for a in arrays]) if arrays else np.zeros(0, np.float32)
  for dtype in (np.uint8, np.int16, np.int32):
    info = np.iinfo(dtype)
    if (flat.size == 0 or (flat.min() >= info.min and flat.max() <= info.max and
                           np.array_equal(flat, np.round(flat)))):
      return flat.astype(dtype)
  return flat.astype(np.float32)


def _frame_meta(frame: Frame) -> dict[str, Any]:
  meta = {}
  for field in dataclasses.fields(Frame):
    if field.name not in _ARRAY_FIELDS:
      value = getattr(frame, field.name)
      meta[field.name] = list(value) if isinstance(value, tuple) else value
  return meta


def save_cache(path: str, dataset: Dataset) -> None:
  """Writes a dataset (preprocessed and original arrays, frame records) as one .npz."""
  frames = dataset.frames
  shapes = np.array([f.shape for f in frames], np.int64).reshape(-1, 2)
  contour_counts = np.array([0 if f.contour is None else len(f.contour) for f in frames],
                            np.int64)
  contours = [f.contour for f in frames if f.contour is not None]
  meta = {'frames': [_frame_meta(f) for f in frames], 'name': dataset.name,
          'skipped': [list(s) for s in dataset.skipped], 'version': CACHE_VERSION}
  arrays = {
      'images': dataset.images,
      # Masks are {0, 1}: bit-packing makes them 8x smaller, losslessly.
      'masks': np.packbits(dataset.masks.astype(bool).ravel()),
      'mask_shape': np.array(dataset.masks.shape, np.int64),
      'mask_max': np.array(int(dataset.masks.max()) if dataset.masks.size else 0),
      'has_mask': dataset.has_mask,
      'orig_images': _compact([f.image for f in frames]),
      'orig_masks': np.packbits(np.concatenate(
          [(f.mask if f.mask is not None else np.zeros(f.shape, np.uint8)).ravel().astype(bool)
           for f in frames]) if frames else np.zeros(0, bool)),
      'orig_shapes': shapes,
      'contours': (np.concatenate(contours) if contours else np.zeros((0, 2))).astype(np.float64),
      'contour_counts': contour_counts,
      'meta': np.array(json.dumps(meta)),
  }
  if arrays['mask_max'] > 1:
    arrays['masks'] = dataset.masks.astype(np.int32)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  # Write then rename, so a concurrent or interrupted run never sees a half-written cache.
  fd, tmp = tempfile.mkstemp(dir=folder, suffix='.npz.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def load_cache(path: str, data_config: Any) -> Dataset:
  """Reads a dataset written by `save_cache` (geometries are rebuilt from the config)."""
  with np.load(path, allow_pickle=False) as z:
    meta = json.loads(str(z['meta']))
    if meta.get('version') != CACHE_VERSION:
      raise ValueError(f'cache version {meta.get("version")} != {CACHE_VERSION}')
    images = z['images']
    mask_shape = tuple(z['mask_shape'])
    if int(z['mask_max']) > 1:
      masks = z['masks'].astype(np.int32)
    else:
      count = int(np.prod(mask_shape))
      masks = np.unpackbits(z['masks'], count=count).reshape(mask_shape).astype(np.int32)
    has_mask = z['has_mask']
    shapes = z['orig_shapes']
    orig_images = z['orig_images']
    sizes = shapes[:, 0] * shapes[:, 1]
    orig_masks = np.unpackbits(z['orig_masks'], count=int(sizes.sum()))
    contours, contour_counts = z['contours'], z['contour_counts']
  frames, geometries = [], []
  size, mode = int(_get(data_config, 'image_size')), _get(data_config, 'resize_mode')
  pixel_start = np.concatenate([[0], np.cumsum(sizes)])
  contour_start = np.concatenate([[0], np.cumsum(contour_counts)])
  for i, record in enumerate(meta['frames']):
    shape = (int(shapes[i, 0]), int(shapes[i, 1]))
    pixels = slice(pixel_start[i], pixel_start[i + 1])
    for name in _TUPLE_FIELDS:
      if record.get(name) is not None:
        record[name] = tuple(record[name])
    frames.append(Frame(
        image=orig_images[pixels].reshape(shape).astype(np.float32),
        mask=orig_masks[pixels].reshape(shape).astype(np.uint8) if has_mask[i] else None,
        contour=(contours[contour_start[i]:contour_start[i + 1]].copy()
                 if contour_counts[i] else None), **record))
    geometries.append(Geometry.create(shape, size, mode))
  return Dataset(images, masks, frames, geometries, has_mask=has_mask, name=meta['name'],
                 skipped=[tuple(s) for s in meta['skipped']])


def load_dataset(data_config: Any, cases: Sequence[str] | None = None,
                 contoured_only: bool = True, name: str = 'all') -> Dataset:
  """Loads and preprocesses frames, through the cache in `config.data.cache_dir` if set.

  The cache file is `<cache_dir>/<source>-<key>.npz`, `key` = `cache_key(...)`: any change of
  a source file (path, size, mtime) or of the loading/preprocessing config makes a new entry.
  Items skipped when the cache was written are logged again on a hit.
  """
  cache_dir = _get(data_config, 'cache_dir')
  path = None
  if cache_dir:
    key = cache_key(data_config, cases, contoured_only)
    path = os.path.join(os.path.expanduser(cache_dir),
                        f'{_get(data_config, "source")}-{key[:24]}.npz')
    if os.path.isfile(path):
      try:
        dataset = load_cache(path, data_config)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Ignoring unreadable cache %s (%s); rebuilding', path, e)
      else:
        logging.info('Data cache hit: %s (%d frames)', path, len(dataset))
        for item_path, problem in dataset.skipped:
          logging.warning('Skipped (cached): %s: %s', item_path, problem)
        if dataset.skipped:
          logging.warning('Skipped %d item(s) while loading (on_error=skip, cached)',
                          len(dataset.skipped))
        dataset.name = name
        return dataset
  report = LoadReport(_get(data_config, 'on_error'))
  frames = load_frames(data_config, cases, contoured_only, report)
  dataset = build_dataset(frames, data_config, name=name, skipped=report.skipped)
  if path is not None:
    save_cache(path, dataset)
    logging.info('Data cache written: %s', path)
  return dataset


# ------------------------------------------------------------------------------ entry point


def _spacing_counts(dataset: Dataset) -> dict[str, int]:
  return dict(collections.Counter(f.spacing_source for f in dataset.frames))


def load_datasets(config: Any, workdir: str | None = None) -> tuple[Dataset, Dataset]:
  """Train and eval datasets for `config.data` (source, split, preprocessing, cache).

  Only contoured frames are used (for the DICOM source most frames have no contour). Writes
  `workdir/split.json` (the split, its case lists, frame counts, missing cases, skipped
  items) when `workdir` is given.

  Returns:
    (train Dataset, eval Dataset).
  """
  data_config = config.data
  full = load_dataset(data_config, contoured_only=True, name='all')
  split = case_splits(data_config, available=full.cases)
  train = full.select_cases(split['train'], name='train')
  evaluate = full.select_cases(split['eval'], name='eval')
  for dataset in (train, evaluate):
    logging.info('%s: %d frames from %d cases (spacing sources %s)', dataset.name, len(dataset),
                 len(dataset.cases), _spacing_counts(dataset))
  for key, cases in split.items():
    if key.startswith('missing:') and cases:
      logging.info('Official set %r: %d case(s) not in the data: %s', key.split(':', 1)[1],
                   len(cases), cases)
  if split['unassigned']:
    logging.info('Cases in the data used by neither train nor eval: %s', split['unassigned'])
  if workdir is not None:
    write_split(workdir, data_config, split, train, evaluate)
  return train, evaluate


def write_split(workdir: str, data_config: Any, split: dict[str, list[str]], train: Dataset,
                evaluate: Dataset) -> str:
  """Writes `workdir/split.json` describing the split a run used; returns its path."""
  def plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value

  record = {
      'split': _get(data_config, 'split'), 'source': _get(data_config, 'source'),
      'root': _root(data_config), 'contour': _get(data_config, 'contour'),
      'train_sets': plain(_get(data_config, 'train_sets')),
      'eval_sets': plain(_get(data_config, 'eval_sets')),
      'train_cases': split['train'], 'eval_cases': split['eval'],
      'train_frames': len(train), 'eval_frames': len(evaluate),
      'frames_per_case': {**train.frames_per_case(), **evaluate.frames_per_case()},
      'spacing_sources': {'train': _spacing_counts(train), 'eval': _spacing_counts(evaluate)},
      'missing': {k.split(':', 1)[1]: v for k, v in split.items() if k.startswith('missing:')},
      'unassigned': split['unassigned'],
      'skipped': [list(s) for s in train.skipped],
  }
  if _get(data_config, 'split') == 'kfold':
    record.update({
        'kfold_sets': plain(_get(data_config, 'kfold_sets')),
        'num_folds': int(_get(data_config, 'num_folds')), 'fold': int(_get(data_config, 'fold')),
        'kfold_seed': int(_get(data_config, 'kfold_seed')),
        'folds': {k.split(':', 1)[1]: v for k, v in split.items() if k.startswith('fold:')}})
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'split.json')
  with open(path, 'w') as f:
    json.dump(record, f, indent=2)
  return path

