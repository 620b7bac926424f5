"""Orbax checkpoints: the latest N training states, and the best model by validation Dice.

Layout of a workdir:
  config.json              the run's configuration (read back for evaluation and prediction)
  checkpoints/<step>/      latest N: {'state': params, batch_stats, opt_state, step; 'meta': json}
  best/<step>/             the best by validation Dice: {'state': params, batch_stats; 'meta'}
"""

import json
import logging as std_logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

CONFIG_FILE = 'config.json'


class _QuietOrbax(std_logging.Filter):
  """Drops orbax's per-save INFO chatter from the console; warnings and errors pass."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def quiet_orbax_logging() -> None:
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietOrbax) for f in handler.filters):
    handler.addFilter(_QuietOrbax())


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, CONFIG_FILE), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))


def flatten_config(config: Any) -> dict[str, Any]:
  """{'section.field': value} for every leaf of a ConfigDict or nested dict, keys sorted."""
  flat: dict[str, Any] = {}

  def walk(node: Any, prefix: str) -> None:
    for key in sorted(node.keys()):
      value = node[key]
      if hasattr(value, 'keys'):
        walk(value, f'{prefix}{key}.')
      else:
        flat[f'{prefix}{key}'] = value

  walk(config, '')
  return flat


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The configuration a run in `workdir` was trained with.

  Laid over `configs/default.py`: a field added since the run was saved takes its default
  (defaults keep earlier behaviour), and a field that no longer exists is dropped (logged).
  """
  from configs import default  # pylint: disable=g-import-not-at-top

  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no config.json; is {workdir!r} a lvseg-jax training '
                            'workdir?')
  with open(path) as f:
    saved = flatten_config(json.load(f))
  config = default.get_config()
  current = flatten_config(config)
  dropped = sorted(set(saved) - set(current))
  if dropped:
    logging.info('%s: ignoring field(s) this version no longer has: %s', path, dropped)
  for key in sorted(set(saved) & set(current)):
    section, _, field = key.rpartition('.')
    node = config
    for part in filter(None, section.split('.')):
      node = node[part]
    value = saved[key]
    node[field] = tuple(value) if isinstance(current[key], tuple) else value
  return config


class Checkpointer:
  """Latest-N and best-by-Dice checkpoint managers for one workdir."""

  def __init__(self, workdir: str, keep: int = 3):
    workdir = os.path.abspath(workdir)
    self.latest = ocp.CheckpointManager(
        os.path.join(workdir, 'checkpoints'),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))
    self.best = ocp.CheckpointManager(
        os.path.join(workdir, 'best'),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda m: m['dice'], best_mode='max', create=True,
            keep_checkpoints_without_metrics=False, enable_async_checkpointing=False))

  def save_latest(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
    if step in self.latest.all_steps():  # e.g. the periodic save landed on the last step
      return
    self.latest.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave(meta)), force=True)
    self.latest.wait_until_finished()

  def save_best(self, step: int, variables: dict[str, Any], dice: float,
                meta: dict[str, Any]) -> None:
    """Saves `variables` if `dice` beats the best so far (orbax keeps only the best)."""
    if step in self.best.all_steps():
      return
    self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(variables),
                                                 meta=ocp.args.JsonSave(meta)),
                   metrics={'dice': float(dice)}, force=True)
    self.best.wait_until_finished()

  def restore_latest(self, target: dict[str, Any]) -> tuple[dict[str, Any], dict] | None:
    """Restores the latest state into the structure of `target`, or None if there is none."""
    step = self.latest.latest_step()
    if step is None:
      return None
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    restored = self.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored['state'], restored['meta']

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def load_for_inference(workdir: str, which: str = 'best',
                       ) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """Loads a trained model's config and variables ({'params'[, 'batch_stats']}).

  Args:
    workdir: a training workdir.
    which: 'best' (best validation Dice; falls back to the latest with a warning when no
      evaluation has run yet) or 'latest'.
  """
  from lvseg_jax import models  # pylint: disable=g-import-not-at-top

  if which not in ('best', 'latest'):
    raise ValueError(f"checkpoint must be 'best' or 'latest', got {which!r}.")
  config = load_config(workdir)
  model = models.get_model(config.model)
  # Only the structure is needed as a restore target: trace, don't compute.
  abstract = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0),
                                                          int(config.data.image_size)))
  workdir = os.path.abspath(workdir)
  best_dir, latest_dir = os.path.join(workdir, 'best'), os.path.join(workdir, 'checkpoints')
  manager_dir = best_dir if which == 'best' else latest_dir
  manager = ocp.CheckpointManager(manager_dir, options=ocp.CheckpointManagerOptions(
      read_only=True, create=False))
  step = manager.best_step() if which == 'best' else manager.latest_step()
  if step is None and which == 'best':
    logging.warning('%s: no best checkpoint (no evaluation yet); using the latest.', best_dir)
    manager = ocp.CheckpointManager(latest_dir, options=ocp.CheckpointManagerOptions(
        read_only=True, create=False))
    step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f'No checkpoint found in {workdir!r}.')
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  if meta.get('kind') == 'train_state':
    # A full training state: restore without a target (the optimizer state is not needed).
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))['state']
    state = {'params': restored['params']}
    if restored.get('batch_stats'):
      state['batch_stats'] = restored['batch_stats']
  else:
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))['state']
  manager.close()
  state = jax.tree_util.tree_map(np.asarray, state)
  logging.info('Loaded %s checkpoint at step %d from %s', which, step, workdir)
  return config, state
