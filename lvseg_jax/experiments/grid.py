"""Ablation grids: cells from a grid of config overrides, and running them (resumable).

See the package docstring (`lvseg_jax.experiments`) for the grid and re-run rules.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import itertools
import json
import os
import re
import time
import traceback
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np
from absl import logging

from lvseg_jax import checkpointing
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


def value_str(value: Any) -> str:
  """A value as it appears in cell names: strings bare, everything else as JSON."""
  if isinstance(value, str):
    return value
  return json.dumps(to_plain(value))


def to_plain(value: Any) -> Any:
  """JSON-able plain types (tuples become lists, NaN stays a float)."""
  if isinstance(value, Mapping):
    return {str(k): to_plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_plain(v) for v in value]
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
  return ','.join(f'{k}={value_str(overrides[k])}' for k in sorted(overrides))


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
      'interrupted' (stopped by a signal or `train.halt_after_steps`; rerun to resume).
    results: the `results.evaluate` results as written to the evaluation JSON (NaN as None),
      for 'finished' and 'skipped' cells.
    error: the traceback of a failed cell.
    seconds: training + evaluation time of a cell trained now (or when it was trained).
    signum: the signal that stopped an 'interrupted' cell (None: `train.halt_after_steps`).
  """
  name: str
  overrides: dict[str, Any]
  workdir: str
  status: str
  results: dict[str, Any] | None = None
  error: str | None = None
  seconds: float | None = None
  signum: int | None = None

  @property
  def ok(self) -> bool:
    return self.status in ('finished', 'skipped') and self.results is not None


def _flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{'section.field': plain value} without the keys that cannot change a run's numbers."""
  return {k: to_plain(v) for k, v in checkpointing.flatten_config(config).items()
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
  # Fields added to the config after the run are ignored: a field added to configs/default.py
  # defaults to the behaviour from before it existed; a removed or changed field is a difference.
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
  record = {'name': name, 'overrides': to_plain(dict(overrides)),
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
    json.dump({'grid': to_plain(dict(grid)),
               'cells': [{'name': cell_name(c), 'dir': cell_dirname(c), 'overrides': to_plain(c)}
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
    except train_lib.Stopped as e:  # the user's SIGTERM/SIGINT: never a failure to go past
      result.status, result.signum, stopped = 'interrupted', e.signum, True
      logging.warning('[%d/%d] %s: %s Not starting the remaining %d cell(s).', i, total, name,
                      e, total - i)
      continue
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
    if not returned:  # stopped by train.halt_after_steps: no results yet
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
  for key, values in grid.items():
    if not isinstance(values, list) or not values:
      raise ValueError(f'--grid: {key!r} must map to a non-empty list of values, got '
                       f'{values!r}.')
  return grid
