"""Output files of a predicted series: masks, contours, overlays, uncertainty, NIfTI volumes,
frames.csv, volumes.csv, the volume curve and summary.json; and the top-level summary."""

import collections
from concurrent import futures
import csv
import json
import math
import os
import threading
from typing import Any, Iterable, Sequence

import ml_collections
import numpy as np

import lvseg_jax
from lvseg_jax import data as data_lib
from lvseg_jax import export
from lvseg_jax import results as results_lib
from lvseg_jax.predict import measure
from lvseg_jax.predict.inference import Prediction
from lvseg_jax.predict.inputs import Series, warn


def _nifti_stack(frames: Sequence[data_lib.Frame], arrays: Sequence[np.ndarray],
                 order: Sequence[int], dtype) -> np.ndarray:
  """(S, T, H, W) stack in NIfTI slice order (missing cells zero), or (N, H, W) without grid."""
  height, width = frames[0].shape
  if not measure.has_grid(frames):
    return np.stack([np.asarray(a, dtype) for a in arrays])
  num_slices, num_phases = measure.grid_shape(frames)
  stack = np.zeros((num_slices, num_phases, height, width), dtype)
  position = {s: k for k, s in enumerate(order)}
  for f, a in zip(frames, arrays):
    stack[position[f.slice_index], f.phase_index] = a
  return stack


def label_map(p: Prediction) -> np.ndarray:
  """(H, W) uint8 labels of a prediction: 0 background, 1 LV cavity, 2 LV myocardium."""
  labels = np.asarray(p.mask, np.uint8).copy()
  if p.epi_mask is not None:
    labels[p.myocardium] = data_lib.MYOCARDIUM
  return labels


def _image_dtype(frames: Sequence[data_lib.Frame]):
  """int16 when the intensities are integers in range (MR raw data), else float32."""
  integral = all(np.array_equal(f.image, np.round(f.image)) for f in frames)
  low, high = min(f.image.min() for f in frames), max(f.image.max() for f in frames)
  return np.int16 if integral and -32768 <= low and high <= 32767 else np.float32


def write_nifti_volumes(series: Series, predictions: Sequence[Prediction], folder: str,
                        summary: dict[str, Any], with_image: bool) -> dict[str, str]:
  """`<series>_mask.nii.gz` (+ `_image.nii.gz`); returns the paths written."""
  frames = [p.frame for p in predictions]
  if len({f.shape for f in frames}) > 1:
    warn(summary['warnings'], '%s: frames of different sizes; no NIfTI volume written',
          series.name)
    return {}
  spacing = summary.get('slice_spacing_mm', float('nan'))
  spacing = float(spacing) if spacing is not None else float('nan')
  affine, order, kind = measure.series_affine(frames, spacing)
  if kind == 'nominal':
    warn(summary['warnings'], '%s: no DICOM geometry; the NIfTI affine holds the pixel spacing '
          'only (axis-aligned%s)', series.name,
          '' if measure.has_grid(frames) else ', third axis = frame number')
  times = [t for t in (summary.get('phase_trigger_time_ms') or []) if t is not None]
  time_step = float(np.median(np.diff(times))) if len(times) > 1 else None
  summary['nifti'] = dict(affine=np.round(affine, 6).tolist(), slice_order=order,
                          geometry=kind, axes='column, row, slice' +
                          (', phase' if measure.has_grid(frames) else ''),
                          labels={'1': 'LV cavity', '2': 'LV myocardium'})
  paths = {}
  mask_path = os.path.join(folder, f'{series.name}_mask.nii.gz')
  export.write_nifti(mask_path, export.to_nifti_order(
      _nifti_stack(frames, [label_map(p) for p in predictions], order, np.uint8)), affine,
                   time_step)
  paths['nifti_mask'] = mask_path
  if with_image:
    image_path = os.path.join(folder, f'{series.name}_image.nii.gz')
    dtype = _image_dtype(frames)
    export.write_nifti(image_path, export.to_nifti_order(
        _nifti_stack(frames, [f.image for f in frames], order, dtype)), affine, time_step)
    paths['nifti_image'] = image_path
  return paths


def write_dicom_segs(series: Series, predictions: Sequence[Prediction], folder: str,
                     summary: dict[str, Any], config: ml_collections.ConfigDict
                     ) -> dict[str, Any]:
  """`dicom_seg/phaseTT.dcm`: one DICOM SEG per phase, one series for the cine (DICOM input
  only); returns what was written."""
  if series.kind != 'dicom':
    warn(summary['warnings'], '%s: not a DICOM series; no DICOM SEG written', series.name)
    return {}
  from lvseg_jax import dicom_seg  # pylint: disable=g-import-not-at-top  # highdicom on demand
  import highdicom as hd  # pylint: disable=g-import-not-at-top
  by_phase = collections.defaultdict(list)
  for p in predictions:
    by_phase[p.frame.phase_index or 0].append(p)
  series_uid, notes, files = hd.UID(), set(), []
  for number, (phase, group) in enumerate(sorted(by_phase.items()), start=1):
    group.sort(key=lambda p: (p.frame.slice_index or 0, p.frame.instance))
    path = os.path.join(folder, 'dicom_seg', f'phase{phase:02d}.dcm')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    notes.update(dicom_seg.write_dicom_seg(
        path, [p.frame.source_path for p in group], [label_map(p) for p in group],
        int(config.model.num_classes), series_uid, number,
        f'{config.model.name}-{config.model.num_classes}class', lvseg_jax.__version__))
    files.append(os.path.relpath(path, folder))
  if notes:
    warn(summary['warnings'], '%s: DICOM SEG: source attributes the SEG cannot take were fixed '
         'in its copy: %s', series.name, ', '.join(sorted(notes)[:6]))
  return {'dicom_seg': dict(folder='dicom_seg', count=len(files), series_uid=str(series_uid))}


FRAME_COLUMNS = ('frame_id', 'instance', 'slice_index', 'phase_index', 'slice_location',
                 'trigger_time_ms', 'area_mm2', 'epi_area_mm2', 'myocardium_area_mm2',
                 'myocardial_coverage', 'expert_area_mm2', 'expert_mask_area_mm2', 'dice',
                 'epi_dice', 'detected', 'is_ed', 'is_es', 'excluded')

SERIES_COLUMNS = ('series', 'case', 'num_frames', 'num_slices', 'num_phases',
                  'slice_spacing_mm', 'ed_phase', 'es_phase', 'edv_ml', 'esv_ml', 'sv_ml',
                  'ef_pct', 'lv_mass_g', 'myocardial_volume_ml', 'num_excluded',
                  'expert_edv_ml', 'expert_esv_ml', 'expert_ef_pct',
                  'expert_phase_edv_ml', 'expert_phase_esv_ml', 'expert_phase_ef_pct',
                  'num_warnings', 'note')


def fmt(value: Any) -> str:
  if value is None:
    return ''
  if isinstance(value, bool):
    return str(int(value))
  if isinstance(value, (float, np.floating)):
    return '' if not math.isfinite(float(value)) else f'{float(value):.4f}'.rstrip('0').rstrip('.')
  return str(value)


def one_decimal(value: float | None, missing: str = '-') -> str:
  """A measurement for people (a figure title, a log line): one decimal; the CSV and JSON
  files keep four (`fmt`)."""
  return missing if value is None or not math.isfinite(value) else f'{value:.1f}'


def _write_csv(path: str, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f, lineterminator='\n')
    writer.writerow(columns)
    for row in rows:
      writer.writerow([fmt(row.get(c)) for c in columns])


def series_row(summary: dict[str, Any]) -> dict[str, Any]:
  """One line of the top-level summary.csv."""
  volumes = summary.get('volumes') or {}
  expert = summary.get('expert') or {}
  extrema = expert.get('slice_extrema') or {}
  phase = expert.get('phase') or {}
  return dict(
      series=summary['series'], case=summary['case'], num_frames=summary['num_frames'],
      num_slices=summary.get('num_slices'), num_phases=summary.get('num_phases'),
      slice_spacing_mm=summary.get('slice_spacing_mm'), ed_phase=volumes.get('ed_phase'),
      es_phase=volumes.get('es_phase'), edv_ml=volumes.get('edv_ml'),
      esv_ml=volumes.get('esv_ml'), sv_ml=volumes.get('sv_ml'), ef_pct=volumes.get('ef_pct'),
      lv_mass_g=summary.get('lv_mass_g'), myocardial_volume_ml=summary.get('myocardial_volume_ml'),
      num_excluded=len(summary.get('excluded') or []),
      expert_edv_ml=extrema.get('edv_ml'), expert_esv_ml=extrema.get('esv_ml'),
      expert_ef_pct=extrema.get('ef_pct'), expert_phase_edv_ml=phase.get('edv_ml'),
      expert_phase_esv_ml=phase.get('esv_ml'), expert_phase_ef_pct=phase.get('ef_pct'),
      num_warnings=len(summary.get('warnings', [])),
      note=(f"no volumes: {summary['volumes_missing']}" if summary.get('volumes_missing')
            else ''))


def _write_frame_files(p: Prediction, row: dict[str, Any], folder: str,
                       config: ml_collections.ConfigDict,
                       overlay_writer: export.OverlayWriter) -> collections.Counter:
  """The per-frame files of one prediction (mask, contours, overlay, uncertainty); records the
  contour files in `row`; returns how many files of each kind it wrote."""
  f, counts = p.frame, collections.Counter()
  if config.predict.save_masks:
    export.write_mask_png(os.path.join(folder, 'masks', f'{f.frame_id}.png'), p.mask,
                          p.myocardium)
    counts['masks'] += 1
  if config.predict.save_contours:
    for kind, contour in (('i', p.contour), ('o', p.epi_contour)):
      path = (export.write_auto_contour(os.path.join(folder, 'contours'), f.instance, contour,
                                        kind) if contour is not None else None)
      row[f'auto_{kind}contour'] = os.path.relpath(path, folder) if path else None
      counts['contours'] += path is not None
  if config.predict.save_overlays:
    label = [f.frame_id]
    if f.slice_index is not None:
      label.append(f'slice {f.slice_index} phase {f.phase_index}')
    label.append('ED' if row['is_ed'] else 'ES' if row['is_es'] else '')
    overlay_writer.write(os.path.join(folder, 'overlays', f'{f.frame_id}.png'), f.image,
                         p.contour, export.expert_outline(f),
                         title='  '.join(s for s in label if s), pred_epi=p.epi_contour,
                         expert_epi=export.expert_outline(f, epicardium=True))
    counts['overlays'] += 1
  if p.uncertainty is not None:
    export.write_uncertainty_png(os.path.join(folder, 'uncertainty', f'{f.frame_id}.png'),
                                 p.uncertainty)
    counts['uncertainty'] += 1
  return counts


def write_series_outputs(series: Series, predictions: Sequence[Prediction],
                         summary: dict[str, Any], output: str,
                         config: ml_collections.ConfigDict) -> None:
  """Writes every output of one series under `output/<series.name>/`.

  Adds to `summary` (from `measure.summarize_series`) what was written and each frame's ED/ES
  flags, and saves it as the series' summary.json. The per-frame files are written by
  `config.predict.write_workers` threads (PNG and gzip encoding release the GIL).
  """
  folder = os.path.join(output, series.name)
  os.makedirs(folder, exist_ok=True)
  volumes = summary.get('volumes') or {}
  ed, es = volumes.get('ed_phase'), volumes.get('es_phase')
  outputs: dict[str, Any] = {}
  for p, row in zip(predictions, summary['frames']):
    row['is_ed'] = ed is not None and p.frame.phase_index == ed
    row['is_es'] = es is not None and p.frame.phase_index == es
  local = threading.local()   # one overlay writer per thread (its font is not shared)

  def write_frame(p: Prediction, row: dict[str, Any]) -> collections.Counter:
    if not hasattr(local, 'overlay_writer'):
      local.overlay_writer = export.OverlayWriter()
    return _write_frame_files(p, row, folder, config, local.overlay_writer)

  workers = int(config.predict.write_workers) or os.cpu_count() or 1
  counts = collections.Counter()
  with futures.ThreadPoolExecutor(max_workers=workers) as pool:
    # The volumes (gzip, the longest single job) go first, beside the per-frame files.
    nifti = (pool.submit(write_nifti_volumes, series, predictions, folder, summary,
                         bool(config.predict.nifti_image)) if config.predict.save_nifti else None)
    for done in pool.map(write_frame, predictions, summary['frames']):
      counts.update(done)
    if nifti is not None:
      outputs.update(nifti.result())
  for kind in ('masks', 'contours', 'overlays', 'uncertainty'):
    if counts[kind] or kind in ('masks', 'contours', 'overlays') and config.predict[f'save_{kind}']:
      outputs[kind] = dict(folder=kind, count=counts[kind])
  if config.predict.save_dicom_seg:
    outputs.update(write_dicom_segs(series, predictions, folder, summary, config))
  _write_csv(os.path.join(folder, 'frames.csv'), FRAME_COLUMNS, summary['frames'])
  outputs['frames_csv'] = 'frames.csv'
  if summary.get('areas_mm2') is not None and volumes:
    expert = summary.get('expert') or {}
    expert_phase = expert.get('phase') or {}
    rows = [dict(phase_index=t, trigger_time_ms=summary['phase_trigger_time_ms'][t],
                 volume_ml=v, expert_volume_ml=(expert_phase.get('volumes_ml') or [None] *
                                                (t + 1))[t],
                 is_ed=t == ed, is_es=t == es)
            for t, v in enumerate(volumes['volumes_ml'])]
    _write_csv(os.path.join(folder, 'volumes.csv'), ('phase_index', 'trigger_time_ms',
                                                     'volume_ml', 'expert_volume_ml', 'is_ed',
                                                     'is_es'), rows)
    outputs['volumes_csv'] = 'volumes.csv'
    title = (f"{series.name}: EDV {one_decimal(volumes['edv_ml'])} mL, ESV "
             f"{one_decimal(volumes['esv_ml'])} mL, EF {one_decimal(volumes['ef_pct'])} %")
    export.write_volume_curve_png(
        os.path.join(folder, 'volume_curve.png'), volumes['volumes_ml'],
        [r['expert_volume_ml'] for r in rows], ed, es, title=title)
    outputs['volume_curve'] = 'volume_curve.png'
  outputs = {k: (os.path.relpath(v, folder) if isinstance(v, str) and os.path.isabs(v) else v)
             for k, v in outputs.items()}
  summary['outputs'] = outputs
  with open(os.path.join(folder, 'summary.json'), 'w') as f:
    json.dump(results_lib.to_jsonable(summary), f, indent=1)


def write_index(output: str, summaries: Sequence[dict[str, Any]], meta: dict[str, Any],
                skipped: Sequence[tuple[str, str]] = ()) -> None:
  """The top-level summary.csv (one row per series, then one per skipped file) and
  summary.json (with `skipped`: every input file left out, and why)."""
  rows = [series_row(s) for s in summaries]
  rows += [dict(note=f'skipped {path}: {problem}') for path, problem in skipped]
  _write_csv(os.path.join(output, 'summary.csv'), SERIES_COLUMNS, rows)
  index = dict(meta, series=[{k: v for k, v in s.items() if k not in ('frames', 'areas_mm2')}
                             for s in summaries],
               skipped=[{'path': path, 'problem': problem} for path, problem in skipped])
  with open(os.path.join(output, 'summary.json'), 'w') as f:
    json.dump(results_lib.to_jsonable(index), f, indent=1)
