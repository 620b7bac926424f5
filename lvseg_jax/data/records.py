"""Frame records, data errors, case names, and the data root every loader reads from."""

import dataclasses
import os
import re
from typing import Any, Callable

from absl import logging
import numpy as np

ON_ERROR = ('raise', 'skip')


def root_dir(data_config: Any) -> str:
  """`config.data.root` as an absolute path."""
  return os.path.abspath(os.path.expanduser(str(data_config.root or '')))


def walk_files(folder: str) -> list[str]:
  """Every file under `folder`, in a stable order."""
  found = []
  for dirpath, dirnames, filenames in os.walk(folder):
    dirnames.sort()
    found.extend(os.path.join(dirpath, n) for n in sorted(filenames))
  return found


@dataclasses.dataclass
class Frame:
  """One 2D frame at its original resolution, with everything known about it.

  `mask` and `contour` are None for frames without an expert contour (endocardium; `epi_mask`
  and `epi_contour` likewise for the epicardium). For PNG frames the DICOM
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
  # The epicardium (loaded with config.data.myocardium; None where the expert drew none):
  epi_mask: np.ndarray | None = dataclasses.field(default=None, repr=False)  # (H, W) {0, 1}
  epi_contour: np.ndarray | None = dataclasses.field(default=None, repr=False)  # (P, 2) (x, y)

  @property
  def shape(self) -> tuple[int, int]:
    return (int(self.image.shape[0]), int(self.image.shape[1]))




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


def load_cases(found: dict[str, Any], load_case: Callable[[str, Any], list[Frame]],
               cases: set[str] | None, contoured_only: bool, report: LoadReport) -> list[Frame]:
  """`load_case(case, found[case])` for every case found (`cases`: only those); a case that
  raises `DataError` goes to `report`; frames without a cavity are left out with
  `contoured_only`. The loop of the volume layouts (acdc, nifti)."""
  frames = []
  for case, where in sorted(found.items()):
    if cases is not None and case not in cases:
      continue
    try:
      loaded = load_case(case, where)
    except DataError as e:
      report.problem(e.path, e.problem)
      continue
    frames += [f for f in loaded if f.mask.any() or not contoured_only]
  return frames


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
