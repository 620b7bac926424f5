"""PNG folders: `images/<case>-IM-0001-NNNN.dcm.png` with `<contour>_labels/` masks.

Such as the Meow-2 copy `derived_png_meow2`. No headers: the pixel spacing comes from a per-case
table or the nominal `config.data.nominal_spacing_mm` (logged, and recorded per frame in
`Frame.spacing_source`).
"""

import csv
import math
import os
import re
from typing import Any

from absl import logging
import numpy as np
from PIL import Image

from lvseg_jax.data.records import (DataError, Frame, LoadReport, normalize_case_id, root_dir,
                                    walk_files)


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
                    nominal_spacing_mm: float, contoured_only: bool = True,
                    epicardium: bool = False, on_error: str = 'raise',
                    report: LoadReport | None = None) -> list[Frame]:
  """Loads `folder/images/*.png` with masks from `folder/<contour>_labels/` (same file names).

  Args:
    folder: e.g. `derived_png_meow2`.
    contour: which label folder gives the mask ('i' -> i_labels, 'o' -> o_labels).
    cases: only these cases (normalized names); None for all.
    spacing_table: case -> (row, col) mm. Cases not in it get `nominal_spacing_mm` (warned).
    nominal_spacing_mm: fallback spacing, recorded as spacing_source='nominal'.
    contoured_only: drop images without a mask (counted in the log), else keep with mask=None.
    epicardium: also read `o_labels/` into `Frame.epi_mask` (None where there is no file).
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
  epi_dir = os.path.join(folder, 'o_labels')
  epi_names = set()
  if epicardium:
    if not os.path.isdir(epi_dir):
      raise DataError(epi_dir, 'epicardium mask folder does not exist (config.data.myocardium '
                      'needs o_labels/)')
    epi_names = {n for n in os.listdir(epi_dir) if not n.startswith('.')}
    for name in sorted(epi_names - set(pngs)):
      report.problem(os.path.join(epi_dir, name), f'mask has no matching image in {image_dir}')
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
      epi_mask = (_read_png_mask(os.path.join(epi_dir, name), image.shape)
                  if name in epi_names else None)
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
        spacing_source=source, source_path=path, epi_mask=epi_mask))
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
  return os.path.join(root_dir(data_config), data_config.png_dir)


def spacing_table_path(data_config: Any) -> str:
  """`config.data.spacing_table` ('' for none): as given if it exists, else under the root."""
  table = data_config.spacing_table
  if not table or os.path.isabs(table) or os.path.exists(table):
    return table
  return os.path.join(root_dir(data_config), table)


def load_source(data_config: Any, cases: set[str] | None, contoured_only: bool,
                report: LoadReport) -> list[Frame]:
  """The frames of `config.data.png_dir` (the `png` source)."""
  table_path = spacing_table_path(data_config)
  return load_png_folder(
      _png_folder(data_config), contour=data_config.contour, cases=cases,
      spacing_table=read_spacing_table(table_path) if table_path else None,
      nominal_spacing_mm=float(data_config.nominal_spacing_mm),
      contoured_only=contoured_only, epicardium=bool(data_config.myocardium), report=report)


def source_files(data_config: Any) -> list[str]:
  """Every file the `png` source may read (the cache key)."""
  folder = _png_folder(data_config)
  files = []
  subs = ['images', f'{data_config.contour}_labels'] + (['o_labels'] if data_config.myocardium
                                                        else [])
  for sub in subs:
    files.extend(walk_files(os.path.join(folder, sub)))
  table = spacing_table_path(data_config)
  return files + ([table] if table else [])


def source_cases(data_config: Any) -> list[str]:
  """Cases present, from the image file names."""
  image_dir = os.path.join(_png_folder(data_config), 'images')
  if not os.path.isdir(image_dir):
    return []
  parsed = (parse_png_name(n) for n in os.listdir(image_dir))
  return sorted({p[0] for p in parsed if p is not None})
