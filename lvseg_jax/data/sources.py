"""The source registry (png | dicom | acdc | nifti) and `load_frames`, the one way frames are loaded."""

import os
from typing import Any, Callable, NamedTuple, Sequence

from absl import logging

from lvseg_jax.data import acdc
from lvseg_jax.data import nifti_folders
from lvseg_jax.data import png
from lvseg_jax.data import scd_dicom
from lvseg_jax.data.records import DataError, Frame, LoadReport, normalize_case_id, root_dir


class Source(NamedTuple):
  load: Callable[[Any, set[str] | None, bool, LoadReport], list[Frame]]
  files: Callable[[Any], list[str]]     # every file the loader may read (the cache key)
  cases: Callable[[Any], list[str]]     # cases present, from names only (cheap)
  # case -> pathology group for stratified folds; None: from the SCD case names
  groups: Callable[[Any], dict[str, str]] | None = None


SOURCES = {
    'png': Source(png.load_source, png.source_files, png.source_cases),
    'dicom': Source(scd_dicom.load_source, scd_dicom.source_files, scd_dicom.source_cases),
    'acdc': Source(acdc.load_source, acdc.source_files, acdc.source_cases, acdc.groups),
    'nifti': Source(nifti_folders.load_source, nifti_folders.source_files,
                    nifti_folders.source_cases, nifti_folders.groups),
}


def get_source(name: str) -> Source:
  if name not in SOURCES:
    raise ValueError(f'Unknown data source {name!r}; choices: {sorted(SOURCES)}')
  return SOURCES[name]


def check_root(data_config: Any) -> str:
  if not str(data_config.root or '').strip():
    raise DataError('config.data.root', 'not set (or set $LVSEG_DATA_DIR; see README "Data")')
  root = root_dir(data_config)
  if not os.path.isdir(root):
    raise DataError(root, 'data directory does not exist (set config.data.root or '
                    '$LVSEG_DATA_DIR; see README "Data")')
  if not os.listdir(root):
    raise DataError(root, 'data directory is empty')
  return root


def available_cases(data_config: Any) -> list[str]:
  """Cases present in the configured data, from file and folder names only."""
  check_root(data_config)
  return get_source(data_config.source).cases(data_config)


def load_frames(data_config: Any, cases: Sequence[str] | None = None,
                contoured_only: bool = True, report: LoadReport | None = None) -> list[Frame]:
  """Loads the frames of the configured source (`config.data.source`: png | dicom | acdc | nifti).

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
  source = get_source(data_config.source)
  report = report if report is not None else LoadReport(data_config.on_error)
  root = check_root(data_config)
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
                    f'{data_config.source!r}' +
                    (f' and cases {sorted(wanted)}' if wanted is not None else '') +
                    (f' ({len(report.skipped)} item(s) skipped)' if report.skipped else ''))
  frames.sort(key=lambda f: (f.case, f.slice_index if f.slice_index is not None else -1,
                             f.phase_index if f.phase_index is not None else -1, f.instance))
  return frames