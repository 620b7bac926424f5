"""LV areas, volumes, end-diastole / end-systole and ejection fraction by slice summation.

Pure NumPy, usable from scripts. Everything works on an `(S, T)` array of LV cavity areas in mm²
(slices x phases, NaN where a frame has no segmentation, e.g. an uncontoured expert frame):

  * area of a mask = pixel count x row spacing x column spacing (`mask_area_mm2`);
  * area of a polygon = shoelace formula in pixels x row spacing x column spacing
    (`polygon_area_mm2`); this is how the data README computes its expert volumes;
  * volume of a phase = sum over slices of area x spacing between slices (Simpson's / disc
    summation without end-slice corrections), in mL (1 mL = 1000 mm³).

Two definitions of EDV / ESV are offered:

  * `lv_volumes` (the clinical one, used for predictions): the end-diastolic (ED) phase is the
    phase with the largest total LV volume, the end-systolic (ES) phase the one with the smallest;
    EDV and ESV are the totals at those two phases. Only phases that have an area on every
    included slice take part (a partly segmented phase would look small and be picked as ES).
  * `lv_volumes_per_slice_extrema` (the data README's check on the expert contours): on each
    slice, the largest contoured area counts as ED and the smallest as ES, whatever the phase.
    This can only give a larger EDV and a smaller ESV than the phase-based definition; on the
    staged SCD cases the two agree to within 1.5 mL (see docs/RESULTS.md).

Stroke volume SV = EDV - ESV; ejection fraction EF = 100 x SV / EDV (%).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import numpy as np
from scipy import ndimage

from lvseg_jax import contours as contours_lib

MM3_PER_ML = 1000.0


def shoelace_area(contour: np.ndarray) -> float:
  """Area (pixels²) enclosed by a closed (P, 2) polygon; a repeated closing point is harmless."""
  return abs(contours_lib.signed_area(contour))


def polygon_area_mm2(contour: np.ndarray, pixel_spacing: float | Sequence[float]) -> float:
  """Shoelace area of an (x, y) pixel polygon, in mm² (pixel spacing is (row, col) mm)."""
  row, col = contours_lib.as_spacing(pixel_spacing)
  return shoelace_area(contour) * row * col


def mask_area_mm2(mask: np.ndarray, pixel_spacing: float | Sequence[float]) -> float:
  """Foreground pixel count x row spacing x column spacing, in mm² (nonzero is foreground)."""
  row, col = contours_lib.as_spacing(pixel_spacing)
  return float(np.count_nonzero(mask)) * row * col


def area_grid(entries: Iterable[tuple[int, int, float]], num_slices: int | None = None,
              num_phases: int | None = None) -> np.ndarray:
  """Builds the (S, T) area array from `(slice_index, phase_index, area_mm2)` triples.

  Cells without an entry are NaN. A second entry for the same cell is an error (it would mean the
  frames were grouped wrongly, e.g. two series mixed).
  """
  entries = list(entries)
  if num_slices is None:
    num_slices = 1 + max((int(s) for s, _, _ in entries), default=-1)
  if num_phases is None:
    num_phases = 1 + max((int(t) for _, t, _ in entries), default=-1)
  grid = np.full((num_slices, num_phases), np.nan)
  for s, t, area in entries:
    s, t = int(s), int(t)
    if not (0 <= s < num_slices and 0 <= t < num_phases):
      raise ValueError(f'(slice {s}, phase {t}) lies outside a {num_slices}x{num_phases} grid')
    if not np.isnan(grid[s, t]):
      raise ValueError(f'two areas for slice {s}, phase {t}')
    grid[s, t] = float(area)
  return grid


def _check_areas(areas_mm2: np.ndarray) -> np.ndarray:
  areas = np.asarray(areas_mm2, dtype=np.float64)
  if areas.ndim != 2:
    raise ValueError(f'areas must be an (S, T) slices x phases array, got shape {areas.shape}')
  if np.any(areas[~np.isnan(areas)] < 0):
    raise ValueError('areas must be non-negative')
  return areas


def _slice_spacing(spacing_between_slices_mm: float | Sequence[float], num_slices: int
                   ) -> np.ndarray:
  """Per-slice thickness of the summation discs, (S,) mm."""
  spacing = np.asarray(spacing_between_slices_mm, dtype=np.float64)
  if spacing.ndim == 0:
    spacing = np.full((num_slices,), float(spacing))
  if spacing.shape != (num_slices,):
    raise ValueError(f'spacing between slices must be a scalar or have {num_slices} entries, '
                     f'got shape {spacing.shape}')
  if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
    raise ValueError(f'spacing between slices must be positive and finite, got {spacing}')
  return spacing


def slice_volumes_ml(areas_mm2: np.ndarray, spacing_between_slices_mm: float | Sequence[float]
                     ) -> np.ndarray:
  """(S, T) disc volumes in mL: area x spacing between slices (NaN stays NaN)."""
  areas = _check_areas(areas_mm2)
  spacing = _slice_spacing(spacing_between_slices_mm, areas.shape[0])
  return areas * spacing[:, None] / MM3_PER_ML


def volumes_per_phase_ml(areas_mm2: np.ndarray,
                         spacing_between_slices_mm: float | Sequence[float]) -> np.ndarray:
  """(T,) total LV volume of each phase in mL, by slice summation.

  Slices without any area in any phase (e.g. uncontoured expert slices) are left out. A phase
  that misses an area on one of the remaining slices is NaN: its total would be too small.
  """
  volumes = slice_volumes_ml(areas_mm2, spacing_between_slices_mm)
  used = ~np.all(np.isnan(volumes), axis=1)
  if not used.any():
    return np.full((volumes.shape[1],), np.nan)
  volumes = volumes[used]
  totals = volumes.sum(axis=0)  # NaN where any used slice is missing, as documented
  return totals


def ed_es_phases(volumes_ml: np.ndarray) -> tuple[int, int]:
  """(ED, ES) phase indices: largest and smallest total volume; NaN phases are skipped.

  Ties go to the earliest phase. Raises ValueError if no phase has a volume.
  """
  volumes = np.asarray(volumes_ml, dtype=np.float64)
  if volumes.ndim != 1:
    raise ValueError(f'volumes must be a (T,) array, got shape {volumes.shape}')
  if np.all(np.isnan(volumes)):
    raise ValueError('no phase has a complete volume (every phase misses some slice)')
  return int(np.nanargmax(volumes)), int(np.nanargmin(volumes))


def ejection_fraction(edv_ml: float, esv_ml: float) -> float:
  """EF in % = 100 x (EDV - ESV) / EDV; NaN when EDV is 0 or not finite."""
  if not np.isfinite(edv_ml) or not np.isfinite(esv_ml) or edv_ml <= 0:
    return float('nan')
  return 100.0 * (edv_ml - esv_ml) / edv_ml


@dataclasses.dataclass
class LVVolumes:
  """EDV / ESV / SV / EF of one series and how they were obtained."""
  edv_ml: float
  esv_ml: float
  sv_ml: float
  ef_pct: float
  ed_phase: int | None            # None for the per-slice-extrema method
  es_phase: int | None
  volumes_ml: list[float]         # total per phase (NaN: incomplete phase); [] for extrema
  method: str                     # 'phase' | 'slice_extrema'
  num_slices: int                 # slices that entered the sums

  def to_dict(self) -> dict[str, Any]:
    """JSON-friendly dict (NaN -> None)."""
    def clean(v):
      if isinstance(v, float) and not np.isfinite(v):
        return None
      if isinstance(v, list):
        return [clean(x) for x in v]
      return v
    return {k: clean(v) for k, v in dataclasses.asdict(self).items()}


def lv_volumes(areas_mm2: np.ndarray, spacing_between_slices_mm: float | Sequence[float]
               ) -> LVVolumes:
  """Clinical EDV/ESV/SV/EF: ED and ES are the phases with the largest / smallest total volume.

  Args:
    areas_mm2: (S, T) LV areas, slices x phases; NaN where a frame has no segmentation.
    spacing_between_slices_mm: scalar, or (S,) per-slice disc thickness, in mm.

  Returns:
    `LVVolumes` with method 'phase'. With a single complete phase, ESV, SV and EF are NaN and
    `es_phase` is None (there is nothing to contract to).
  """
  areas = _check_areas(areas_mm2)
  volumes = volumes_per_phase_ml(areas, spacing_between_slices_mm)
  ed, es = ed_es_phases(volumes)
  num_slices = int((~np.all(np.isnan(areas), axis=1)).sum())
  edv = float(volumes[ed])
  if int(np.sum(~np.isnan(volumes))) < 2:
    return LVVolumes(edv, float('nan'), float('nan'), float('nan'), ed, None,
                     [float(v) for v in volumes], 'phase', num_slices)
  esv = float(volumes[es])
  return LVVolumes(edv, esv, edv - esv, ejection_fraction(edv, esv), ed, es,
                   [float(v) for v in volumes], 'phase', num_slices)


def lv_volumes_per_slice_extrema(areas_mm2: np.ndarray,
                                 spacing_between_slices_mm: float | Sequence[float]
                                 ) -> LVVolumes:
  """The data README's expert-contour volumes: per slice, largest area = ED, smallest = ES.

  Each slice with at least one area contributes max(area) x spacing to EDV and min(area) x
  spacing to ESV, over the phases where it has an area (NaN cells are ignored).
  """
  volumes = slice_volumes_ml(areas_mm2, spacing_between_slices_mm)
  used = ~np.all(np.isnan(volumes), axis=1)
  if not used.any():
    raise ValueError('no slice has an area')
  edv = float(np.nanmax(volumes[used], axis=1).sum())
  esv = float(np.nanmin(volumes[used], axis=1).sum())
  return LVVolumes(edv, esv, edv - esv, ejection_fraction(edv, esv), None, None, [],
                   'slice_extrema', int(used.sum()))


# ---------------------------------------------------------------- myocardium, mass, slice rules

# Myocardial density for LV mass (g/mL), the value CMR analysis uses (Schulz-Menger et al.,
# "Standardized image interpretation and post-processing in CMR", JCMR 2020).
MYOCARDIAL_DENSITY_G_PER_ML = 1.05


def myocardial_coverage(cavity: np.ndarray, myocardium: np.ndarray) -> float:
  """Share of the cavity's circumference that borders myocardium, in [0, 1].

  The circumference is the ring of pixels just outside the cavity (its 8-neighbours); the share
  is the fraction of that ring labelled myocardium. NaN for an empty cavity.
  """
  cavity = np.asarray(cavity).astype(bool)
  if not cavity.any():
    return float('nan')
  ring = ndimage.binary_dilation(cavity, structure=np.ones((3, 3), bool)) & ~cavity
  return float(np.count_nonzero(ring & np.asarray(myocardium).astype(bool))
               / np.count_nonzero(ring))


def base_is_first(cavity_areas_mm2: np.ndarray) -> bool:
  """Whether slice 0 is the basal end of the stack: the LV cavity tapers towards the apex, so
  the base is the end nearer the area-weighted centre of the (S, T) cavity areas."""
  areas = np.nan_to_num(_check_areas(cavity_areas_mm2)).sum(axis=1)
  if areas.sum() <= 0:
    return True
  centre = float(np.dot(np.arange(len(areas)), areas) / areas.sum())
  return centre <= (len(areas) - 1) / 2


@dataclasses.dataclass
class SliceRules:
  """Which slices enter the sums (README "Clinical measurements").

  Basal: walking from the base, a slice whose cavity is surrounded by myocardium over less than
  `min_coverage` of its circumference (or has no cavity) is above the ventricle (left atrium,
  outflow tract) and is excluded, cavity and myocardium, until the first slice that passes.
  Apical: walking from the apex, a slice whose cavity is smaller than `min_apical_cavity_mm2`
  (or empty) contributes no cavity volume, until the first slice that passes; its myocardium
  still counts towards the mass. Both are applied per phase.
  """
  min_coverage: float = 0.5
  min_apical_cavity_mm2: float = 0.0


def slice_exclusions(cavity_areas_mm2: np.ndarray, coverage: np.ndarray | None,
                     rules: SliceRules, base_first: bool | None = None
                     ) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
  """Applies `rules` to (S, T) cavity areas and myocardial coverage (None: no myocardium, so
  no basal rule).

  Returns:
    (cavity_in, myocardium_in, excluded): (S, T) bool masks of the cells that enter the cavity
    and myocardium sums, and one {'slice', 'phase', 'part', 'reason'} per exclusion.
  """
  areas = _check_areas(cavity_areas_mm2)
  num_slices, num_phases = areas.shape
  if base_first is None:
    base_first = base_is_first(areas)
  from_base = list(range(num_slices)) if base_first else list(range(num_slices))[::-1]
  cavity_in = ~np.isnan(areas)
  myocardium_in = cavity_in.copy()
  excluded: list[dict[str, Any]] = []
  for t in range(num_phases):
    if coverage is not None:
      for s in from_base:
        if np.isnan(areas[s, t]):
          continue
        share = coverage[s, t]
        if np.isfinite(share) and share >= rules.min_coverage:
          break
        cavity_in[s, t] = myocardium_in[s, t] = False
        excluded.append({'slice': s, 'phase': t, 'part': 'cavity+myocardium', 'reason': (
            'basal: no cavity' if not np.isfinite(share) else
            f'basal: myocardium around {100 * share:.0f}% of the cavity '
            f'(< {100 * rules.min_coverage:.0f}%)')})
    for s in from_base[::-1]:
      if np.isnan(areas[s, t]) or not cavity_in[s, t]:
        continue
      if areas[s, t] >= rules.min_apical_cavity_mm2 and areas[s, t] > 0:
        break
      cavity_in[s, t] = False
      excluded.append({'slice': s, 'phase': t, 'part': 'cavity', 'reason': (
          f'apical: cavity {areas[s, t]:.0f} mm² (< {rules.min_apical_cavity_mm2:g} mm²)')})
  return cavity_in, myocardium_in, excluded


def lv_measurements(cavity_areas_mm2: np.ndarray, spacing_between_slices_mm: float,
                    rules: SliceRules, myocardium_areas_mm2: np.ndarray | None = None,
                    coverage: np.ndarray | None = None) -> dict[str, Any]:
  """EDV/ESV/SV/EF after the slice rules, and with the myocardium, LV mass at ED.

  Returns:
    {'volumes': LVVolumes dict, 'excluded': [...], 'base_first': bool, and with the
    myocardium 'myocardial_volume_ml', 'lv_mass_g' (at the ED phase; None if unknown)}.
  """
  areas = _check_areas(cavity_areas_mm2)
  base_first = base_is_first(areas)
  cavity_in, myocardium_in, excluded = slice_exclusions(areas, coverage, rules, base_first)
  counted = np.where(cavity_in, areas, np.where(np.isnan(areas), np.nan, 0.0))
  volumes = lv_volumes(counted, spacing_between_slices_mm)
  out: dict[str, Any] = {'volumes': volumes.to_dict(), 'excluded': excluded,
                         'base_first': base_first}
  if myocardium_areas_mm2 is not None:
    myo = _check_areas(myocardium_areas_mm2)[:, volumes.ed_phase]
    spacing = _slice_spacing(spacing_between_slices_mm, len(myo))
    kept = myocardium_in[:, volumes.ed_phase] & ~np.isnan(myo)
    volume = float(np.sum(myo[kept] * spacing[kept]) / MM3_PER_ML)
    out['myocardial_volume_ml'] = volume
    out['lv_mass_g'] = volume * MYOCARDIAL_DENSITY_G_PER_ML
  return out
