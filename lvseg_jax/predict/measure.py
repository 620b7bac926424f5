"""Measurements of a predicted series: areas per frame, slice spacing, volumes, ED/ES, EF,
the expert's volumes where contours are known, and the NIfTI geometry."""

import collections
import math
from typing import Any, Sequence

from absl import logging
import ml_collections
import numpy as np

from lvseg_jax import clinical
from lvseg_jax import data as data_lib
from lvseg_jax import export
from lvseg_jax import metrics
from lvseg_jax.predict.inference import Prediction, tta_mode
from lvseg_jax.predict.inputs import Series


def has_grid(frames: Sequence[data_lib.Frame]) -> bool:
  """Whether every frame has a slice and a phase index (needed for volumes and 4D NIfTI)."""
  return bool(frames) and all(f.slice_index is not None and f.phase_index is not None
                              for f in frames)


def grid_shape(frames: Sequence[data_lib.Frame]) -> tuple[int, int]:
  """(slices, phases) spanned by the frames' indices."""
  return (1 + max(f.slice_index for f in frames), 1 + max(f.phase_index for f in frames))


def area_grid_from(frames: Sequence[data_lib.Frame], areas: Sequence[float | None]) -> np.ndarray:
  """(S, T) areas from per-frame values (None -> NaN, e.g. frames without an expert contour)."""
  shape = grid_shape(frames)
  return clinical.area_grid(((f.slice_index, f.phase_index, a)
                             for f, a in zip(frames, areas) if a is not None), *shape)


def expert_areas(frames: Sequence[data_lib.Frame], source: str = 'polygon') -> list[float | None]:
  """Per-frame expert LV areas (mm²): 'polygon' = shoelace of the contour (the data README's
  definition), 'mask' = pixel count of the rasterized contour (the predictions' definition)."""
  if source not in ('polygon', 'mask'):
    raise ValueError(f"source must be 'polygon' or 'mask', got {source!r}")
  out: list[float | None] = []
  for f in frames:
    if source == 'polygon' and f.contour is not None:
      out.append(clinical.polygon_area_mm2(f.contour, f.pixel_spacing))
    elif source == 'mask' and f.mask is not None:
      out.append(clinical.mask_area_mm2(f.mask, f.pixel_spacing))
    else:
      out.append(None)
  return out


def expert_volumes(frames: Sequence[data_lib.Frame], spacing_mm: float) -> dict[str, Any]:
  """Expert EDV/ESV/SV/EF of a series by three definitions (see the module docstring).

  Returns:
    {'slice_extrema': README definition, 'phase': phase definition on the polygons,
     'phase_mask': phase definition on the rasterized masks}, each an `LVVolumes` dict;
    definitions that cannot be computed are None. Empty dict without expert contours.
  """
  if not any(f.contour is not None or f.mask is not None for f in frames):
    return {}
  out: dict[str, Any] = {}
  polygon = area_grid_from(frames, expert_areas(frames, 'polygon'))
  mask = area_grid_from(frames, expert_areas(frames, 'mask'))
  for name, grid, fn in (('slice_extrema', polygon, clinical.lv_volumes_per_slice_extrema),
                         ('phase', polygon, clinical.lv_volumes),
                         ('phase_mask', mask, clinical.lv_volumes)):
    try:
      out[name] = fn(grid, spacing_mm).to_dict()
    except ValueError as e:
      logging.info('expert volumes (%s) not computed: %s', name, e)
      out[name] = None
  return out


def predicted_areas(p: Prediction, method: str) -> tuple[float, float | None]:
  """(cavity, epicardium) areas in mm² of a prediction: inside its sub-pixel contours
  ('contour'), or pixel counts of its masks ('pixels'). The epicardium is None for a
  cavity-only model."""
  spacing = p.frame.pixel_spacing
  if method == 'pixels':
    return (clinical.mask_area_mm2(p.mask, spacing),
            None if p.epi_mask is None else clinical.mask_area_mm2(p.epi_mask, spacing))
  polygon = lambda c: clinical.polygon_area_mm2(c, spacing) if len(c) >= 3 else 0.0
  return (polygon(p.contour),
          None if p.epi_mask is None else polygon(p.epi_contour))


def frame_areas(predictions: Sequence[Prediction], method: str
                ) -> dict[str, list[float | None]]:
  """Per prediction: 'cavity' and 'epicardium' areas in mm² (`predicted_areas`), and for a
  three-class model the 'myocardium' area (epicardium - cavity) and the myocardial 'coverage'
  of the cavity (None each for a cavity-only model)."""
  pairs = [predicted_areas(p, method) for p in predictions]
  cavity, epicardium = [a for a, _ in pairs], [e for _, e in pairs]
  return {'cavity': cavity, 'epicardium': epicardium,
          'myocardium': [None if e is None else max(e - a, 0.0)
                         for a, e in zip(cavity, epicardium)],
          'coverage': [None if p.epi_mask is None else
                       clinical.myocardial_coverage(p.mask, p.myocardium) for p in predictions]}


def series_measurements(frames: Sequence[data_lib.Frame], areas: dict[str, list[float | None]],
                        spacing_mm: float, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`clinical.lv_measurements` of a series' `frame_areas`, with `config.predict`'s slice
  rules (the basal rule only for a three-class model)."""
  rules = clinical.SliceRules(float(config.predict.min_myocardial_coverage),
                              float(config.predict.min_apical_cavity_mm2))
  three_classes = all(m is not None for m in areas['myocardium'])
  return clinical.lv_measurements(
      area_grid_from(frames, areas['cavity']), spacing_mm, rules,
      area_grid_from(frames, areas['myocardium']) if three_classes else None,
      area_grid_from(frames, areas['coverage']) if three_classes else None)


def slice_spacing(frames: Sequence[data_lib.Frame], fallback_mm: float = 0.0
                  ) -> tuple[float, str, list[str]]:
  """Spacing between slices for volume summation: (mm, source, warnings).

  Order of preference: DICOM SpacingBetweenSlices (what the data README uses), the distance
  between consecutive slice positions along the normal, SliceThickness (ignores gaps), then
  `fallback_mm`; (nan, 'none') without any.
  """
  notes: list[str] = []
  positions = _slice_positions(frames)
  step = None
  if positions is not None and len(positions) > 1:
    diffs = np.abs(np.diff(np.sort(positions)))
    step = float(np.median(diffs))
    if np.max(np.abs(diffs - step)) > 0.05 * step:
      notes.append(f'slice positions are not evenly spaced (gaps {np.round(diffs, 2).tolist()} '
                   'mm); volumes use one spacing')
  tagged = [f.spacing_between_slices for f in frames if f.spacing_between_slices]
  if tagged:
    value = float(np.median(tagged))
    if step is not None and abs(value - step) > 0.1 * step:
      notes.append(f'SpacingBetweenSlices {value:g} mm differs from the slice positions\' '
                   f'spacing {step:.3g} mm; using SpacingBetweenSlices')
    return value, 'dicom', notes
  if step is not None and step > 0:
    return step, 'positions', notes
  thickness = [f.slice_thickness for f in frames if f.slice_thickness]
  if thickness:
    notes.append('no SpacingBetweenSlices nor slice positions: using SliceThickness (gaps '
                 'between slices, if any, are ignored)')
    return float(np.median(thickness)), 'thickness', notes
  if fallback_mm and fallback_mm > 0:
    notes.append(f'no slice spacing in the input: using predict.slice_spacing_mm = '
                 f'{fallback_mm:g} mm')
    return float(fallback_mm), 'config', notes
  notes.append('no slice spacing (no SpacingBetweenSlices, positions or SliceThickness, and '
               'predict.slice_spacing_mm is 0): volumes not computed')
  return float('nan'), 'none', notes


def _slice_positions(frames: Sequence[data_lib.Frame]) -> np.ndarray | None:
  """(S,) position of each slice index along the slice normal (mm), None if unknown."""
  if not has_grid(frames):
    return None
  by_slice: dict[int, list[float]] = collections.defaultdict(list)
  for f in frames:
    if f.slice_position is not None:
      by_slice[f.slice_index].append(f.slice_position)
  num_slices = grid_shape(frames)[0]
  if len(by_slice) != num_slices:
    return None
  return np.array([np.median(by_slice[s]) for s in range(num_slices)])


def series_affine(frames: Sequence[data_lib.Frame], slice_spacing_mm: float
                  ) -> tuple[np.ndarray, list[int], str]:
  """(affine, slice order, kind) for a series' NIfTI volume.

  DICOM geometry gives `export.dicom_affine` with the slice step from the first and last
  slices' ImagePositionPatient; NIfTI slice k is `order[k]` of the series (slices are sorted
  along the normal when the acquisition order is not monotonic). Without geometry: spacing only.
  """
  num_slices = grid_shape(frames)[0] if has_grid(frames) else len(frames)
  order = list(range(num_slices))
  geometric = has_grid(frames) and all(
      f.image_position is not None and f.image_orientation is not None for f in frames)
  if not geometric:
    spacing = slice_spacing_mm if math.isfinite(slice_spacing_mm) else 1.0
    return export.nominal_affine(frames[0].pixel_spacing, spacing), order, 'nominal'
  first = {}
  for f in sorted(frames, key=lambda f: f.phase_index):
    first.setdefault(f.slice_index, f)
  positions = np.array([first[s].slice_position for s in order])
  steps = np.diff(positions)
  if len(steps) and not (np.all(steps > 0) or np.all(steps < 0)):
    order = [int(i) for i in np.argsort(positions)]
  ref, last = first[order[0]], first[order[-1]]
  if num_slices > 1:
    step = (np.asarray(last.image_position) - np.asarray(ref.image_position)) / (num_slices - 1)
  else:
    cosines = np.asarray(ref.image_orientation).reshape(2, 3)
    thickness = slice_spacing_mm if math.isfinite(slice_spacing_mm) else 1.0
    step = np.cross(cosines[0], cosines[1]) * thickness
  affine = export.dicom_affine(ref.image_position, ref.image_orientation, ref.pixel_spacing,
                               step)
  return affine, order, 'dicom'


def _finite_or_none(x: Any) -> Any:
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(float(x)) else None
  return x


def describe_window(data_config: ml_collections.ConfigDict) -> str:
  """The network's window in words, for warnings."""
  if data_config.resize_mode == data_lib.ROI_MODE:
    return f'the {data_config.roi_mm:g} mm window around the LV (data.resize_mode=roi)'
  return (f'the central {data_config.image_size}-pixel window '
          f'(data.resize_mode={data_config.resize_mode})')


def summarize_series(series: Series, predictions: Sequence[Prediction],
                     config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Areas per frame and (with slice/phase information) volumes, ED/ES, SV, EF."""
  frames = [p.frame for p in predictions]
  notes = list(series.warnings)
  areas = frame_areas(predictions, config.predict.areas)
  pred_areas = areas['cavity']
  poly_areas = expert_areas(frames, 'polygon')
  mask_areas = expert_areas(frames, 'mask')
  rows = []
  for p, area, epi, myo, share, e_poly, e_mask in zip(
      predictions, pred_areas, areas['epicardium'], areas['myocardium'], areas['coverage'],
      poly_areas, mask_areas):
    f = p.frame
    rows.append(dict(
        frame_id=f.frame_id, instance=f.instance, slice_index=f.slice_index,
        phase_index=f.phase_index, slice_location=f.slice_location,
        trigger_time_ms=f.trigger_time, area_mm2=area, epi_area_mm2=epi,
        myocardium_area_mm2=myo, myocardial_coverage=share, expert_area_mm2=e_poly,
        expert_mask_area_mm2=e_mask,
        dice=metrics.dice(p.mask, f.mask) if f.mask is not None else None,
        epi_dice=(metrics.dice(p.epi_mask, f.epi_mask)
                  if f.epi_mask is not None and p.epi_mask is not None else None),
        detected=bool(p.mask.any()), source_path=f.source_path))
  summary: dict[str, Any] = dict(
      series=series.name, case=series.case, kind=series.kind, folder=series.folder,
      expert_dir=series.expert_dir, num_frames=len(frames),
      image_shapes=sorted({f'{f.shape[0]}x{f.shape[1]}' for f in frames}),
      pixel_spacing_mm=sorted({tuple(f.pixel_spacing) for f in frames}),
      spacing_source=sorted({f.spacing_source for f in frames}),
      postprocessing=dict(largest_component=bool(config.predict.largest_component),
                          fill_holes=bool(config.predict.fill_holes)),
      areas=config.predict.areas, contour_inset_px=float(config.data.mask_outset_px),
      tta=tta_mode(config.predict),
      frames=rows)
  cut = [p.frame.frame_id for p in predictions if p.cut_by_window]
  if cut:
    notes.append(f'{len(cut)} frame(s) ({", ".join(cut[:5])}{", ..." if len(cut) > 5 else ""}): '
                 f'the LV reaches the edge of {describe_window(config.data)} the model sees, so '
                 'part of it may lie outside; check the overlays')
    logging.warning('%s: %s', series.name or series.folder, notes[-1])
  if not has_grid(frames):
    notes.append('frames have no slice/phase information: areas per frame only, no volumes')
    summary.update(num_slices=None, num_phases=None, volumes=None, expert=None,
                   volumes_missing='the frames have no slice/phase information')
    summary['warnings'] = notes
    return summary
  spacing, spacing_source, spacing_notes = slice_spacing(
      frames, float(config.predict.slice_spacing_mm))
  notes += spacing_notes
  grid = area_grid_from(frames, pred_areas)
  num_slices, num_phases = grid.shape
  missing = int(np.isnan(grid).sum())
  if missing:
    notes.append(f'{missing} of {grid.size} slice/phase cells have no frame (slices with '
                 'different phase counts?); phases missing a slice get no total volume')
  summary.update(num_slices=num_slices, num_phases=num_phases, slice_spacing_mm=spacing,
                 slice_spacing_source=spacing_source, areas_mm2=grid.tolist())
  phase_times = []
  for t in range(num_phases):
    times = [f.trigger_time for f in frames if f.phase_index == t and f.trigger_time is not None]
    phase_times.append(float(np.median(times)) if times else None)
  summary['phase_trigger_time_ms'] = phase_times
  volumes, missing_reason = None, 'no spacing between slices in the input'
  summary.update(lv_mass_g=None, myocardial_volume_ml=None, excluded=[])
  if math.isfinite(spacing):
    try:
      measured = series_measurements(frames, areas, spacing, config)
    except ValueError as e:
      notes.append(f'volumes not computed: {e}')
      missing_reason = str(e)
    else:
      volumes = measured['volumes']
      at = {(f.slice_index, f.phase_index): row for f, row in zip(frames, rows)}
      for item in measured['excluded']:
        row = at[(item['slice'], item['phase'])]
        row['excluded'] = f"{item['part']}: {item['reason']}"
        summary['excluded'].append(dict(item, frame_id=row['frame_id']))
      summary.update(lv_mass_g=measured.get('lv_mass_g'),
                     myocardial_volume_ml=measured.get('myocardial_volume_ml'),
                     base_first=measured['base_first'])
  summary['volumes'] = volumes
  summary['volumes_missing'] = None if volumes is not None else missing_reason
  expert = expert_volumes(frames, spacing) if math.isfinite(spacing) else {}
  if expert:
    expert['areas_mm2'] = area_grid_from(frames, poly_areas).tolist()
    phase = expert.get('phase') or expert.get('phase_mask')
    if volumes is not None and phase and phase.get('es_phase') is not None:
      # The prediction at the expert's ED/ES phases separates volume error from phase choice.
      ed, es = phase['ed_phase'], phase['es_phase']
      edv, esv = volumes['volumes_ml'][ed], volumes['volumes_ml'][es]
      if edv is not None and esv is not None:
        expert['predicted_at_expert_phases'] = dict(
            ed_phase=ed, es_phase=es, edv_ml=edv, esv_ml=esv, sv_ml=edv - esv,
            ef_pct=_finite_or_none(clinical.ejection_fraction(edv, esv)))
      # ... and on the expert's slices only, which also removes the effect of basal / apical
      # slices the expert left out (a prediction there adds volume the expert did not count).
      contoured = ~np.all(np.isnan(np.array(expert['areas_mm2'], dtype=np.float64)), axis=1)
      sub = clinical.volumes_per_phase_ml(grid[contoured], spacing)
      edv, esv = float(sub[ed]), float(sub[es])
      expert['predicted_on_expert_slices_and_phases'] = dict(
          ed_phase=ed, es_phase=es, num_slices=int(contoured.sum()), edv_ml=edv, esv_ml=esv,
          sv_ml=edv - esv, ef_pct=_finite_or_none(clinical.ejection_fraction(edv, esv)))
  summary['expert'] = expert or None
  summary['warnings'] = notes
  return summary
