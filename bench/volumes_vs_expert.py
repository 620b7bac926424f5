"""Predicted vs expert LV volumes and ejection fraction on the full-cine DICOM cases of the SCD.

  python bench/volumes_vs_expert.py --workdir=runs/<k-fold folder>  # each case by its fold
  python bench/volumes_vs_expert.py --workdir=runs/<trained run> --tta=flips --checkpoint=best
  python bench/volumes_vs_expert.py --random_tiny_workdir=/tmp/tiny   # pipeline check only

Runs `lvseg_jax.predict` on the staged cases with a complete cine (all slices x 20 phases:
SC-HF-I-01, -04, -05, -06; see the data README), with their expert contours, writes every
prediction output under --output, prints a markdown comparison and (for a trained workdir)
replaces the block between the `volumes-vs-expert` markers of docs/RESULTS.md. --workdir is
one trained run (or a shipped model's folder), or a folder of k-fold runs (as `ablate.py`
writes them): each case is then predicted by the fold model that held it out.

Expert volumes: the data README's definition (shoelace areas x SpacingBetweenSlices, per-slice
larger / smaller contour = ED / ES) and the phase definition on the rasterized expert masks (the
area definition the predictions use). Predicted volumes: the phase definition (ED / ES = phases
with the largest / smallest total volume over all 20 phases), and the prediction at the expert's
ED / ES phases.
"""

import argparse
import json
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402

FULL_CINE_CASES = ('SC-HF-I-01', 'SC-HF-I-04', 'SC-HF-I-05', 'SC-HF-I-06')
BEGIN = '<!-- volumes-vs-expert:begin -->'
END = '<!-- volumes-vs-expert:end -->'
SECTION = '## Volumes and ejection fraction'


def make_random_tiny_workdir(workdir: str) -> None:
  """A workdir with a randomly initialized tiny IBU-Net (width 4, depth 2, 64 px): tests the
  pipeline end to end; its volumes mean nothing."""
  import jax  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  from lvseg_jax import checkpointing, models  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.model.name, config.model.base_width, config.model.depth = 'ibu', 4, 2
  config.data.image_size = 64
  model = models.get_model(config.model)
  variables = jax.jit(lambda key: models.init_variables(model, key, 64))(jax.random.key(0))
  checkpointing.save_config(config, workdir)
  manager = checkpointing.Checkpointer(workdir)
  variables, meta = jax.device_get(variables), {'step': 1, 'note': 'random init'}
  manager.save_best(1, variables, 0.0, meta)
  manager.save_latest(1, variables, meta)   # either --checkpoint finds it
  manager.close()


def case_series_folders(data_root: str, cases) -> dict:
  """case -> its SCD id folder (found through the patient sheet)."""
  import glob  # pylint: disable=g-import-not-at-top
  from lvseg_jax import data  # pylint: disable=g-import-not-at-top
  sheet = data.read_patient_sheet(os.path.join(data_root, 'scd_patientdata.csv'))
  by_case = {case: scd_id for scd_id, case in sheet.items()}
  folders = {}
  for case in cases:
    found = glob.glob(os.path.join(data_root, 'SCD_IMAGES_*', by_case.get(case, '?')))
    if not found:
      raise SystemExit(f'{case}: no DICOM folder under {data_root}/SCD_IMAGES_*')
    folders[case] = found[0]
  return folders


def models_for_cases(workdir: str, cases) -> dict:
  """run -> {case: whether that run trained on it (None: unknown)} for the `cases`.

  A k-fold folder gives each case the fold run that held it out; a single run (or shipped
  model) gives it every case, seen or not by its split.json, else by its official sets.
  """
  from lvseg_jax import agreement, checkpointing, data  # pylint: disable=g-import-not-at-top
  if not os.path.exists(os.path.join(workdir, checkpointing.CONFIG_FILE)):
    owner = agreement.held_out_cases(workdir)
    missing = [c for c in cases if c not in owner]
    if missing:
      raise SystemExit(f'{workdir}: no fold run holds out {missing}')
    runs = {}
    for case in cases:
      runs.setdefault(owner[case], {})[case] = False
    return runs
  if os.path.exists(os.path.join(workdir, 'split.json')):
    trained = agreement.train_cases(workdir)
    return {workdir: {case: case in trained for case in cases}}
  config = checkpointing.load_config(workdir)
  if config.data.split != 'official':
    return {workdir: {case: None for case in cases}}
  every_case = [c for cases in data.OFFICIAL_SETS.values() for c in cases]
  trained = set(data.case_splits(config.data, available=every_case)['train'])
  return {workdir: {case: case in trained for case in cases}}


_SEEN = {True: 'yes', False: 'no', None: '?'}


def _f(x, digits=1):
  return '–' if x is None or not np.isfinite(x) else f'{x:.{digits}f}'


def _d(a, b, digits=1):
  if a is None or b is None or not np.isfinite(a) or not np.isfinite(b):
    return '–'
  return f'{a - b:+.{digits}f}'


def comparison_rows(summaries, seen: dict) -> list:
  """One row per series; `seen`: case -> whether its model trained on it."""
  rows = []
  for s in summaries:
    expert = s.get('expert') or {}
    readme = expert.get('slice_extrema') or {}
    masks = expert.get('phase_mask') or {}
    pred = s.get('volumes') or {}
    at = expert.get('predicted_at_expert_phases') or {}
    on = expert.get('predicted_on_expert_slices_and_phases') or {}
    dice = [r['dice'] for r in s['frames'] if r.get('dice') is not None]
    rows.append(dict(
        case=s['case'], seen=seen[s['case']], phases=s.get('num_phases'),
        slices=s.get('num_slices'),
        expert_edv=readme.get('edv_ml'), expert_esv=readme.get('esv_ml'),
        expert_ef=readme.get('ef_pct'),
        mask_edv=masks.get('edv_ml'), mask_esv=masks.get('esv_ml'), mask_ef=masks.get('ef_pct'),
        expert_ed=masks.get('ed_phase'), expert_es=masks.get('es_phase'),
        pred_edv=pred.get('edv_ml'), pred_esv=pred.get('esv_ml'), pred_ef=pred.get('ef_pct'),
        pred_ed=pred.get('ed_phase'), pred_es=pred.get('es_phase'),
        at_edv=at.get('edv_ml'), at_esv=at.get('esv_ml'), at_ef=at.get('ef_pct'),
        on_edv=on.get('edv_ml'), on_esv=on.get('esv_ml'), on_ef=on.get('ef_pct'),
        on_slices=on.get('num_slices'),
        dice=float(np.mean(dice)) if dice else None, num_dice=len(dice)))
  return rows


def markdown(rows, meta: dict) -> str:
  lines = [
      f"Model: {meta['workdir']} ({meta['checkpoint']} checkpoint; "
      f"{meta['model']}, TTA {meta['tta']}). Generated by `{meta['command']}` on "
      f"{meta['date']}.",
      '',
      'Predicted (phase definition, all 20 phases) vs expert (data README definition: '
      'shoelace areas, per-slice max/min). Δ = predicted − expert. "seen": whether the model '
      'that predicted the case trained on it; only unseen cases measure generalization.',
      '',
      '| case | seen | EDV expert | EDV pred | ΔEDV | ESV expert | ESV pred | ΔESV '
      '| EF expert | EF pred | ΔEF | ED/ES phase expert → pred | mean Dice (n) |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    lines.append(
        f"| {r['case']} | {_SEEN[r['seen']]} | {_f(r['expert_edv'])} | {_f(r['pred_edv'])} | "
        f"{_d(r['pred_edv'], r['expert_edv'])} | {_f(r['expert_esv'])} | {_f(r['pred_esv'])} | "
        f"{_d(r['pred_esv'], r['expert_esv'])} | {_f(r['expert_ef'])} | {_f(r['pred_ef'])} | "
        f"{_d(r['pred_ef'], r['expert_ef'])} | {r['expert_ed']}/{r['expert_es']} → "
        f"{r['pred_ed']}/{r['pred_es']} | {_f(r['dice'], 3)} ({r['num_dice']}) |")
  for split in ('all', 'unseen'):
    chosen = [r for r in rows if split == 'all' or r['seen'] is False]
    if not chosen or (split == 'unseen' and len(chosen) == len(rows)):
      continue
    def mae(a, b):
      vals = [abs(r[a] - r[b]) for r in chosen if r[a] is not None and r[b] is not None]
      return float(np.mean(vals)) if vals else None
    lines.append(
        f"| mean \\|Δ\\| ({split}, {len(chosen)}) | | | | {_f(mae('pred_edv', 'expert_edv'))} "
        f"| | | {_f(mae('pred_esv', 'expert_esv'))} | | | {_f(mae('pred_ef', 'expert_ef'))} "
        '| | |')
  lines += [
      '',
      'Same predictions against the expert *masks* (phase definition on the rasterized '
      'contours: the area definition the model is trained on and the predictions use, 5-7% '
      'larger than shoelace areas). "at expert phases": the predicted volumes read at the '
      "expert's ED/ES phases (removes the phase-choice error). \"expert slices\": also summed "
      'over the slices the expert contoured only (removes predictions on basal/apical slices '
      'the expert left out).',
      '',
      '| case | EDV / ESV / EF mask expert | pred, Δ | at expert phases, Δ '
      '| at expert phases, expert slices (n), Δ |',
      '|---|---|---|---|---|',
  ]

  def triple(edv, esv, ef):
    return f'{_f(edv)} / {_f(esv)} / {_f(ef)}'

  def deltas(edv, esv, ef, r):
    return (f"{_d(edv, r['mask_edv'])} / {_d(esv, r['mask_esv'])} / "
            f"{_d(ef, r['mask_ef'])}")

  for r in rows:
    lines.append(
        f"| {r['case']} | {triple(r['mask_edv'], r['mask_esv'], r['mask_ef'])} | "
        f"{deltas(r['pred_edv'], r['pred_esv'], r['pred_ef'], r)} | "
        f"{deltas(r['at_edv'], r['at_esv'], r['at_ef'], r)} | "
        f"({r['on_slices']}) {deltas(r['on_edv'], r['on_esv'], r['on_ef'], r)} |")
  return '\n'.join(lines) + '\n'


def write_results(path: str, block: str) -> None:
  """Replaces the marked block of the "Volumes and ejection fraction" section (other sections,
  written by others, are left alone); adds the section if it is missing."""
  text = open(path).read() if os.path.exists(path) else '# Results\n'
  new_block = f'{BEGIN}\n{block}{END}'
  if BEGIN in text and END in text:
    head, rest = text.split(BEGIN, 1)
    text = head + new_block + rest.split(END, 1)[1]
  elif SECTION in text:
    head, rest = text.split(SECTION, 1)
    text = head + SECTION + '\n\n' + new_block + '\n' + rest
  else:
    text = text.rstrip('\n') + f'\n\n{SECTION}\n\n{new_block}\n'
  with open(path, 'w') as f:
    f.write(text)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', help='trained lvseg-jax workdir')
  parser.add_argument('--random_tiny_workdir',
                      help='create a random tiny model here and use it (pipeline check)')
  parser.add_argument('--data_root', default=os.environ.get(
      'LVSEG_DATA_DIR', os.path.join(REPO_ROOT, '..', 'shared', 'data', 'scd')))
  parser.add_argument('--output', default='/tmp/lvseg_volumes_vs_expert')
  parser.add_argument('--checkpoint', default='latest', choices=('best', 'latest'),
                      help="'latest': the final model; 'best' was chosen on the evaluation "
                           'cases (optimistic for them)')
  parser.add_argument('--tta', default='none',
                      help="test-time augmentation: none, lr, flips or d4 (predict's "
                           'tta_transforms; only for models trained with flips)')
  parser.add_argument('--no_overlays', action='store_true')
  parser.add_argument('--cases', default=','.join(FULL_CINE_CASES))
  parser.add_argument('--results', default=None,
                      help='markdown file to update (default docs/RESULTS.md for a trained '
                           'workdir, none for --random_tiny_workdir)')
  args = parser.parse_args(argv)
  if bool(args.workdir) == bool(args.random_tiny_workdir):
    parser.error('give exactly one of --workdir and --random_tiny_workdir')

  from absl import logging  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  from lvseg_jax import checkpointing, models, predict  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)

  workdir = args.workdir
  results = args.results
  if args.random_tiny_workdir:
    workdir = args.random_tiny_workdir
    if not os.path.exists(os.path.join(workdir, checkpointing.CONFIG_FILE)):
      make_random_tiny_workdir(workdir)
  elif results is None:
    results = os.path.join(REPO_ROOT, 'docs', 'RESULTS.md')

  data_root = os.path.abspath(args.data_root)
  config = default.get_config()
  config.predict.checkpoint = args.checkpoint
  config.predict.tta = args.tta != 'none'
  config.predict.tta_transforms = args.tta
  config.predict.save_overlays = not args.no_overlays
  config.predict.contour_dir = os.path.join(data_root, 'SCD_ManualContours')
  cases = [c.strip() for c in args.cases.split(',') if c.strip()]

  if args.tta not in predict.TTA_TRANSFORMS:
    parser.error(f'--tta={args.tta}: choose from {sorted(predict.TTA_TRANSFORMS)}')
  start = time.time()
  folders = case_series_folders(data_root, cases)
  summaries, seen = [], {}
  runs = models_for_cases(workdir, cases)
  for run, run_seen in runs.items():
    trained, variables = checkpointing.load_for_inference(run, args.checkpoint)
    run_config = predict.inference_config(config, trained)
    if run_config.predict.tta:
      unseen = predict.unseen_tta(trained.augment, args.tta)
      if unseen:   # predict only warns; here a figure would be reported
        raise SystemExit(f'{run}: --tta={args.tta}, but {unseen}')
    model = models.get_model(run_config.model)
    series = []
    for case in run_seen:
      series += [s for s in predict.find_series(folders[case], run_config) if s.case == case]
    summaries += predict.run_series(model, variables, series, run_config,
                                    os.path.join(args.output, os.path.basename(run)),
                                    meta=dict(workdir=os.path.abspath(run)))
    seen.update(run_seen)
  incomplete = [s['case'] for s in summaries if (s.get('num_phases') or 0) < 10]
  if incomplete:
    logging.warning('Not full cines (fewer than 10 phases): %s', incomplete)
  rows = comparison_rows(summaries, seen)
  shown = os.path.abspath(workdir)
  if shown.startswith(REPO_ROOT + os.sep):
    shown = os.path.relpath(shown, REPO_ROOT)
  meta = dict(workdir=f'`{shown}`' if len(runs) == 1 else
              f'`{shown}`, each case by the fold model that held it out',
              checkpoint=args.checkpoint,
              model=(f"{run_config.model.name}, width {run_config.model.base_width}, depth "
                     f"{run_config.model.depth}, {run_config.data.image_size} px"),
              tta=args.tta, date=time.strftime('%Y-%m-%d'),
              command='python bench/volumes_vs_expert.py ' + ' '.join(
                  a for a in (argv if argv is not None else sys.argv[1:])))
  block = markdown(rows, meta)
  print(block)
  with open(os.path.join(args.output, 'volumes_vs_expert.json'), 'w') as f:
    json.dump(dict(meta, rows=rows), f, indent=1)
  logging.info('%d series in %.0f s; outputs in %s', len(summaries), time.time() - start,
               args.output)
  if results:
    write_results(results, block)
    logging.info('Updated %s', results)


if __name__ == '__main__':
  main()
