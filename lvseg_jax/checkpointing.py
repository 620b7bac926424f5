"""Orbax checkpoints: the latest N training states, and the best model by validation Dice.

Layout of a workdir:
  config.json              the run's configuration (read back for evaluation and prediction)
  checkpoints/<step>/      latest N: {'state': params, batch_stats, opt_state, step; 'meta': json}
  best/<step>/             the best by validation Dice: {'state': params, batch_stats; 'meta'}

An exported model (`export_model`; the shipped models of `lvseg_jax/pretrained/`) is a folder
with config.json and variables.npz (every array of {'params'[, 'batch_stats']} under its
'/'-joined path): one portable file, readable without orbax.
"""

import json
import logging as std_logging
import os
import zipfile
from typing import Any, Sequence

from flax import traverse_util
import jax
import ml_collections
import numpy as np
from absl import logging

from lvseg_jax import config_check

CONFIG_FILE = 'config.json'
VARIABLES_FILE = 'variables.npz'


def _orbax():
  """orbax.checkpoint, imported on first use: an exported model (the shipped one) loads without
  it, a fifth of a second less start-up for every prediction."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp


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
  try:
    with open(path) as f:
      saved = flatten_config(json.load(f))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path}: not a readable config ({e}); the run\'s settings are lost. '
                     'Restore the file or start a new --workdir.') from None
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


# Fields the trained weights depend on: the architecture and the preprocessing. Evaluate and
# predict take them from the workdir; every other field comes from the command line.
TRAINED_FIELDS = ('model.', 'data.image_size', 'data.resize_mode', 'data.roi_mm',
                  'data.clip_percentiles', 'data.myocardium', 'data.mask_outset_px')
# Fields evaluate and predict take from the workdir unless the command line sets them.
WORKDIR_DEFAULTS = ('data.roi_localizer',)


def _trained(key: str) -> bool:
  return any(key == f or (f.endswith('.') and key.startswith(f)) for f in TRAINED_FIELDS)


def trained_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{'section.field': value} of the `TRAINED_FIELDS` of a config: what its weights fit."""
  return {k: v for k, v in flatten_config(config).items() if _trained(k)}


def config_for_run(config: ml_collections.ConfigDict, trained: ml_collections.ConfigDict,
                   overridden: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """This command's config with the trained run's `TRAINED_FIELDS`, and its
  `WORKDIR_DEFAULTS` where the command line does not set them (the one rule of
  `--mode=evaluate` and `--mode=predict`).

  Args:
    config: the command line's config.
    trained: the workdir's config (`load_config`).
    overridden: dotted fields set on the command line (`--config.a.b=...`).

  Raises:
    ConfigError: a command-line override of a trained field that differs from the run's.
  """
  now, then = flatten_config(config), flatten_config(trained)
  clash = sorted(k for k in overridden if _trained(k) and k in then and now.get(k) != then[k])
  if clash:
    raise config_check.ConfigError(
        '; '.join(f'--config.{k}={now.get(k)!r}' for k in clash) + ': the checkpoint was '
        f'trained with {", ".join(f"{k}={then[k]!r}" for k in clash)}, and the model\'s fields '
        '(architecture and preprocessing) come from the workdir. Drop the flag, or train a new '
        'run with it.')
  run = ml_collections.ConfigDict(config.to_dict())
  taken = trained_fields(trained)
  taken.update({k: then[k] for k in WORKDIR_DEFAULTS if k in then and k not in overridden})
  for key, value in taken.items():
    section, _, field = key.rpartition('.')
    run[section][field] = value
  return run


class CheckpointError(ValueError):
  """A checkpoint that cannot be read; the message names its step and folder."""


def _damaged(folder: str, step: int, error: Exception, advice: str) -> CheckpointError:
  cause = str(error).strip().splitlines()[0][:300] if str(error).strip() else ''
  return CheckpointError(f'{os.path.join(folder, str(step))}: checkpoint at step {step} cannot '
                         f'be read ({type(error).__name__}: {cause}). {advice}')


class Checkpointer:
  """Latest-N and best-by-Dice checkpoint managers for one workdir."""

  def __init__(self, workdir: str, keep: int = 3):
    ocp = _orbax()
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
    ocp = _orbax()
    if step in self.latest.all_steps():  # e.g. the periodic save landed on the last step
      return
    self.latest.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave(meta)), force=True)
    self.latest.wait_until_finished()

  def save_best(self, step: int, variables: dict[str, Any], dice: float,
                meta: dict[str, Any]) -> None:
    """Saves `variables` if `dice` beats the best so far (orbax keeps only the best)."""
    ocp = _orbax()
    if step in self.best.all_steps():
      return
    self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(variables),
                                                 meta=ocp.args.JsonSave(meta)),
                   metrics={'dice': float(dice)}, force=True)
    self.best.wait_until_finished()

  def restore_latest(self, target: dict[str, Any], fall_back: bool = True
                     ) -> tuple[dict[str, Any], dict] | None:
    """Restores the newest readable state into the structure of `target` (None if none).

    A checkpoint that fails to restore is skipped with a warning naming it when `fall_back`
    and an older one restores; otherwise a `CheckpointError` names it. When every checkpoint
    fails, a `CheckpointError` names the newest: its files are damaged, or the state this
    config builds has another structure (a changed model or optimizer).
    """
    ocp = _orbax()
    steps = sorted(self.latest.all_steps(), reverse=True)
    if not steps:
      return None
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    folder = str(self.latest.directory)
    first_error = None
    for step in steps:
      try:
        restored = self.latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except  # orbax / TensorStore raise many kinds
        if first_error is None:
          first_error = e
        if not fall_back:
          raise _damaged(folder, step, e, 'Earlier checkpoints may be intact: delete this '
                         'step\'s folder to resume from the one before, or set '
                         'train.resume_fallback=True.') from e
        continue
      if step != steps[0]:
        logging.warning('%s: the newest checkpoint(s) %s could not be read (%s: %s); resumed '
                        'from step %d instead.', folder, [s for s in steps if s > step],
                        type(first_error).__name__, str(first_error).splitlines()[0][:200],
                        step)
      return restored['state'], restored['meta']
    raise _damaged(folder, steps[0], first_error, 'No checkpoint of this run could be read into '
                   'the training state this config builds: the files are damaged, or the '
                   'model or optimizer settings differ from the run\'s.') from first_error

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
  if os.path.exists(os.path.join(workdir, VARIABLES_FILE)):
    return config, _load_exported(workdir, config)
  ocp = _orbax()
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
  try:
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
  except Exception as e:  # pylint: disable=broad-except  # orbax / TensorStore raise many kinds
    other = 'latest' if which == 'best' else 'best'
    raise _damaged(str(manager.directory), step, e, f'Use another checkpoint '
                   f'(--config.eval.checkpoint={other} or --config.predict.checkpoint={other}) '
                   'or retrain.') from e
  finally:
    manager.close()
  state = jax.tree_util.tree_map(np.asarray, state)
  logging.info('Loaded %s checkpoint at step %d from %s', which, step, workdir)
  return config, state


def export_model(workdir: str, folder: str, which: str = 'best') -> dict[str, Any]:
  """Writes a trained run's config.json and variables.npz (float32) to `folder`.

  Returns:
    {'parameters': count, 'bytes': size of variables.npz}.
  """
  config, variables = load_for_inference(workdir, which)
  os.makedirs(folder, exist_ok=True)
  save_config(config, folder)
  flat = {'/'.join(path): np.asarray(leaf, np.float32) for path, leaf in
          traverse_util.flatten_dict(variables).items()}
  path = os.path.join(folder, VARIABLES_FILE)
  np.savez_compressed(path, **flat)
  count = sum(int(v.size) for k, v in flat.items() if k.startswith('params/'))
  return dict(parameters=count, bytes=os.path.getsize(path))


def _load_exported(folder: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """variables.npz checked against the structure and shapes the config's model builds."""
  from lvseg_jax import models  # pylint: disable=g-import-not-at-top

  path = os.path.join(folder, VARIABLES_FILE)
  expected = traverse_util.flatten_dict(jax.eval_shape(lambda: models.init_variables(
      models.get_model(config.model), jax.random.key(0), int(config.data.image_size))))
  try:
    with np.load(path) as f:
      flat = {tuple(k.split('/')): f[k] for k in f.files}
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise CheckpointError(f'{path}: not a readable variables file ({e}).') from None
  problems = sorted(set('/'.join(k) for k in expected) ^ set('/'.join(k) for k in flat))
  problems += ['/'.join(k) + f' {flat[k].shape} != {v.shape}' for k, v in expected.items()
               if k in flat and flat[k].shape != v.shape]
  if problems:
    raise CheckpointError(f'{path}: does not match the model of {CONFIG_FILE} '
                          f'({len(problems)} array(s) missing, extra or reshaped: '
                          f'{", ".join(problems[:5])}).')
  logging.info('Loaded exported model from %s', folder)
  return traverse_util.unflatten_dict(flat)
