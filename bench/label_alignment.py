"""Do the expert masks line up with their images? A check through a trained model's predictions.

For every evaluation frame the trained model's (post-processed) mask is compared with the
expert mask: the offset between their centroids, their Dice, and the Dice after the best
whole-pixel shift of the expert mask (up to `--max-shift` pixels). A case whose expert masks
sit several pixels from where a model that never saw the case puts the cavity, while the other
cases agree to a pixel or two, points to masks displaced from their images. That is how
docs/RESULTS.md found SC-N-06's masks in the PNG copy displaced by about 11 px.

  python bench/label_alignment.py --workdir=runs/ibu                      # validation cases
  python bench/label_alignment.py --workdir=runs/ibu --sets=validation --flag-px=4 --json=a.json
"""

import argparse
import json
import os
import sys

import numpy as np
from scipy import ndimage
from scipy import signal

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)


def shift_search(expert: np.ndarray, predicted: np.ndarray, max_shift: int
                 ) -> tuple[int, int, float]:
  """(dy, dx, Dice) of the whole-pixel shift of `expert` that best overlaps `predicted`."""
  # overlap[dy, dx] = sum(expert shifted by (dy, dx) & predicted), for every shift at once.
  overlap = signal.correlate(predicted.astype(np.float64), expert.astype(np.float64),
                             mode='full', method='fft')
  cy, cx = expert.shape[0] - 1, expert.shape[1] - 1  # index of the zero shift
  window = np.rint(overlap[cy - max_shift:cy + max_shift + 1, cx - max_shift:cx + max_shift + 1])
  dy, dx = np.unravel_index(np.argmax(window), window.shape)
  dice = 2.0 * window[dy, dx] / (expert.sum() + predicted.sum())
  return int(dy) - max_shift, int(dx) - max_shift, float(dice)


def frame_alignment(expert: np.ndarray, predicted: np.ndarray, max_shift: int) -> dict | None:
  """Offsets (pixels, predicted minus expert) and Dice of one frame; None if a mask is empty."""
  expert, predicted = expert > 0, predicted > 0
  if not expert.any() or not predicted.any():
    return None
  ey, ex = ndimage.center_of_mass(expert)
  py, px = ndimage.center_of_mass(predicted)
  dice = 2.0 * (expert & predicted).sum() / (expert.sum() + predicted.sum())
  dy, dx, shifted = shift_search(expert, predicted, max_shift)
  return {'centroid_dy': float(py - ey), 'centroid_dx': float(px - ex), 'dice': float(dice),
          'best_shift': [dy, dx], 'dice_best_shift': shifted}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True, help='a trained run (its best checkpoint)')
  p.add_argument('--sets', default='validation', help='official sets, comma separated')
  p.add_argument('--data-root', default='', help='default: the run\'s config.data.root')
  p.add_argument('--max-shift', type=int, default=20)
  p.add_argument('--flag-px', type=float, default=4.0,
                 help='flag cases whose median centroid offset exceeds this (pixels)')
  p.add_argument('--json', default='')
  args = p.parse_args(argv)

  from lvseg_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from lvseg_jax import data  # pylint: disable=g-import-not-at-top
  from lvseg_jax import models  # pylint: disable=g-import-not-at-top
  from lvseg_jax import predict  # pylint: disable=g-import-not-at-top
  checkpointing.quiet_orbax_logging()
  config, variables = checkpointing.load_for_inference(args.workdir, 'best')
  if args.data_root:
    config.data.root = args.data_root
  config.predict = {**predict.PREDICT_DEFAULTS, 'progress': False}
  cases = sorted({c for s in args.sets.split(',') for c in data.get_official_set(s.strip())})
  frames = data.load_frames(config.data, cases)
  predictions = predict.predict_frames(models.get_model(config.model), variables, frames,
                                       config)
  per_case: dict[str, list[dict]] = {}
  undetected: dict[str, int] = {}
  for pred in predictions:
    row = frame_alignment(pred.frame.mask, pred.mask, args.max_shift)
    if row is None:
      undetected[pred.frame.case] = undetected.get(pred.frame.case, 0) + 1
      continue
    per_case.setdefault(pred.frame.case, []).append({'frame_id': pred.frame.frame_id, **row})

  print(f"{'case':12s} {'frames':>6s} {'median offset dy, dx (px)':>26s} "
        f"{'Dice':>6s} {'after shift':>11s}")
  summary = {}
  for case, rows in per_case.items():
    med = {k: float(np.median([r[k] for r in rows]))
           for k in ('centroid_dy', 'centroid_dx', 'dice', 'dice_best_shift')}
    offset = float(np.hypot(med['centroid_dy'], med['centroid_dx']))
    flagged = offset > args.flag_px
    summary[case] = {**med, 'median_offset_px': offset, 'frames': len(rows),
                     'undetected': undetected.get(case, 0), 'flagged': flagged, 'rows': rows}
    print(f"{case:12s} {len(rows):6d} {med['centroid_dy']:12.1f}, {med['centroid_dx']:5.1f}"
          f"        {med['dice']:6.3f} {med['dice_best_shift']:11.3f}"
          + ('   <- displaced?' if flagged else ''))
  if undetected:
    print(f'frames without a predicted mask (not compared): {undetected}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'workdir': args.workdir, 'sets': args.sets, 'cases': summary}, f, indent=1)


if __name__ == '__main__':
  main()
