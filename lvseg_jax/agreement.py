"""Agreement of the predicted clinical measurements with the expert's, under cross-validation.

For a folder of k-fold training runs (`ablate.py ... --folds=...`), every case with expert
contours at ED and ES on all its slices is measured by the fold that held it out, never by a
model that saw it:

  * PNG copy (all development cases): slice = (NNNN-1)//20, phase = (NNNN-1)%20, nominal pixel
    and slice spacing, so volumes and mass are compared in % and EF in points;
  * DICOM cases: the same on their contoured frames, with the DICOM spacing, in mL and g.

Expert areas are the areas inside the expert masks' outlines moved in by the masks' outset
(`data.mask_outset_px`), the rule the predictions follow; on the 96 DICOM contours that is within
0.2% of the expert polygons' own areas on average (docs/RESULTS.md). Both sides use the same
frames; the predictions go through the slice rules of `clinical.lv_measurements`.

Reported per quantity: bias (mean difference), 95% limits of agreement (bias +- 1.96 SD),
Pearson correlation, and a Bland-Altman plot; and where the volume differences arise, the cavity
area bias per third of the slices at ED and ES (`area_bias_by_level`). On the same held-out
frames, the masks and sub-pixel contours predict writes (post-processed) are scored by the
challenge protocol (`contour_accuracy`), beside `--mode=evaluate`'s outlines of the raw argmax
masks.
"""

import dataclasses
import glob
import json
import math
import os
from typing import Any, Sequence

from absl import logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import ml_collections
import numpy as np

from lvseg_jax import checkpointing
from lvseg_jax import clinical
from lvseg_jax import contours as contours_lib
from lvseg_jax import data as data_lib
from lvseg_jax import metrics
from lvseg_jax import models
from lvseg_jax import results as results_lib
from lvseg_jax.predict import inference
from lvseg_jax.predict import measure
from lvseg_jax.predict import roi

# Nominal spacing between slices of the PNG copy (no headers): cancels in every % and EF.
NOMINAL_SLICE_SPACING_MM = 10.0
QUANTITIES = (('edv_ml', 'EDV', '%'), ('esv_ml', 'ESV', '%'), ('ef_pct', 'EF', 'points'),
              ('lv_mass_g', 'LV mass', '%'))
AREA_LEVELS = ('basal', 'middle', 'apical')


def expert_area_mm2(mask: np.ndarray | None, spacing: Sequence[float], inset_px: float
                    ) -> float | None:
  """Area inside an expert mask's outline moved in by `inset_px`; None without a mask."""
  if mask is None:
    return None
  outline = metrics.mask_to_contour(mask)
  if len(outline) < 3:
    return 0.0
  return clinical.polygon_area_mm2(contours_lib.offset_inward(outline, inset_px), spacing)


def _with_grid(frames: Sequence[data_lib.Frame]) -> list[data_lib.Frame]:
  """The PNG copy's frames with slice and phase from the frame number (the data README)."""
  return [f if f.slice_index is not None else
          dataclasses.replace(f, slice_index=(f.instance - 1) // 20,
                              phase_index=(f.instance - 1) % 20) for f in frames]


def measure_case(frames: Sequence[data_lib.Frame],
                 predictions: Sequence[inference.Prediction], spacing_mm: float,
                 config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Expert and predicted EDV/ESV/EF (and LV mass) of one case on the same frames.

  Returns:
    {'expert': {...}, 'predicted': {...}, 'excluded': [...]} or {'skipped': reason}.
  """
  inset = float(config.data.mask_outset_px)
  cavity = [expert_area_mm2(f.mask, f.pixel_spacing, inset) for f in frames]
  epi = [expert_area_mm2(f.epi_mask, f.pixel_spacing, inset) for f in frames]
  expert_grid = measure.area_grid_from(frames, cavity)
  try:
    expert = clinical.lv_volumes(expert_grid, spacing_mm).to_dict()
  except ValueError as e:
    return {'skipped': f'expert volumes: {e}'}
  if expert['es_phase'] is None:
    return {'skipped': 'the expert contoured different slices at ED and ES (needs both on '
                       'every slice)'}
  ed = expert['ed_phase']
  epi_grid = measure.area_grid_from(frames, epi)
  used = ~np.isnan(expert_grid[:, ed])
  if np.all(~np.isnan(epi_grid[used, ed])):
    myo = np.clip(epi_grid[used, ed] - expert_grid[used, ed], 0, None)
    expert['lv_mass_g'] = (clinical.MYOCARDIAL_DENSITY_G_PER_ML * float(np.sum(myo))
                           * spacing_mm / clinical.MM3_PER_ML)
  areas = measure.frame_areas(predictions, config.predict.areas)
  measured = measure.series_measurements(frames, areas, spacing_mm, config)
  predicted = dict(measured['volumes'])
  if 'lv_mass_g' in measured:
    predicted['lv_mass_g'] = measured['lv_mass_g']
  predicted_grid = measure.area_grid_from(frames, areas['cavity'])
  cavity_areas = {}   # per contoured slice, in slice order: [expert, predicted] mm^2
  for name, t in (('ed', ed), ('es', expert['es_phase'])):
    rows = np.flatnonzero(~np.isnan(expert_grid[:, t]))
    cavity_areas[name] = [[float(expert_grid[s, t]), float(np.nan_to_num(predicted_grid[s, t]))]
                          for s in rows]
  return {'expert': expert, 'predicted': predicted, 'excluded': measured['excluded'],
          'cavity_areas': cavity_areas}


def contour_records(frames: Sequence[data_lib.Frame],
                    predictions: Sequence[inference.Prediction], inset_px: float
                    ) -> dict[str, list[dict[str, Any]]]:
  """`results.evaluate` records of the masks and sub-pixel contours predict writes, per
  contour kind. The expert contour is the polygon where there is one, else the expert mask's
  outline moved in by the masks' outset: the convention the predicted contours follow."""
  out: dict[str, list[dict[str, Any]]] = {'endocardium': [], 'epicardium': []}
  for f, p in zip(frames, predictions):
    for kind, expert_mask, polygon, mask, contour in (
        ('endocardium', f.mask, f.contour, p.mask, p.contour),
        ('epicardium', f.epi_mask, f.epi_contour, p.epi_mask, p.epi_contour)):
      if expert_mask is None or mask is None:
        continue
      expert = polygon if polygon is not None else contours_lib.offset_inward(
          metrics.mask_to_contour(expert_mask), inset_px)
      out[kind].append(dict(case=f.case, frame_id=f.frame_id, pixel_spacing=f.pixel_spacing,
                            spacing_source=f.spacing_source, pred_mask=mask,
                            expert_mask=expert_mask, expert_contour=expert,
                            pred_contour=contour))
  return out


def contour_accuracy(records_by_run: dict[str, dict[str, list[dict[str, Any]]]]
                     ) -> dict[str, Any]:
  """Challenge figures of predict's contours for each contour kind: per fold run (the
  `evaluate.headline` numbers of its cases), mean and SD over the folds, and over all
  held-out cases. Each frame is scored once (`results.evaluate` on all of them)."""
  out: dict[str, Any] = {}
  for kind in ('endocardium', 'epicardium'):
    runs = {run: {r['case'] for r in records[kind]} for run, records in records_by_run.items()
            if records[kind]}
    if not runs:
      continue
    pooled = results_lib.evaluate([r for records in records_by_run.values()
                                   for r in records[kind]])
    per_case = pooled['per_case']
    folds = {}
    for run, cases in runs.items():
      folds[run] = {'dice': results_lib.mean_std([f['dice'] for f in pooled['per_frame']
                                                  if f['case'] in cases])['mean']}
      for key, metric in (('good_pct', 'good_pct'), ('apd_mm', 'apd_good_mm'),
                          ('dice_good', 'dice_good')):
        folds[run][key] = results_lib.mean_std([per_case[c][metric] for c in cases])['mean']
    out[kind] = {
        'per_fold': folds,
        'over_folds': {k: results_lib.mean_std([f[k] for f in folds.values()])
                       for k in ('dice', 'good_pct', 'apd_mm', 'dice_good')},
        'over_cases': {k: pooled['per_set']['mean_std_over_cases'][k]
                       for k in ('good_pct', 'apd_good_mm', 'dice_good', 'dice_all')},
        'per_image_dice': pooled['per_set']['per_image']['dice_all']}
  return out


def _fold_runs(cv_dir: str) -> list[str]:
  runs = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(cv_dir, '**', 'split.json'),
                                                      recursive=True))
  if not runs:
    raise FileNotFoundError(f'{cv_dir}: no training runs (no */split.json)')
  return runs


def held_out_cases(cv_dir: str) -> dict[str, str]:
  """case -> the run that held it out; each case is held out by exactly one run."""
  owner: dict[str, str] = {}
  for run in _fold_runs(cv_dir):
    with open(os.path.join(run, 'split.json')) as f:
      split = json.load(f)
    if split['split'] != 'kfold':
      raise ValueError(f'{run}: split {split["split"]!r}, not a k-fold run')
    leaked = set(split['eval_cases']) & set(split['train_cases'])
    if leaked:
      raise ValueError(f'{run}: cases both trained on and evaluated: {sorted(leaked)}')
    for case in split['eval_cases']:
      if case in owner:
        raise ValueError(f'{case} is held out by both {owner[case]} and {run}')
      owner[case] = run
  return owner


def train_cases(run: str) -> set[str]:
  """The cases a training run trained on (its split.json)."""
  with open(os.path.join(run, 'split.json')) as f:
    return set(json.load(f)['train_cases'])


def held_out_groups(cv_dirs: Sequence[str]) -> dict[tuple[str, ...], list[str]]:
  """(one run per folder) -> the cases those runs held out, for folders of the same folds.

  Several folders make a same-fold ensemble: a case is measured by the runs of every folder
  that held it out, so those runs must have trained on the same cases.
  """
  owners = [held_out_cases(d) for d in cv_dirs]
  for d, owner in zip(cv_dirs[1:], owners[1:]):
    if set(owner) != set(owners[0]):
      raise ValueError(f'{d} and {cv_dirs[0]} hold out different cases: not the same folds')
  groups: dict[tuple[str, ...], list[str]] = {}
  for case in sorted(owners[0]):
    groups.setdefault(tuple(owner[case] for owner in owners), []).append(case)
  for runs in groups:
    trained_on = [train_cases(run) for run in runs]
    if any(t != trained_on[0] for t in trained_on[1:]):
      raise ValueError(f'{", ".join(runs)}: trained on different cases, so not one fold')
  return groups


def _load_group(runs: Sequence[str], checkpoint: str, tta: str
                ) -> tuple[ml_collections.ConfigDict, Any]:
  """(config, variables) of the `checkpoint` of `runs`: one run's variables, or a list of them
  (an ensemble), with `tta` set in the config."""
  loaded = [checkpointing.load_for_inference(run, checkpoint) for run in runs]
  config = loaded[0][0]
  for run, (other, _) in zip(runs[1:], loaded[1:]):
    if checkpointing.trained_fields(other) != checkpointing.trained_fields(config):
      raise ValueError(f'{run} and {runs[0]}: different models or preprocessing '
                       '(checkpointing.TRAINED_FIELDS); an ensemble needs one model')
  config.predict.tta = tta != 'none'
  config.predict.tta_transforms = tta
  config.predict.progress = False
  return config, [v for _, v in loaded] if len(loaded) > 1 else loaded[0][1]


def fold_localizers(groups: dict[tuple[str, ...], list[str]],
                    configs: dict[tuple[str, ...], ml_collections.ConfigDict],
                    localizer_dir: str | None, checkpoint: str
                    ) -> dict[tuple[str, ...], roi.Localizer | None]:
  """The localizer of each group of 'roi' fold runs (None for other runs): the run of the k-fold
  folder `localizer_dir` that held out the same cases, trained on the same ones; without that
  folder, the runs' own `data.roi_localizer`, if its split.json shows it never trained on the
  held-out cases (a shipped model trained on all of them)."""
  owner = held_out_cases(localizer_dir) if localizer_dir else {}
  out = {}
  for runs, cases in groups.items():
    config = configs[runs]
    if config.data.resize_mode != data_lib.ROI_MODE:
      out[runs] = None
      continue
    if localizer_dir:
      found = {owner.get(case) for case in cases}
      run = found.pop() if len(found) == 1 else None
      if run is None or train_cases(run) != train_cases(runs[0]):
        raise ValueError(f'{localizer_dir}: no run of it held out exactly the cases of '
                         f'{runs[0]} ({", ".join(cases)}): not the same folds')
    else:
      run = roi.resolve(config.data.roi_localizer)
      seen = (train_cases(run) & set(cases) if os.path.exists(os.path.join(run, 'split.json'))
              else {'(no split.json: unknown)'})
      if seen:
        raise ValueError(f'{runs[0]}: its localizer {run} trained on held-out cases '
                         f'{sorted(seen)}; give --localizer=<a k-fold folder of the same folds>')
    out[runs] = roi.Localizer(run, config, checkpoint)
  return out


def _measure_with(runs: Sequence[str], config: ml_collections.ConfigDict, variables: Any,
                  cases: Sequence[str], source: str, localizer: roi.Localizer | None = None
                  ) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
  """Measures `cases` with the model of `runs` (`_load_group`) on the `source` copy of the
  data (a 'roi' model's windows where `localizer` finds the LV); also returns the
  `contour_records` of their frames."""
  data_config = ml_collections.ConfigDict(config.data.to_dict())
  data_config.source = source
  data_config.cache_dir = ''
  frames = data_lib.load_frames(data_config, cases=list(cases))
  model = models.get_model(config.model)
  # One compiled forward pass for all the cases (every batch is padded to one shape).
  forward_fn = inference.make_forward_fn(model, inference.tta_mode(config.predict))
  out, records = {}, {'endocardium': [], 'epicardium': []}
  for case in cases:
    case_frames = _with_grid([f for f in frames if f.case == case])
    if not case_frames:
      continue
    if source == 'dicom':
      spacing, _, _ = measure.slice_spacing(case_frames)
    else:
      spacing = NOMINAL_SLICE_SPACING_MM
    predictions = inference.predict_frames(
        model, variables, case_frames, config, forward_fn=forward_fn, desc=case,
        centres=localizer.centres(case_frames) if localizer else None)
    out[case] = dict(measure_case(case_frames, predictions, spacing, config), run=runs[0],
                     runs=list(runs), source=source, slice_spacing_mm=spacing,
                     frames=len(case_frames))
    for kind, kind_records in contour_records(case_frames, predictions,
                                              float(config.data.mask_outset_px)).items():
      records[kind] += kind_records
    logging.info('%s (%s, %s): %s', case, source, os.path.basename(runs[0]),
                 out[case].get('skipped') or 'measured')
  return out, records


def agreement_stats(predicted: Sequence[float], expert: Sequence[float], relative: bool
                    ) -> dict[str, float | int]:
  """Bias, SD and 95% limits of agreement of the differences (in % of the expert's value when
  `relative`), and Pearson's r of the two."""
  p, e = np.asarray(predicted, np.float64), np.asarray(expert, np.float64)
  diff = 100.0 * (p - e) / e if relative else p - e
  n = len(diff)
  bias = float(diff.mean()) if n else math.nan
  sd = float(diff.std(ddof=1)) if n > 1 else math.nan
  r = float(np.corrcoef(p, e)[0, 1]) if n > 2 else math.nan
  return {'n': n, 'bias': bias, 'sd': sd, 'loa_low': bias - 1.96 * sd,
          'loa_high': bias + 1.96 * sd, 'r': r}


def _table(cases: dict[str, dict[str, Any]], relative_volumes: bool) -> dict[str, Any]:
  stats, points = {}, {}
  for key, _, _ in QUANTITIES:
    pairs = [(c['predicted'][key], c['expert'][key]) for c in cases.values()
             if 'expert' in c and c['expert'].get(key) is not None
             and c['predicted'].get(key) is not None]
    relative = relative_volumes and key != 'ef_pct'
    stats[key] = agreement_stats([p for p, _ in pairs], [e for _, e in pairs], relative)
    stats[key]['unit'] = ('%' if relative else 'points' if key == 'ef_pct' else
                          'mL' if key.endswith('_ml') else 'g')
    points[key] = pairs
  return {'stats': stats, 'points': points, 'area_bias': area_bias_by_level(cases)}


def area_bias_by_level(cases: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """Where the volume differences come from: per phase ('ed', 'es'), the predicted cavity area
  summed over each third of a case's contoured slices ('basal', 'middle', 'apical' in slice
  order, base to apex in the SCD; `np.array_split`, so a remainder goes to the basal end) and
  over 'all' of them, in % of the expert's sum; mean and SD over the cases."""
  diffs: dict[str, dict[str, list[float]]] = {}
  for c in cases.values():
    for phase, pairs in c.get('cavity_areas', {}).items():
      pairs = np.asarray(pairs, np.float64).reshape(-1, 2)
      for level, part in (*zip(AREA_LEVELS, np.array_split(pairs, 3)), ('all', pairs)):
        expert, predicted = part.sum(axis=0)
        if len(part) and expert > 0:
          diffs.setdefault(phase, {}).setdefault(level, []).append(
              100.0 * (predicted - expert) / expert)
  return {phase: {level: results_lib.mean_std(v) for level, v in by_level.items()}
          for phase, by_level in diffs.items()}


def bland_altman_png(path: str, table: dict[str, Any], title: str) -> None:
  """One Bland-Altman panel per quantity: difference against mean, bias and 95% limits."""
  fig = Figure(figsize=(4 * len(QUANTITIES), 3.6))
  FigureCanvasAgg(fig)
  for ax, (key, label, _) in zip(fig.subplots(1, len(QUANTITIES)), QUANTITIES):
    s, pairs = table['stats'][key], table['points'][key]
    if not pairs:
      ax.set_axis_off()
      continue
    p, e = np.array(pairs).T
    diff = 100 * (p - e) / e if s['unit'] == '%' else p - e
    ax.scatter((p + e) / 2, diff, s=14)
    for y, style in ((s['bias'], '-'), (s['loa_low'], '--'), (s['loa_high'], '--')):
      if math.isfinite(y):
        ax.axhline(y, color='k', linestyle=style, linewidth=0.8)
    ax.axhline(0, color='grey', linewidth=0.5)
    ax.set_title(f"{label}: bias {s['bias']:+.1f} {s['unit']}, n={s['n']}", fontsize=9)
    ax.set_xlabel('mean of predicted and expert')
    ax.set_ylabel(f"predicted - expert ({s['unit']})")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def _markdown(result: dict[str, Any]) -> str:
  lines = ['# Agreement with the expert (cross-validation, each case by the fold that held it '
           f"out; the {result['checkpoint']} checkpoint of each fold; test-time augmentation: "
           f"{result['tta']})", '']
  if len(result['cv_dir']) > 1:
    lines += ['Each case by the ensemble of its fold runs in: '
              + ', '.join(f'`{d}`' for d in result['cv_dir']), '']
  for name, label in (('png', 'PNG copy, nominal spacing (volumes and mass in %)'),
                      ('dicom', 'DICOM cases, their own spacing (mL, g)')):
    table = result[name]
    lines += [f'## {label}', '', '| quantity | n | bias | 95% limits of agreement | r |',
              '|---|---:|---:|---:|---:|']
    for key, title, _ in QUANTITIES:
      s = table['stats'][key]
      if not s['n']:
        continue
      lines.append(f"| {title} ({s['unit']}) | {s['n']} | {s['bias']:+.2f} | "
                   f"{s['loa_low']:+.2f} to {s['loa_high']:+.2f} | {s['r']:.3f} |")
    lines += ['', '| case | fold run | EDV exp/pred | ESV exp/pred | EF exp/pred | '
              'mass exp/pred | excluded cells |', '|---|---|---:|---:|---:|---:|---:|']
    for case, c in sorted(result['cases'][name].items()):
      if 'skipped' in c:
        lines.append(f"| {case} | {os.path.basename(c['run'])} | skipped: {c['skipped']} "
                     '| | | | |')
        continue
      cells = []
      for key, _, _ in QUANTITIES:
        e, p = c['expert'].get(key), c['predicted'].get(key)
        cells.append('-' if e is None or p is None else f'{e:.1f} / {p:.1f}')
      lines.append(f"| {case} | {os.path.basename(c['run'])} | " + ' | '.join(cells)
                   + f" | {len(c['excluded'])} |")
    lines.append('')
    if table['area_bias']:
      lines += ['Cavity area, predicted against expert, in % of the expert\'s area summed over '
                'each third of the contoured slices (slice order, base to apex in the SCD): '
                'mean ± SD over the cases.', '',
                '| phase | ' + ' | '.join(f'{level} third' for level in AREA_LEVELS)
                + ' | all slices |', '|---|' + '---:|' * (len(AREA_LEVELS) + 1)]
      for phase, by_level in table['area_bias'].items():
        lines.append(f'| {phase.upper()} | ' + ' | '.join(
            f"{by_level[k]['mean']:+.1f} ± {by_level[k]['std']:.1f} (n={by_level[k]['n']})"
            if k in by_level else '-' for k in (*AREA_LEVELS, 'all')) + ' |')
      lines.append('')
  lines += ['## The contours predict writes (largest component, holes filled, sub-pixel), '
            'challenge protocol on the held-out frames', '',
            'Mean ± SD over the fold runs of their mean over cases (Dice per image: over '
            'frames); then over all held-out cases. Expert: the polygon (DICOM), else the mask '
            'outline moved in by the masks\' outset (PNG).', '',
            '| data | contour | Dice per image | good % | APD over good (mm) | Dice over good | '
            'over cases: good % / APD / Dice |', '|---|---|---:|---:|---:|---:|---:|']
  for source, kinds in result.get('contours', {}).items():
    for kind, c in kinds.items():
      f, o = c['over_folds'], c['over_cases']
      lines.append(
          f"| {source} ({len(c['per_fold'])} folds) | {kind} | "
          f"{f['dice']['mean']:.3f} ± {f['dice']['std']:.3f} | "
          f"{f['good_pct']['mean']:.1f} ± {f['good_pct']['std']:.1f} | "
          f"{f['apd_mm']['mean']:.2f} ± {f['apd_mm']['std']:.2f} | "
          f"{f['dice_good']['mean']:.3f} ± {f['dice_good']['std']:.3f} | "
          f"{o['good_pct']['mean']:.1f} / {o['apd_good_mm']['mean']:.2f} / "
          f"{o['dice_good']['mean']:.3f} ({o['good_pct']['n']} cases) |")
  lines.append('')
  return '\n'.join(lines)


def run_agreement(cv_dir: str | Sequence[str], output: str | None = None,
                  checkpoint: str = 'latest', tta: str = 'none',
                  localizer: str | None = None) -> dict[str, Any]:
  """Measures every held-out case of a k-fold folder; writes agreement.{json,md,png}.

  Args:
    cv_dir: the folder of the fold runs (each with split.json and checkpoints), or several
      folders of the same folds: each case is then measured by the ensemble of the runs that
      held it out.
    output: where to write (default `cv_dir`; required for several folders).
    checkpoint: 'latest' (each fold's final model: nothing chosen on the held-out cases) or
      'best' (the checkpoint with the best Dice on them, an optimistic choice).
    tta: test-time augmentation, a key of `inference.TTA_TRANSFORMS` ('none': one pass); only
      for fold models trained with flips.
    localizer: for resize_mode 'roi' fold runs, a k-fold folder of the same folds whose runs
      find the LV (`fold_localizers`).
  """
  cv_dirs = [cv_dir] if isinstance(cv_dir, str) else list(cv_dir)
  if tta not in inference.TTA_TRANSFORMS:
    raise ValueError(f'Unknown tta {tta!r}; choices: {sorted(inference.TTA_TRANSFORMS)}')
  if len(cv_dirs) > 1 and not output:
    raise ValueError('An ensemble of several k-fold folders needs an output folder')
  output = output or cv_dirs[0]
  groups = held_out_groups(cv_dirs)
  for run in sorted({run for runs in groups for run in runs}):
    unseen = inference.unseen_tta(checkpointing.load_config(run).augment, tta)
    if unseen:   # predict only warns; here a figure would be reported, so refuse it up front
      raise ValueError(f'{run}: tta={tta!r}, but {unseen}')
  loaded = {runs: _load_group(runs, checkpoint, tta) for runs in groups}  # once for both copies
  localizers = fold_localizers(groups, {runs: c for runs, (c, _) in loaded.items()}, localizer,
                               checkpoint)
  result: dict[str, Any] = {'cv_dir': [os.path.abspath(d) for d in cv_dirs],
                            'checkpoint': checkpoint, 'tta': tta, 'cases': {},
                            'localizer': localizer and os.path.abspath(localizer)}
  result['contours'] = {}
  for source in ('png', 'dicom'):
    cases: dict[str, dict[str, Any]] = {}
    records = {}
    for runs, mine in groups.items():
      try:
        measured, records[os.path.basename(runs[0])] = _measure_with(
            runs, *loaded[runs], mine, source, localizers[runs])
      except data_lib.DataError as e:   # e.g. no DICOM copy of any of these cases
        logging.info('%s (%s): %s', ', '.join(runs), source, e)
        continue
      cases.update(measured)
    result['cases'][source] = cases
    result[source] = _table(cases, relative_volumes=(source == 'png'))
    result['contours'][source] = contour_accuracy(records)
  os.makedirs(output, exist_ok=True)
  with open(os.path.join(output, 'agreement.json'), 'w') as f:
    json.dump(results_lib.to_jsonable(result), f, indent=1)
  with open(os.path.join(output, 'agreement.md'), 'w') as f:
    f.write(_markdown(result))
  png = result['cases']['png']
  measured = sum('expert' in c for c in png.values())
  bland_altman_png(os.path.join(output, 'agreement_bland_altman.png'), result['png'],
                   f'Predicted vs expert: {measured} of {len(png)} held-out cases (PNG copy; '
                   'the others lack expert contours at ED and ES on some slice)')
  return result
