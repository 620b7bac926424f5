"""Ablation grids: train and evaluate every cell of a config grid, then a paper-style table.

A grid maps dotted config keys to the values to try, e.g.

  {'model.name': ['unet', 'lnu', 'ibu'], 'augment.elastic': [True, False], 'seed': [0, 1]}

`expand_grid` turns it into cells (one dict of overrides each), `run_grid` trains and evaluates
the cells one after another with `train.train_and_evaluate` (the same code on CPU, GPU or TPU),
each in `workdir/<cell folder>/`, and `write_report` writes the comparison table
(`results.md`, `results.json`) and a box plot (`boxplot.png`).

Re-running skips finished cells: a cell is finished when its folder holds `DONE` (written after
its evaluation JSON) and the config recorded there matches the cell's config. An interrupted
cell resumes from its latest checkpoint (`train_and_evaluate` does that).

Overrides that cannot change a cell's run are dropped and the identical cells merged (see
`_APPLIES_ONLY_IF`): e.g. `model.ibn_mode` only matters for `model.name='ibu'`, so
{'model.name': ['unet', 'ibu'], 'model.ibn_mode': ['split', 'blend']} gives 3 cells, not 4.

Table columns (per group of cells, aggregated over seeds and folds):
  * Dice, per image: mean ± sample std of the Dice of every evaluated frame of every run
    (undetected frames count as 0), the pooled per-image convention of most papers.
  * Dice, over runs: mean ± std over runs of each run's per-image mean Dice (seed spread).
  * APD (mm), over cases: the 2009 challenge's convention: each case's mean APD over its good
    contours (APD < `eval.good_apd_mm`); mean ± std over the (run, case) pairs.
  * Good contours (%), over cases: each case's percentage of good contours; mean ± std over the
    (run, case) pairs (the challenge's convention).
Standard deviations use ddof=1, like `metrics.evaluate`; 'n/a' where fewer than 2 values (std)
or none (mean) exist, e.g. APD when no contour is good.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import itertools
import json
import math
import os
import re
import time
import traceback
from typing import Any, Mapping, Sequence

from matplotlib.figure import Figure
import ml_collections
import numpy as np
from absl import logging

from lvseg_jax import checkpointing
from lvseg_jax import metrics as metrics_lib
from lvseg_jax import models
from lvseg_jax import train as train_lib

DONE_FILE = 'DONE'
FAILED_FILE = 'FAILED.txt'
GRID_FILE = 'grid.json'

# Keys that only repeat an experiment (aggregated over in the table, never a table column).
REPLICATE_KEYS = ('seed', 'data.fold', 'data.kfold_seed')

# Named grids for `ablate.py --grid=<name>`.
PRESETS: dict[str, dict[str, list[Any]]] = {
    # The paper's comparison: the three models with everything else as in the base config.
    'models': {'model.name': ['unet', 'lnu', 'ibu']},
    # How IBU-Net combines instance and batch norm in its first block (README, Normalization).
    'ibn_modes': {'model.name': ['ibu'], 'model.ibn_mode': ['split', 'sequential', 'blend']},
    # Augmentation components on/off (the intensity component stays as in the base config).
    'augment': {'augment.affine': [True, False], 'augment.elastic': [True, False]},
    # The paper's models plus the common BatchNorm U-Net.
    'models_bn': {'model.name': ['unet', 'lnu', 'ibu'], 'model.norm': ['none', 'batch']},
}

# An override (exact key, or a prefix ending in '.') matters only when another key of the
# effective config has one of the given values; otherwise the cell is merged with the cell
# without that override. Keys are checked against the cell's values, then the base config's.
_APPLIES_ONLY_IF: tuple[tuple[str, str, tuple[Any, ...]], ...] = (
    ('model.ibn_mode', 'model.name', ('ibu',)),
    ('model.ibn_ratio', 'model.name', ('ibu',)),
    ('model.ibn_ratio', 'model.ibn_mode', ('split',)),
    ('model.norm', 'model.name', ('unet',)),
    ('data.fold', 'data.split', ('kfold',)),
    ('data.num_folds', 'data.split', ('kfold',)),
    ('data.kfold_seed', 'data.split', ('kfold',)),
    ('data.kfold_sets', 'data.split', ('kfold',)),
    ('augment.', 'augment.enabled', (True,)),
    ('augment.rotation_deg', 'augment.affine', (True,)),
    ('augment.scale', 'augment.affine', (True,)),
    ('augment.aspect', 'augment.affine', (True,)),
    ('augment.translation_frac', 'augment.affine', (True,)),
    ('augment.flip_lr', 'augment.affine', (True,)),
    ('augment.flip_ud', 'augment.affine', (True,)),
    ('augment.elastic_alpha', 'augment.elastic', (True,)),
    ('augment.elastic_sigma', 'augment.elastic', (True,)),
    ('augment.elastic_prob', 'augment.elastic', (True,)),
    ('augment.elastic_method', 'augment.elastic', (True,)),
    ('augment.reference_size', 'augment.elastic', (True,)),
    ('augment.gamma', 'augment.intensity', (True,)),
    ('augment.contrast', 'augment.intensity', (True,)),
    ('augment.noise_std', 'augment.intensity', (True,)),
)

# Config keys that do not change a run's numbers (where data lives, logging, device layout):
# a finished cell is reused even if these differ, e.g. when the workdir moves to another host.
_RUN_INVARIANT_KEYS = (
    'data.root', 'data.cache_dir', 'train.num_devices', 'train.parallel', 'train.distributed',
    'train.log_every', 'train.halt_after_steps', 'train.checkpoint_every_steps',
    'train.keep_checkpoints', 'train.resume_fallback', 'train.num_overlays', 'eval.batch_size',
    'eval.split',
    'eval.checkpoint', 'predict.')

_MISSING = object()


# ----------------------------------------------------------------------------- cells


def _value_str(value: Any) -> str:
  """A value as it appears in cell names: strings bare, everything else as JSON."""
  if isinstance(value, str):
    return value
  return json.dumps(_plain(value))


def _plain(value: Any) -> Any:
  """JSON-able plain types (tuples become lists, NaN stays a float)."""
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    return float(value)
  return value


def cell_name(overrides: Mapping[str, Any]) -> str:
  """Stable name of a cell: 'key=value' pairs sorted by key, e.g. 'model.name=ibu,seed=0'.

  Sorted so the name (and folder) does not depend on the order of the grid's keys. A cell
  without overrides (the base config) is 'base'.
  """
  if not overrides:
    return 'base'
  return ','.join(f'{k}={_value_str(overrides[k])}' for k in sorted(overrides))


def cell_dirname(overrides: Mapping[str, Any], max_len: int = 120) -> str:
  """Filesystem-safe folder name of a cell: its name with ',' as '__'.

  Characters outside [A-Za-z0-9._=+-] become '_'; when that (or shortening to `max_len`)
  loses information, a hash of the full name is appended so distinct cells never share a folder.
  """
  name = cell_name(overrides)
  safe = '__'.join(re.sub(r'[^A-Za-z0-9._=+-]', '_', p) for p in name.split(','))
  lossless = '__' not in name and safe == name.replace(',', '__')
  if lossless and len(safe) <= max_len:
    return safe
  digest = hashlib.sha1(name.encode()).hexdigest()[:10]
  return f'{safe[:max_len - 11]}-{digest}'


def _lookup(config: ml_collections.ConfigDict | None, key: str) -> Any:
  node: Any = config
  for part in key.split('.'):
    if node is None or not hasattr(node, 'keys') or part not in node:
      return _MISSING
    node = node[part]
  return node


def _applies(key: str, cell: Mapping[str, Any],
             base_config: ml_collections.ConfigDict | None) -> bool:
  """Whether overriding `key` can change the run of `cell` (unknown conditions: yes)."""
  for pattern, condition, allowed in _APPLIES_ONLY_IF:
    matches = key == pattern or (pattern.endswith('.') and key.startswith(pattern)
                                 and key != condition)
    if not matches:
      continue
    value = cell[condition] if condition in cell else _lookup(base_config, condition)
    if value is not _MISSING and value not in allowed:
      return False
  return True


def expand_grid(grid: Mapping[str, Sequence[Any]],
                base_config: ml_collections.ConfigDict | None = None) -> list[dict[str, Any]]:
  """The cells of a grid: the Cartesian product of its values, without redundant cells.

  Args:
    grid: dotted config key -> non-empty list of values, e.g. {'model.name': ['unet', 'ibu'],
      'seed': [0, 1]}. The product runs over the keys in the grid's order (the last key
      varies fastest).
    base_config: used to decide whether an override matters when the cell itself does not
      set the deciding key (e.g. `model.ibn_mode` with `model.name` from the base config).

  Returns:
    One dict of overrides per cell, keys in the grid's order. Overrides that cannot change the
    run (`_APPLIES_ONLY_IF`, e.g. `model.ibn_mode` for a U-Net) are removed and the cells that
    then coincide are kept once (the first), so no identical run happens twice.

  Raises:
    ValueError: a key that is not a string, or a value that is not a non-empty list.
  """
  keys = list(grid)
  for key in keys:
    values = grid[key]
    if not isinstance(key, str) or not key or key.startswith('.') or key.endswith('.'):
      raise ValueError(f'Grid keys are dotted config keys like "model.name"; got {key!r}.')
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
      raise ValueError(f'grid[{key!r}] must be a non-empty list of values; got {values!r}.')
  cells, seen, merged = [], set(), 0
  for combo in itertools.product(*(grid[k] for k in keys)):
    full = dict(zip(keys, combo))
    cell = {k: v for k, v in full.items() if _applies(k, full, base_config)}
    name = cell_name(cell)
    if name in seen:
      merged += 1
      continue
    seen.add(name)
    cells.append(cell)
  if merged:
    logging.info('Grid: %d combinations give %d distinct runs (%d merged: overrides that do '
                 'not apply, e.g. model.ibn_mode for a model other than ibu).',
                 len(cells) + merged, len(cells), merged)
  return cells


def apply_overrides(base_config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `base_config` with dotted-key overrides applied; the base is not changed.

  Lists given for tuple fields (as JSON gives them) become tuples.

  Raises:
    ValueError: unknown keys (all of them, each with its section's valid fields), or a value of
      the wrong type for its field.
  """
  config = copy.deepcopy(base_config)
  unknown, wrong_type = [], []
  for key, value in overrides.items():
    parts = key.split('.')
    section, where = config, 'the config'
    for depth, part in enumerate(parts):
      if not isinstance(section, ml_collections.ConfigDict):
        unknown.append(f'{key!r}: {where} is a field, not a section')
        break
      if part not in section:
        unknown.append(f'{key!r}: {where} has no field {part!r} (valid: '
                       f'{", ".join(sorted(section.keys()))})')
        break
      if depth < len(parts) - 1:
        section, where = section[part], '.'.join(parts[:depth + 1])
        continue
      current = section[part]
      if isinstance(current, ml_collections.ConfigDict):
        wrong_type.append(f'{key!r} is a section, not a field')
      elif isinstance(value, bool) and not isinstance(current, bool) and current is not None:
        # ConfigDict takes True for an int field; a bool seed or size is surely a mistake.
        wrong_type.append(f'{key}={value!r}: the field holds {type(current).__name__}')
      else:
        if isinstance(current, tuple) and isinstance(value, list):
          value = tuple(value)
        try:
          section[part] = value
        except (TypeError, ValueError) as e:
          wrong_type.append(f'{key}={value!r}: {e}')
  problems = []
  if unknown:
    problems.append('unknown config keys: ' + '; '.join(unknown))
  if wrong_type:
    problems.append('bad values: ' + '; '.join(wrong_type))
  if problems:
    raise ValueError('Cannot apply overrides: ' + ' | '.join(problems))
  return config


# ----------------------------------------------------------------------------- running


@dataclasses.dataclass
class CellResult:
  """What happened to one cell of a grid.

  Attributes:
    name: `cell_name(overrides)`.
    overrides: the cell's overrides (keys in the grid's order).
    workdir: the cell's run folder.
    status: 'finished' (trained now), 'skipped' (finished earlier, results loaded), 'failed',
      'planned' (dry run), 'pending' (not reached: the grid stopped on a signal) or
      'interrupted' (stopped by a signal; rerun to resume).
    results: the `metrics.evaluate` results as written to the evaluation JSON (NaN as None),
      for 'finished' and 'skipped' cells.
    error: the traceback of a failed cell.
    seconds: training + evaluation time of a cell trained now (or when it was trained).
  """
  name: str
  overrides: dict[str, Any]
  workdir: str
  status: str
  results: dict[str, Any] | None = None
  error: str | None = None
  seconds: float | None = None

  @property
  def ok(self) -> bool:
    return self.status in ('finished', 'skipped') and self.results is not None


def _flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{'section.field': plain value} without the keys that cannot change a run's numbers."""
  return {k: _plain(v) for k, v in checkpointing.flatten_config(config).items()
          if not any(k == p or (p.endswith('.') and k.startswith(p))
                     for p in _RUN_INVARIANT_KEYS)}


def _eval_name(config: ml_collections.ConfigDict) -> str:
  return 'eval_' + '+'.join(config.data.eval_sets)  # what train.train_and_evaluate writes


def _load_finished(cell_dir: str, config: ml_collections.ConfigDict
                   ) -> tuple[dict[str, Any], float | None] | None:
  """Results of a finished run in `cell_dir`, or None if it has not finished.

  Raises:
    ValueError: the run finished with a different config (reusing it would be wrong).
  """
  done_path = os.path.join(cell_dir, DONE_FILE)
  if not os.path.exists(done_path):
    return None
  with open(done_path) as f:
    done = json.load(f)
  now = _flat_config(config)
  then = done.get('config', {})
  # Fields added to the config after the run are ignored: a new field's default keeps the old
  # behaviour (the convention of data._DEFAULTS); a removed or changed field is a difference.
  changed = sorted(k for k in then if now.get(k, _MISSING) != then[k])
  if changed:
    diff = ', '.join(f'{k}: {then[k]!r} -> {now.get(k, "<absent>")!r}' for k in changed[:8])
    raise ValueError(f'{cell_dir} holds a finished run with a different config ({diff}'
                     f'{", ..." if len(changed) > 8 else ""}). Use a fresh workdir or delete '
                     'that folder to retrain it.')
  eval_path = os.path.join(cell_dir, done['eval_json'])
  with open(eval_path) as f:
    return json.load(f), done.get('seconds')


def _write_done(cell_dir: str, name: str, overrides: Mapping[str, Any],
                config: ml_collections.ConfigDict, seconds: float) -> None:
  record = {'name': name, 'overrides': _plain(dict(overrides)),
            'eval_json': _eval_name(config) + '.json', 'seconds': seconds,
            'finished_at': datetime.datetime.now().isoformat(timespec='seconds'),
            'config': _flat_config(config)}
  tmp = os.path.join(cell_dir, DONE_FILE + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(record, f, indent=2)
  os.replace(tmp, os.path.join(cell_dir, DONE_FILE))  # atomic: never a half-written marker


def check_grid(base_config: ml_collections.ConfigDict, grid: Mapping[str, Sequence[Any]]
               ) -> tuple[list[dict[str, Any]], list[ml_collections.ConfigDict]]:
  """The cells of `grid` and their configs, each config's model built once as a check.

  Raises:
    ValueError: a malformed grid, an unknown key or bad value, or a model the registry rejects
      (e.g. an unknown model name or IBN mode), naming the cell.
  """
  cells = expand_grid(grid, base_config)
  configs = [apply_overrides(base_config, cell) for cell in cells]
  for cell, config in zip(cells, configs):
    try:
      models.get_model(config.model)
    except ValueError as e:
      raise ValueError(f'Cell {cell_name(cell)}: {e}') from e
  return cells, configs


def run_grid(base_config: ml_collections.ConfigDict, grid: Mapping[str, Sequence[Any]],
             workdir: str, *, dry_run: bool = False,
             keep_going: bool = False) -> list[CellResult]:
  """Trains and evaluates every cell of `grid` in turn, skipping finished cells.

  Every cell's config is built and its model checked before anything trains, so a typo in the
  grid fails at once, not hours in. Each cell runs `train.train_and_evaluate` in
  `workdir/<cell_dirname>/`, which then gets a `DONE` marker.

  Args:
    base_config: the config every cell starts from.
    grid: dotted config key -> values (see `expand_grid`).
    workdir: the grid's folder; gets `grid.json` (the grid and its cells) and a folder per cell.
    dry_run: only plan: report which cells would train and which are finished.
    keep_going: after a failing cell, record the failure (status 'failed', its traceback in
      the result and in `<cell>/FAILED.txt`) and go on; else the exception propagates.

  Returns:
    One CellResult per cell, in grid order.
  """
  cells, configs = check_grid(base_config, grid)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, GRID_FILE), 'w') as f:
    json.dump({'grid': _plain(dict(grid)),
               'cells': [{'name': cell_name(c), 'dir': cell_dirname(c), 'overrides': _plain(c)}
                         for c in cells]}, f, indent=2)

  total = len(cells)
  out: list[CellResult] = []
  stopped = False
  for i, (cell, config) in enumerate(zip(cells, configs), start=1):
    name, cell_dir = cell_name(cell), os.path.join(workdir, cell_dirname(cell))
    result = CellResult(name=name, overrides=dict(cell), workdir=cell_dir, status='pending')
    out.append(result)
    if stopped:
      continue
    finished = _load_finished(cell_dir, config)
    if finished is not None:
      result.status, (result.results, result.seconds) = 'skipped', finished
      logging.info('[%d/%d] %s: finished earlier, skipped.', i, total, name)
      continue
    if dry_run:
      result.status = 'planned'
      logging.info('[%d/%d] %s: would train in %s.', i, total, name, cell_dir)
      continue
    logging.info('[%d/%d] %s: training in %s.', i, total, name, cell_dir)
    start = time.time()
    try:
      returned = train_lib.train_and_evaluate(config, cell_dir)
    except Exception:  # pylint: disable=broad-except
      if not keep_going:
        raise
      result.status, result.error = 'failed', traceback.format_exc()
      os.makedirs(cell_dir, exist_ok=True)
      with open(os.path.join(cell_dir, FAILED_FILE), 'w') as f:
        f.write(result.error)
      logging.error('[%d/%d] %s: FAILED (continuing; see %s):\n%s', i, total, name,
                    os.path.join(cell_dir, FAILED_FILE), result.error)
      continue
    if not returned:  # stopped by SIGTERM/SIGINT or train.halt_after_steps: no results yet
      result.status, stopped = 'interrupted', True
      logging.warning('[%d/%d] %s: stopped before the end; rerun the same command to resume. '
                      'Not starting the remaining %d cell(s).', i, total, name, total - i)
      continue
    seconds = time.time() - start
    _write_done(cell_dir, name, cell, config, seconds)
    if os.path.exists(os.path.join(cell_dir, FAILED_FILE)):
      os.remove(os.path.join(cell_dir, FAILED_FILE))  # an earlier failure, now fixed
    # Read back what was written, so fresh and skipped cells give byte-identical tables.
    result.status, (result.results, _) = 'finished', _load_finished(cell_dir, config)
    result.seconds = seconds
    logging.info('[%d/%d] %s: finished in %.0f s.', i, total, name, seconds)
  counts = {s: sum(r.status == s for r in out) for s in sorted({r.status for r in out})}
  logging.info('Grid %s: %s.', workdir, ', '.join(f'{n} {s}' for s, n in counts.items()))
  return out


# ----------------------------------------------------------------------------- table


def _group_key(cell: CellResult, group_by: Sequence[str]) -> tuple[str, ...]:
  # '—' marks an override the cell does not have (dropped as not applicable, e.g. the IBN
  # mode of a U-Net) or never set.
  return tuple(_value_str(cell.overrides[k]) if k in cell.overrides else '—' for k in group_by)


def default_group_by(cells: Sequence[CellResult]) -> tuple[str, ...]:
  """Every override key of the cells except the replicate keys (seed, fold), in grid order."""
  keys: list[str] = []
  for cell in cells:
    keys += [k for k in cell.overrides if k not in keys and k not in REPLICATE_KEYS]
  return tuple(keys)


def _groups(cells: Sequence[CellResult], group_by: Sequence[str]
            ) -> list[tuple[tuple[str, ...], list[CellResult]]]:
  groups: dict[tuple[str, ...], list[CellResult]] = {}
  for cell in cells:
    groups.setdefault(_group_key(cell, group_by), []).append(cell)
  return list(groups.items())


def _per_frame(cells: Sequence[CellResult], metric: str) -> list[Any]:
  return [f[metric] for c in cells if c.ok for f in c.results['per_frame']]


def _per_case(cells: Sequence[CellResult], metric: str) -> list[Any]:
  return [v[metric] for c in cells if c.ok for v in c.results['per_case'].values()]


def summarize(cells: Sequence[CellResult],
              group_by: Sequence[str] | None = None) -> dict[str, Any]:
  """The numbers behind the table (module docstring), JSON-able.

  Args:
    cells: from `run_grid`.
    group_by: override keys that define a table row; default `default_group_by(cells)`.

  Returns:
    {'group_by': [...], 'groups': [{'group': {key: value}, 'runs', 'failed', 'cells',
     'dice_per_image', 'dice_run_means', 'apd_good_mm_over_cases', 'good_pct_over_cases'}],
     'cells': [{'name', 'dir', 'status', 'overrides', 'seconds', 'error'}]}, each metric a
    {'mean', 'std', 'n'}.
  """
  group_by = tuple(default_group_by(cells) if group_by is None else group_by)
  groups = []
  for key, members in _groups(cells, group_by):
    done = [c for c in members if c.ok]
    groups.append({
        'group': dict(zip(group_by, key)),
        'runs': len(done),
        'failed': [c.name for c in members if not c.ok],
        'cells': [c.name for c in members],
        'dice_per_image': metrics_lib.mean_std(_per_frame(done, 'dice')),
        'dice_run_means': metrics_lib.mean_std(
            c.results['per_set']['per_image']['dice_all']['mean'] for c in done),
        'apd_good_mm_over_cases': metrics_lib.mean_std(_per_case(done, 'apd_good_mm')),
        'good_pct_over_cases': metrics_lib.mean_std(_per_case(done, 'good_pct')),
    })
  return {
      'group_by': list(group_by),
      'groups': groups,
      'cells': [{'name': c.name, 'dir': os.path.basename(c.workdir), 'status': c.status,
                 'overrides': _plain(c.overrides), 'seconds': c.seconds,
                 'error': c.error.strip().splitlines()[-1] if c.error else None}
                for c in cells],
  }


def _fmt(ms: Mapping[str, Any], digits: int) -> str:
  if not math.isfinite(ms['mean']):
    return 'n/a'
  std = f"{ms['std']:.{digits}f}" if math.isfinite(ms['std']) else 'n/a'
  return f"{ms['mean']:.{digits}f} ± {std}"


def results_table(cells: Sequence[CellResult], group_by: Sequence[str] | None = None) -> str:
  """Markdown comparison table, one row per group, with the definitions under it.

  Cells that did not finish are named under the table (their group's `runs` excludes them).
  """
  summary = summarize(cells, group_by)
  keys = summary['group_by']
  header = keys + ['runs', 'Dice, per image (all frames)', 'Dice, over runs',
                   'APD (mm), over cases (good contours)', 'good contours (%), over cases']
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '---|' * len(keys) + '---:|' * (len(header) - len(keys))]
  for g in summary['groups']:
    row = [g['group'][k] for k in keys] + [
        str(g['runs']),
        f"{_fmt(g['dice_per_image'], 3)} (n={g['dice_per_image']['n']})",
        _fmt(g['dice_run_means'], 3),
        f"{_fmt(g['apd_good_mm_over_cases'], 2)} (n={g['apd_good_mm_over_cases']['n']})",
        f"{_fmt(g['good_pct_over_cases'], 1)} (n={g['good_pct_over_cases']['n']})",
    ]
    lines.append('| ' + ' | '.join(row) + ' |')
  lines += [
      '',
      'mean ± std (ddof=1); n = values averaged. *Dice, per image*: every evaluated frame of '
      'every run (undetected frames as 0). *Dice, over runs*: the runs\' per-image means '
      '(spread over seeds/folds). *APD* (average perpendicular distance, 2009 challenge '
      'protocol) and *good contours* (APD < the good-contour threshold): per case, then over '
      'the (run, case) pairs, as the challenge reported them; cases without a good contour '
      'have no APD. "—": the override does not apply to that row (e.g. the IBN mode of a '
      'U-Net) and the base config\'s value was used.',
  ]
  not_done = [c for c in summary['cells'] if c['status'] not in ('finished', 'skipped')]
  if not_done:
    lines += ['', 'Cells without results (not in the table):', '']
    lines += [f"* `{c['name']}`: {c['status']}" + (f" ({c['error']})" if c['error'] else '')
              for c in not_done]
  return '\n'.join(lines) + '\n'


def boxplot(cells: Sequence[CellResult], out_png: str,
            group_by: Sequence[str] | None = None) -> str:
  """Box plots of per-image Dice (all frames) and APD (detected frames) per group."""
  group_by = tuple(default_group_by(cells) if group_by is None else group_by)
  groups = _groups(cells, group_by)
  labels = [f"{' / '.join(key) if key else 'all'}\n({sum(c.ok for c in members)} run"
            f"{'' if sum(c.ok for c in members) == 1 else 's'})" for key, members in groups]
  panels = [('Dice per image (all frames)', 'dice'), ('APD per image, mm (detected frames)',
                                                       'apd_mm')]
  width = max(6.0, 1.1 * len(groups) * len(panels) + 2)
  fig = Figure(figsize=(width, 4.2))
  axes = fig.subplots(1, len(panels), squeeze=False)
  for ax, (title, metric) in zip(axes[0], panels):
    data = [metrics_lib.finite(_per_frame(members, metric)) for _, members in groups]
    # An empty box would make matplotlib drop the group; show it as 'no data' instead.
    positions = [i + 1 for i, d in enumerate(data) if d.size]
    if positions:
      ax.boxplot([d for d in data if d.size], positions=positions, widths=0.6,
                 showmeans=True, flierprops={'markersize': 2})
    for i, d in enumerate(data):
      if not d.size:
        ax.text(i + 1, 0.5, 'no data', ha='center', va='center', rotation=90,
                transform=ax.get_xaxis_transform(), color='gray')
    ax.set_xticks(range(1, len(groups) + 1))
    ax.set_xticklabels(labels, rotation=20 if len(groups) > 3 else 0, ha='right'
                       if len(groups) > 3 else 'center', fontsize=8)
    ax.set_xlim(0.4, len(groups) + 0.6)
    ax.set_title(title, fontsize=10)
    ax.grid(axis='y', alpha=0.3)
    if metric == 'dice':
      ax.set_ylim(-0.02, 1.02)
  if group_by:
    fig.suptitle(' / '.join(group_by), fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  fig.savefig(out_png, dpi=110)
  return out_png


def describe_setting(base_config: ml_collections.ConfigDict,
                     cells: Sequence[CellResult]) -> str:
  """One paragraph: scale, training length, split and seeds of the grid (for results.md)."""
  m, d, t = base_config.model, base_config.data, base_config.train
  length = (f'{t.num_steps} steps' if t.num_steps > 0 else f'{t.num_epochs} epochs')
  if d.split == 'kfold':
    split = (f'{d.num_folds}-fold patient-level cross-validation over '
             f'{"+".join(d.kfold_sets)} (kfold_seed {d.kfold_seed})')
  else:
    split = f'official (train on {"+".join(d.train_sets)}, evaluate on {"+".join(d.eval_sets)})'
  frames = ''
  for cell in cells:
    path = os.path.join(cell.workdir, 'split.json')
    if cell.ok and os.path.exists(path):
      with open(path) as f:
        s = json.load(f)
      frames = (f' ({len(s["train_cases"])} cases / {s["train_frames"]} frames train, '
                f'{len(s["eval_cases"])} cases / {s["eval_frames"]} frames eval in '
                f'`{cell.name}`)')
      break
  seeds = sorted({c.overrides.get('seed', base_config.seed) for c in cells})
  folds = sorted({c.overrides['data.fold'] for c in cells if 'data.fold' in c.overrides})
  seeds_s = f'{len(seeds)} seed{"s" if len(seeds) > 1 else ""} ({", ".join(map(str, seeds))})'
  folds_s = f', folds {", ".join(map(str, folds))}' if folds else ''
  return (f'Scale: {d.image_size}x{d.image_size} images, base width {m.base_width}, depth '
          f'{m.depth}; {length}, batch {t.batch_size}, {t.optimizer} lr {t.learning_rate:g}. '
          f'Split: {split}{frames}. {seeds_s}{folds_s} per row. Good contour: APD < '
          f'{base_config.eval.good_apd_mm:g} mm.')


def write_report(cells: Sequence[CellResult], workdir: str,
                 base_config: ml_collections.ConfigDict | None = None,
                 group_by: Sequence[str] | None = None) -> dict[str, str]:
  """Writes `results.md` (setting + table), `results.json` and `boxplot.png` into `workdir`.

  Returns:
    {'markdown': path, 'json': path, 'boxplot': path}.
  """
  os.makedirs(workdir, exist_ok=True)
  summary = summarize(cells, group_by)
  lines = ['# Ablation results', '']
  if base_config is not None:
    summary['setting'] = describe_setting(base_config, cells)
    lines += [summary['setting'], '']
  lines.append(results_table(cells, group_by))
  paths = {'markdown': os.path.join(workdir, 'results.md'),
           'json': os.path.join(workdir, 'results.json'),
           'boxplot': os.path.join(workdir, 'boxplot.png')}
  with open(paths['markdown'], 'w') as f:
    f.write('\n'.join(lines))
  with open(paths['json'], 'w') as f:
    json.dump(metrics_lib.to_jsonable(summary), f, indent=2, allow_nan=False)
  boxplot(cells, paths['boxplot'], group_by)
  return paths


def parse_grid(spec: str) -> dict[str, list[Any]]:
  """A grid from a preset name (`PRESETS`) or a JSON object string.

  Raises:
    ValueError: neither a preset nor a JSON object of lists.
  """
  if spec in PRESETS:
    return copy.deepcopy(PRESETS[spec])
  try:
    grid = json.loads(spec)
  except json.JSONDecodeError as e:
    raise ValueError(f'--grid {spec!r} is neither a preset ({", ".join(sorted(PRESETS))}) nor '
                     f'JSON: {e}') from e
  if not isinstance(grid, dict):
    raise ValueError(f'--grid JSON must be an object of key -> list of values; got {spec!r}.')
  return grid
