"""Input discovery: DICOM series (one per folder, a tree of them), NIfTI volumes (3D or 4D,
one series each), PNG data sets and plain PNG folders, each loaded through the data package
into a `Series`."""

import collections
import dataclasses
import os
import re
import warnings
from typing import Sequence

from absl import logging
import ml_collections
import numpy as np
import pydicom

from lvseg_jax import contours as contours_lib
from lvseg_jax import data as data_lib

_SERIES_UID_TAG = 0x0020000E


class PredictError(ValueError):
  """Input that cannot be predicted on; the message says what is wrong and where."""


@dataclasses.dataclass
class Series:
  """One cine series (or one PNG folder / case) to predict on."""
  name: str                        # output subfolder name
  kind: str                        # 'dicom' | 'png'
  folder: str
  frames: list[data_lib.Frame]
  case: str
  expert_dir: str | None = None
  warnings: list[str] = dataclasses.field(default_factory=list)


def warn(series_warnings: list[str], message: str, *args) -> None:
  text = message % args if args else message
  logging.warning('%s', text)
  series_warnings.append(text)


def _has_dicom_magic(path: str) -> bool:
  try:
    with open(path, 'rb') as f:
      head = f.read(132)
  except OSError:
    return False
  return head[128:132] == b'DICM'


def _is_dicom_folder(folder: str, names: Sequence[str]) -> bool:
  """Holds `.dcm` files, or extension-less files that start like DICOM (scanner exports)."""
  if any(n.lower().endswith('.dcm') for n in names):
    return True
  bare = [n for n in names if '.' not in n and n.upper() != 'DICOMDIR']
  return any(_has_dicom_magic(os.path.join(folder, n)) for n in bare[:3])


def _is_png(name: str) -> bool:
  return name.lower().endswith('.png') and not name.startswith('.')


def _series_uids(paths: Sequence[str]) -> collections.Counter:
  """SeriesInstanceUID of each DICOM file (header only), to refuse mixed folders."""
  uids: collections.Counter = collections.Counter()
  for path in paths:
    try:
      with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the SCD UIDs have leading zeros; pydicom warns
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=['SeriesInstanceUID'])
      # The raw bytes: converting the value would validate the UID, and the SCD UIDs (leading
      # zeros) make pydicom log a warning per file.
      item = ds.get_item(_SERIES_UID_TAG)
      value = getattr(item, 'value', b'') if item is not None else b''
      if isinstance(value, bytes):
        value = value.decode('ascii', errors='replace')
      uids[str(value or '').strip('\x00 ')] += 1
    except Exception:  # pylint: disable=broad-except
      continue  # unreadable files are reported by the loader itself
  uids.pop('', None)
  return uids


def check_single_series(folder: str) -> None:
  """Raises PredictError if the DICOM files of `folder` belong to more than one series."""
  paths = data_lib.list_dicom_files(folder)
  uids = _series_uids(paths)
  if len(uids) > 1:
    listing = ', '.join(f'{uid} ({n} files)' for uid, n in uids.most_common())
    raise PredictError(f'{folder}: DICOM files of {len(uids)} different series are mixed in '
                       f'one folder ({listing}); put each series in its own folder')


def _read_sheet(path: str) -> dict[str, str]:
  try:
    return data_lib.read_patient_sheet(path)
  except data_lib.DataError as e:
    logging.warning('%s', e)
    return {}


def _contour_source(config: ml_collections.ConfigDict) -> tuple[str, dict[str, str]]:
  """(contour_dir, SCD id -> case) from config.predict.contour_dir / patient_sheet."""
  contour_dir = str(config.predict.contour_dir or '')
  if not contour_dir:
    return '', {}
  contour_dir = os.path.abspath(os.path.expanduser(contour_dir))
  if not os.path.isdir(contour_dir):
    raise PredictError(f'{contour_dir}: predict.contour_dir does not exist')
  sheet_path = str(config.predict.patient_sheet or '')
  if not sheet_path:
    sheet_path = os.path.join(os.path.dirname(contour_dir), 'scd_patientdata.csv')
    if not os.path.isfile(sheet_path):
      return contour_dir, {}
  return contour_dir, _read_sheet(sheet_path)


def _expert_dir_for(case: str, contour_dir: str) -> str | None:
  """The expert folder of a case: `contour_dir` itself if it holds contour files, else the
  case's folder in a CAP `SCD_ManualContours` tree."""
  if not contour_dir:
    return None
  if any(contours_lib.parse_contour_filename(n) for n in os.listdir(contour_dir)):
    return contour_dir
  return data_lib.expert_contour_dir(contour_dir, case)


def _load_dicom(folder: str, config: ml_collections.ConfigDict,
                report: data_lib.LoadReport, contour_dir: str,
                sheet: dict[str, str]) -> Series | None:
  check_single_series(folder)
  nominal = float(config.data.nominal_spacing_mm)
  frames = data_lib.load_dicom_series(folder, nominal_spacing_mm=nominal, report=report)
  if not frames:
    return None
  scd_id = frames[0].case
  case = sheet.get(scd_id, scd_id)
  series_warnings: list[str] = []
  for frame in frames:
    frame.case = case
  expert_dir = _expert_dir_for(case, contour_dir) if contour_dir else None
  if contour_dir and expert_dir is None:
    warn(series_warnings, '%s: no expert contour folder for case %s under %s', folder, case,
          contour_dir)
  if expert_dir:
    count = data_lib.attach_contours(frames, expert_dir, config.data.contour, report,
                                     every_contour_has_a_frame=False)
    epi = 0
    if config.data.myocardium:   # a three-class model: its epicardium is scored too
      epi = data_lib.attach_contours(frames, expert_dir, 'o', report,
                                     every_contour_has_a_frame=False, epicardium=True)
    logging.info('%s: %d frames with expert contours (%d epicardial) from %s', folder, count,
                 epi, expert_dir)
  nominal_frames = sum(f.spacing_source == 'nominal' for f in frames)
  if nominal_frames:
    warn(series_warnings, '%s: %d frame(s) without PixelSpacing; areas and volumes use the '
          'nominal %.4f mm (config.data.nominal_spacing_mm)', folder, nominal_frames, nominal)
  return Series(name='', kind='dicom', folder=folder, frames=frames, case=case,
                expert_dir=expert_dir, warnings=series_warnings)


def _natural_key(name: str) -> list:
  return [int(t) if t.isdigit() else t.lower() for t in re.split(r'(\d+)', name)]


def _load_plain_pngs(folder: str, names: Sequence[str], config: ml_collections.ConfigDict,
                     table: dict[str, tuple[float, float]], report: data_lib.LoadReport
                     ) -> list[data_lib.Frame]:
  """PNG files of any name; frames numbered in natural name order when names carry no NNNN."""
  nominal = float(config.data.nominal_spacing_mm)
  frames = []
  for ordinal, name in enumerate(sorted(names, key=_natural_key), start=1):
    path = os.path.join(folder, name)
    parsed = data_lib.parse_png_name(name)
    case, frame_id, instance = parsed if parsed else (
        os.path.basename(os.path.normpath(folder)), f'IM-0001-{ordinal:04d}', ordinal)
    try:
      image = data_lib.read_png(path)
    except data_lib.DataError as e:
      report.problem(e.path, e.problem)
      continue
    spacing, source = (table[case], 'table') if case in table else ((nominal, nominal),
                                                                     'nominal')
    frames.append(data_lib.Frame(
        case=case, frame_id=frame_id, instance=instance, image=image.astype(np.float32),
        mask=None, contour=None, pixel_spacing=(float(spacing[0]), float(spacing[1])),
        spacing_source=source, source_path=path))
  return frames


def _png_series(folder: str, frames: list[data_lib.Frame]) -> list[Series]:
  """Groups PNG frames by case; frames without a slice order keep the file order."""
  by_case: dict[str, list[data_lib.Frame]] = collections.defaultdict(list)
  for frame in frames:
    by_case[frame.case].append(frame)
  out = []
  for case, case_frames in sorted(by_case.items()):
    series_warnings: list[str] = []
    if any(f.spacing_source == 'nominal' for f in case_frames):
      warn(series_warnings, '%s (%s): PNG frames have no pixel spacing; areas use the nominal '
            '%.4f mm (set config.data.spacing_table)', folder, case,
            case_frames[0].pixel_spacing[0])
    out.append(Series(name='', kind='png', folder=folder, frames=case_frames, case=case,
                      warnings=series_warnings))
  return out


def find_series(input_path: str, config: ml_collections.ConfigDict,
                report: data_lib.LoadReport | None = None) -> list[Series]:
  """Finds and loads every series under `input_path` (see the module docstring).

  Files skipped with `predict.on_error='skip'` are listed in `report.skipped`.

  A folder with DICOM files is one series (its subfolders are searched too); a folder with an
  `images/` subfolder of PNGs is a PNG data set (masks from `<contour>_labels/` become the
  expert); any other folder with PNG files is a PNG series per case.

  Raises:
    PredictError: missing input, a file instead of a folder, nothing to predict on, mixed series.
    data.DataError: unreadable files (unless predict.on_error='skip').
  """
  if not input_path or not os.path.exists(input_path):
    raise PredictError(f'{input_path!r}: input does not exist')
  if not os.path.isdir(input_path) and not data_lib.is_nifti(input_path):
    raise PredictError(f'{input_path}: input must be a NIfTI file (.nii, .nii.gz) or a folder '
                       '(a DICOM series, a tree of series, NIfTI files or PNG images)')
  report = report if report is not None else data_lib.LoadReport(config.predict.on_error)
  if not os.path.isdir(input_path):
    return _named(_nifti_series([input_path], report))
  contour_dir, sheet = _contour_source(config)
  table_path = data_lib.spacing_table_path(config.data)
  table = data_lib.read_spacing_table(table_path) if table_path else {}
  series: list[Series] = []
  for dirpath, dirnames, filenames in os.walk(input_path):
    dirnames.sort()
    names = sorted(filenames)
    if 'images' in dirnames and any(_is_png(n) for n in
                                    os.listdir(os.path.join(dirpath, 'images'))):
      frames = data_lib.load_png_folder(
          dirpath, contour=config.data.contour, contoured_only=False, report=report,
          nominal_spacing_mm=float(config.data.nominal_spacing_mm), spacing_table=table)
      series += _png_series(dirpath, frames)
      # Its images/ and *_labels/ folders are part of this data set, not more series.
      dirnames[:] = [d for d in dirnames if d != 'images' and not d.endswith('_labels')]
    if os.path.basename(dirpath) == config.data.nifti_labels and dirpath != input_path:
      # nnU-Net's labelsTr/ (`data.nifti_labels`) beside imagesTr/: label volumes, not images.
      logging.info('%s: label volumes (data.nifti_labels), not images: not predicted', dirpath)
    else:
      series += _nifti_series([os.path.join(dirpath, n) for n in names
                               if data_lib.is_nifti(n)], report)
    if _is_dicom_folder(dirpath, names):
      loaded = _load_dicom(dirpath, config, report, contour_dir, sheet)
      if loaded is not None:
        series.append(loaded)
    elif any(_is_png(n) for n in names) and not os.path.basename(dirpath).endswith('_labels'):
      frames = _load_plain_pngs(dirpath, [n for n in names if _is_png(n)], config, table,
                                report)
      series += _png_series(dirpath, frames)
  report.log_summary(input_path)
  series = [s for s in series if s.frames]
  for s in series:
    constant = [f.frame_id for f in s.frames if f.image.size and np.ptp(f.image) == 0]
    if constant:
      warn(s.warnings, '%s: %d frame(s) hold one constant value (%s%s): nothing to segment, '
           'their masks are empty', s.folder, len(constant), ', '.join(constant[:5]),
           ', ...' if len(constant) > 5 else '')
  if not series:
    raise PredictError(f'{input_path}: no DICOM series (*.dcm or DICOM files without an '
                       'extension), NIfTI volumes or PNG images found' +
                       (f' ({len(report.skipped)} unreadable file(s) skipped)'
                        if report.skipped else ''))
  return _named(series)


def _nifti_series(paths: Sequence[str], report: data_lib.LoadReport) -> list[Series]:
  """One series per NIfTI volume; ACDC-style label volumes (`*_gt.nii[.gz]`) are not images."""
  out = []
  for path in paths:
    if data_lib.nifti.case_name(path).endswith('_gt'):
      logging.info('%s: a label volume (*_gt), not an image: not predicted', path)
      continue
    try:
      frames = data_lib.load_nifti_series(path)
    except data_lib.DataError as e:
      report.problem(e.path, e.problem)
      continue
    out.append(Series(name='', kind='nifti', folder=path, frames=frames, case=frames[0].case))
  return out


def _named(series: list[Series]) -> list[Series]:
  """Gives each series a unique, readable output name: <case>_<series folder>."""
  used: collections.Counter = collections.Counter()
  for s in series:
    base = '' if s.kind == 'nifti' else os.path.basename(os.path.normpath(s.folder))
    name = s.case if base in (s.case, '') else f'{s.case}_{base}'
    name = re.sub(r'[^A-Za-z0-9._-]+', '_', name)
    used[name] += 1
    s.name = name if used[name] == 1 else f'{name}_{used[name]}'
  return series
