"""Challenge-protocol aggregates of per-frame metrics, and the results files.

`evaluate(records)` scores each frame with `metrics.evaluate_frame`, then per case and per set.

Undetected frames (empty prediction) have APD/MCD/HD95 undefined (NaN, `null` in JSON) and are
never good. They enter the aggregates as follows:
  * `detected_pct`, `good_pct`: counted in the denominator (all frames with an expert contour), as
    the challenge did.
  * `dice_good`, `apd_good_mm` (the challenge's averages over good contours): excluded.
  * `dice_all` (mean Dice over every frame): included with their Dice of 0.
  * `apd_detected_mm`, `mcd_detected_mm`, `hd95_detected_mm`: excluded (undefined).

Set level: `mean_std_over_cases` is the challenge's convention (mean and sample std, ddof=1 as in
MATLAB, of the per-case values; a case whose value is NaN, e.g. no good contour, is skipped and `n`
says how many cases entered). `per_image` pools all frames, as most deep-learning papers report.
"""

from __future__ import annotations

import collections
import json
import math
import os
from typing import Any, Sequence

import numpy as np

from lvseg_jax import metrics
from lvseg_jax.metrics import GOOD_APD_MM

_CASE_METRICS = ('detected_pct', 'good_pct', 'dice_good', 'apd_good_mm', 'dice_all',
                 'apd_detected_mm', 'mcd_detected_mm', 'hd95_detected_mm')
_METRIC_LABELS = {
    'detected_pct': 'detected %',
    'good_pct': 'good %',
    'dice_good': 'Dice (good)',
    'apd_good_mm': 'APD mm (good)',
    'dice_all': 'Dice (all)',
    'apd_detected_mm': 'APD mm (detected)',
    'mcd_detected_mm': 'MCD mm (detected)',
    'hd95_detected_mm': 'HD95 mm (detected)',
}
_RECORD_KEYS = ('case', 'frame_id', 'pred_mask', 'expert_mask', 'pixel_spacing')


def finite(values: Sequence[Any]) -> np.ndarray:
  """The finite values as float64 (None, NaN and inf dropped)."""
  v = np.asarray([np.nan if x is None else float(x) for x in values], dtype=np.float64)
  return v[np.isfinite(v)]


def mean_std(values: Sequence[Any]) -> dict[str, float | int]:
  """{'mean', 'std' (ddof=1, as MATLAB), 'n'} of the finite values; NaN where undefined."""
  v = finite(values)
  return {'mean': float(v.mean()) if v.size else math.nan,
          'std': float(v.std(ddof=1)) if v.size > 1 else math.nan, 'n': int(v.size)}


def _frame_group_metrics(frames: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  """Per-frame metric values, each restricted to the frames it is defined over."""
  good = [f for f in frames if f['good']]
  detected = [f for f in frames if f['detected']]
  return {
      'dice_good': np.array([f['dice'] for f in good]),
      'apd_good_mm': np.array([f['apd_mm'] for f in good]),
      'dice_all': np.array([f['dice'] for f in frames]),
      'apd_detected_mm': np.array([f['apd_mm'] for f in detected]),
      'mcd_detected_mm': np.array([f['mcd_mm'] for f in detected]),
      'hd95_detected_mm': np.array([f['hd95_mm'] for f in detected]),
  }


def _counts(frames: list[dict[str, Any]]) -> dict[str, Any]:
  """Frames, detected and good frames of a group, as counts and percentages of the group."""
  n = len(frames)
  n_det = sum(f['detected'] for f in frames)
  n_good = sum(f['good'] for f in frames)
  return {'n_frames': n, 'n_detected': n_det, 'n_good': n_good,
          'detected_pct': 100.0 * n_det / n, 'good_pct': 100.0 * n_good / n}


def evaluate(records: Sequence[dict[str, Any]], good_apd_mm: float = GOOD_APD_MM
             ) -> dict[str, Any]:
  """Challenge-style evaluation of a set of frames.

  Args:
    records: one dict per expert-contoured frame with keys case, frame_id, pred_mask,
      expert_mask, pixel_spacing, and optional spacing_source (default 'dicom'),
      expert_contour and pred_contour (default: the outline of pred_mask).
    good_apd_mm: APD threshold of a good contour (challenge: 5 mm).

  Returns:
    {'good_apd_mm', 'per_frame': [...], 'per_case': {case: {...}},
     'per_set': {'mean_std_over_cases': {...}, 'per_image': {...}}, 'spacing_sources': {...}}.
    per_case values: n_frames, n_detected, n_good, detected_pct, good_pct, dice_good and
    apd_good_mm (means over good contours), dice_all (mean over all frames), and
    apd/mcd/hd95 _detected_mm (means over detected frames); NaN where no frame qualifies.
    mean_std_over_cases: {metric: {mean, std, n}} over the per-case values (std ddof=1).
    per_image: the same metrics pooled over all frames ({mean, std, n}; detected_pct and
    good_pct as pooled percentages).
  """
  if not records:
    raise ValueError('evaluate() needs at least one record')
  per_frame = []
  by_case: dict[str, list[dict[str, Any]]] = collections.OrderedDict()
  for k, r in enumerate(records):
    missing = [key for key in _RECORD_KEYS if key not in r]
    if missing:
      raise ValueError(f'record {k} lacks {missing}; required: {list(_RECORD_KEYS)}')
    frame = {'case': str(r['case']), 'frame_id': str(r['frame_id'])}
    frame.update(metrics.evaluate_frame(r['pred_mask'], r['expert_mask'], r['pixel_spacing'],
                                        expert_contour=r.get('expert_contour'),
                                        spacing_source=r.get('spacing_source', 'dicom'),
                                        good_apd_mm=good_apd_mm,
                                        auto_contour=r.get('pred_contour')))
    per_frame.append(frame)
    by_case.setdefault(frame['case'], []).append(frame)

  per_case = {}
  for case, frames in by_case.items():
    entry = _counts(frames)
    entry.update({k: mean_std(v)['mean'] for k, v in _frame_group_metrics(frames).items()})
    per_case[case] = entry

  over_cases: dict[str, Any] = {'n_cases': len(per_case)}
  for metric in _CASE_METRICS:
    over_cases[metric] = mean_std([c[metric] for c in per_case.values()])

  per_image = _counts(per_frame)
  per_image.update({k: mean_std(v) for k, v in _frame_group_metrics(per_frame).items()})

  return {
      'good_apd_mm': float(good_apd_mm),
      'per_frame': per_frame,
      'per_case': per_case,
      'per_set': {'mean_std_over_cases': over_cases, 'per_image': per_image},
      'spacing_sources': dict(collections.Counter(f['spacing_source'] for f in per_frame)),
  }


# ----------------------------------------------------------------------------------------------
# Output


def to_jsonable(x: Any) -> Any:
  """Plain JSON types; NaN/inf become null (strict JSON has no NaN)."""
  if isinstance(x, dict):
    return {str(k): to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return to_jsonable(x.tolist())
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(x) else None
  return x


def _fmt(metric: str, value: float | None) -> str:
  if value is None or not math.isfinite(value):
    return 'n/a'
  if metric.endswith('_pct'):
    return f'{value:.1f}'
  if metric.startswith('dice'):
    return f'{value:.3f}'
  return f'{value:.2f}'


def _fmt_ms(metric: str, ms: dict[str, Any]) -> str:
  mean, std = ms['mean'], ms['std']
  if mean is None or not math.isfinite(mean):
    return 'n/a'
  std_s = _fmt(metric, std) if std is not None and math.isfinite(std) else 'n/a'
  return f"{_fmt(metric, mean)} ± {std_s} (n={ms['n']})"


def results_markdown(results: dict[str, Any], name: str = 'results') -> str:
  """Markdown report: per-case table, then the set summary in both conventions."""
  thr = results['good_apd_mm']
  lines = [
      f'# {name}', '',
      f'Sunnybrook 2009 protocol (Radau et al. 2009): a good contour has APD < {thr:g} mm. '
      'Dice (good) and APD (good) average over good contours only; Dice (all) averages every '
      'frame, undetected ones as 0; APD/MCD/HD95 (detected) average over detected frames.', '',
      '## Per case', '',
      '| case | frames | ' + ' | '.join(_METRIC_LABELS[m] for m in _CASE_METRICS) + ' |',
      '|---|---:|' + '---:|' * len(_CASE_METRICS),
  ]
  for case, c in results['per_case'].items():
    cells = [_fmt(m, c[m]) for m in _CASE_METRICS]
    lines.append(f"| {case} | {c['n_frames']} | " + ' | '.join(cells) + ' |')
  over = results['per_set']['mean_std_over_cases']
  img = results['per_set']['per_image']
  lines += [
      '', '## Set summary', '',
      f"| metric | mean ± std over cases ({over['n_cases']} cases; challenge convention) "
      f"| per-image mean ± std ({img['n_frames']} frames; pooled) |",
      '|---|---:|---:|',
  ]
  for m in _CASE_METRICS:
    if m.endswith('_pct'):
      pooled = f'{_fmt(m, img[m])} (pooled)'
    else:
      pooled = _fmt_ms(m, img[m])
    lines.append(f'| {_METRIC_LABELS[m]} | {_fmt_ms(m, over[m])} | {pooled} |')
  sources = ', '.join(f'{k}: {v}' for k, v in sorted(results['spacing_sources'].items()))
  lines += ['', f'Pixel spacing sources (frames): {sources}.', '']
  return '\n'.join(lines)


def write_results(results: dict[str, Any], workdir: str, name: str) -> dict[str, str]:
  """Writes `workdir/<name>.json` (NaN as null) and `workdir/<name>.md`.

  Returns:
    {'json': path, 'markdown': path}.
  """
  os.makedirs(workdir, exist_ok=True)
  clean = to_jsonable(results)
  json_path = os.path.join(workdir, f'{name}.json')
  md_path = os.path.join(workdir, f'{name}.md')
  with open(json_path, 'w') as f:
    json.dump(clean, f, indent=2, allow_nan=False)
  markdown = results_markdown(clean, name)
  if 'epicardium' in clean:
    markdown = (results_markdown(clean, f'{name}: endocardium') + '\n'
                + results_markdown(clean['epicardium'], f'{name}: epicardium'))
  with open(md_path, 'w') as f:
    f.write(markdown)
  return {'json': json_path, 'markdown': md_path}
