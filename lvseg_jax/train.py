"""Training and evaluation (after Flax's examples/imagenet, with current JAX APIs).

Two interchangeable data-parallel train steps, picked by `config.train.parallel`:
  * 'jit': `jax.jit` over a 1-D device mesh, batch sharded with `NamedSharding`, state
    replicated; XLA partitions the step, so BatchNorm statistics cover the global batch.
  * 'shard_map': the same step body under `jax.shard_map` with `axis_name='batch'` (the body
    also runs under `jax.pmap` unchanged): gradients, metrics and BatchNorm moments are
    combined across devices with collectives.
Both compute exactly the global-batch loss: per-sample losses are summed and divided by the
global number of valid samples.
"""

import functools
import json
import math
import os
import signal
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import struct
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lvseg_jax import augment
from lvseg_jax import checkpointing
from lvseg_jax import config_check
from lvseg_jax import data as data_lib
from lvseg_jax import evaluate as evaluate_lib
from lvseg_jax import losses
from lvseg_jax import results as results_lib
from lvseg_jax import models
from lvseg_jax import metric_writer
from lvseg_jax import plots

AXIS = 'batch'


class TrainState(train_state.TrainState):
  """Params, optimizer state and BatchNorm running statistics ({} for models without)."""
  batch_stats: Any = struct.field(default_factory=dict)


# ----------------------------------------------------------------------------- state

def learning_rate_schedule(train_cfg: ml_collections.ConfigDict,
                           total_steps: int) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine decay to `learning_rate * end_lr_factor`."""
  warmup = min(train_cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=train_cfg.learning_rate * train_cfg.end_lr_factor)


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    'adam': lambda lr, wd: (optax.chain(optax.add_decayed_weights(wd), optax.adam(lr))
                            if wd else optax.adam(lr)),
    'adamw': lambda lr, wd: optax.adamw(lr, weight_decay=wd),
    'sgd': lambda lr, wd: optax.chain(optax.add_decayed_weights(wd),
                                      optax.sgd(lr, momentum=0.9, nesterov=True)),
}


def get_optimizer(train_cfg: ml_collections.ConfigDict,
                  total_steps: int) -> optax.GradientTransformation:
  if train_cfg.optimizer not in OPTIMIZERS:
    raise ValueError(f'Unknown optimizer {train_cfg.optimizer!r}; choose one of '
                     f'{sorted(OPTIMIZERS)}.')
  tx = OPTIMIZERS[train_cfg.optimizer](learning_rate_schedule(train_cfg, total_steps),
                                       train_cfg.weight_decay)
  if train_cfg.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip_norm), tx)
  if train_cfg.flatten_optimizer:
    # One vector instead of one set of small kernels per parameter leaf: the same update,
    # fewer kernel launches per step.
    tx = optax.flatten(tx)
  return tx


def create_train_state(config: ml_collections.ConfigDict, model, key: jax.Array,
                       total_steps: int) -> TrainState:
  variables = models.init_variables(model, key, config.data.image_size)
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           batch_stats=variables.get('batch_stats', {}),
                           tx=get_optimizer(config.train, total_steps))


# ----------------------------------------------------------------------------- steps

def train_step(state: TrainState, batch: dict[str, jax.Array], key: jax.Array, *,
               config: ml_collections.ConfigDict, schedule: optax.Schedule,
               axis_name: str | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimization step; pure, so it runs under jit, shard_map or pmap.

  Args:
    state: the training state (replicated).
    batch: {'image': (B,S,S,1), 'mask': (B,S,S), 'valid': (B,)}, the local batch under a
      mapped axis, else the global batch.
    key: the run's base PRNG key; the step's key is `fold_in(key, step)`.
    config: the run configuration (static).
    schedule: the learning-rate schedule (for logging).
    axis_name: the mapped device axis, or None under plain jit.
  """
  step_key = jax.random.fold_in(key, state.step)
  if axis_name is not None:
    step_key = jax.random.fold_in(step_key, jax.lax.axis_index(axis_name))
  images, masks = batch['image'], batch['mask']
  if config.augment.enabled:
    images, masks = augment.augment(step_key, images, masks, config.augment)
  valid = batch['valid'].astype(jnp.float32)
  count = valid.sum()
  if axis_name is not None:
    count = jax.lax.psum(count, axis_name)
  count = jnp.maximum(count, 1.0)
  has_stats = bool(state.batch_stats)

  mutable = (['batch_stats'] if has_stats else []) + (
      [models.AUX_COLLECTION] if config.model.deep_supervision else [])

  def loss_fn(params):
    variables = {'params': params}
    kwargs = {}
    if has_stats:
      variables['batch_stats'] = state.batch_stats
      # Padded rows (valid=False) stay out of the batch statistics, as out of the loss.
      kwargs['mask'] = batch['valid']
    if mutable:
      logits, updates = state.apply_fn(variables, images, train=True, mutable=mutable, **kwargs)
    else:
      logits, updates = state.apply_fn(variables, images, train=True), {}
    per_sample, ce, hard_dice = losses.training_loss(
        logits, masks, config.train.ce_weight, config.train.dice_weight,
        aux=models.aux_logits(updates))
    loss = jnp.sum(per_sample * valid) / count
    sums = {'ce': jnp.sum(ce * valid), 'dice': jnp.sum(hard_dice * valid)}
    return loss, (updates, sums)

  (loss, (updates, sums)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if axis_name is not None:
    grads, loss, sums = jax.lax.psum((grads, loss, sums), axis_name)
  new_state = state.apply_gradients(grads=grads)
  if has_stats:
    new_state = new_state.replace(batch_stats=updates['batch_stats'])
  step_metrics = {'loss': loss, 'ce': sums['ce'] / count, 'dice': sums['dice'] / count,
                  'learning_rate': schedule(state.step)}
  return new_state, step_metrics


def make_mesh(devices: list | None = None) -> Mesh:
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), (AXIS,))


def replicate(state: TrainState, mesh: Mesh) -> TrainState:
  """`state` placed on every device of `mesh`, as the train step returns it.

  A state that is not (fresh from `create_train_state` or a checkpoint) makes the step's
  second call trace and compile again, because the returned state's type carries the mesh.
  """
  return jax.device_put(state, NamedSharding(mesh, P()))


PARALLEL_MODES = ('jit', 'shard_map')
_DEPRECATED_PARALLEL = {'pmap': 'shard_map'}


def parallel_mode(train_cfg: ml_collections.ConfigDict) -> str:
  """`train.parallel`, checked; the old name 'pmap' is read as 'shard_map' with a warning."""
  mode = train_cfg.parallel
  if mode in _DEPRECATED_PARALLEL:
    logging.warning("train.parallel=%r is deprecated (the step runs shard_map); use %r.",
                    mode, _DEPRECATED_PARALLEL[mode])
    mode = _DEPRECATED_PARALLEL[mode]
  if mode not in PARALLEL_MODES:
    raise ValueError(f'Unknown train.parallel {mode!r}; choose one of {PARALLEL_MODES}.')
  return mode


def axis_name_for(train_cfg: ml_collections.ConfigDict) -> str | None:
  """The mapped axis the model's BatchNorm averages over: 'batch' under shard_map."""
  return AXIS if parallel_mode(train_cfg) == 'shard_map' else None


def make_train_step(config: ml_collections.ConfigDict, mesh: Mesh,
                    schedule: optax.Schedule) -> Callable:
  """The jitted, state-donating train step for `config.train.parallel`.

  The model inside `state.apply_fn` must be built with `axis_name_for(config.train)`. Pass it
  a state placed with `replicate(state, mesh)`, so that it compiles once.
  """
  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P(AXIS))
  axis_name = axis_name_for(config.train)
  body = functools.partial(train_step, config=config, schedule=schedule, axis_name=axis_name)
  if axis_name is None:
    return jax.jit(body, in_shardings=(replicated, sharded, replicated),
                   out_shardings=(replicated, replicated), donate_argnums=0)
  mapped = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(AXIS), P()),
                         out_specs=(P(), P()), check_vma=False)
  return jax.jit(mapped, donate_argnums=0)


# ----------------------------------------------------------------------------- training loop

class Stopped(Exception):
  """Training stopped by a signal; the newest checkpoint (if any step ran) is saved."""

  def __init__(self, signum: int, step: int | None):
    where = f'after step {step} (checkpoint saved)' if step is not None else 'before step 1'
    super().__init__(f'Stopped by signal {signum} {where}; rerun the same command to resume.')
    self.signum, self.step = signum, step


class _StopRequested:
  """Turns SIGTERM / SIGINT into a flag checked between steps (a checkpoint is then saved)."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: signals cannot be handled here
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    logging.warning('Signal %d received: saving a checkpoint and stopping.', signum)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _batch_stream(dataset: 'data_lib.Dataset', config: ml_collections.ConfigDict,
                  steps_per_epoch: int, start_step: int) -> Iterator[dict[str, np.ndarray]]:
  """Training batches from `start_step` on; the order depends only on (seed, epoch, step)."""
  epoch, skip = divmod(start_step, steps_per_epoch)
  while True:
    batches = dataset.batches(config.train.batch_size, seed=config.seed, epoch=epoch,
                              shuffle=True, drop_remainder=config.data.drop_remainder,
                              process_index=jax.process_index(),
                              process_count=jax.process_count())
    for i, batch in enumerate(batches):
      if i >= skip:
        yield batch
    skip = 0
    epoch += 1


def _changes_since_start(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """'section.key: old -> new' for each setting of `config` that differs from the workdir's."""
  if not os.path.exists(os.path.join(workdir, checkpointing.CONFIG_FILE)):
    return []
  then = checkpointing.flatten_config(checkpointing.load_config(workdir))
  # Through JSON, as config.json holds it (tuples become lists).
  now = checkpointing.flatten_config(json.loads(config.to_json_best_effort()))
  return [f'{k}: {then.get(k)!r} -> {now.get(k)!r}'
          for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)]


def _state_dict(state: TrainState) -> dict[str, Any]:
  return {'step': state.step, 'params': state.params, 'batch_stats': state.batch_stats,
          'opt_state': state.opt_state}


def _all_finite(tree) -> bool:
  return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree_util.tree_leaves(tree))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains on `config.data.train_sets`, evaluates on `eval_sets`; resumes from `workdir`.

  SIGTERM / SIGINT, from data loading on, stop the run at the next step boundary after a
  checkpoint is saved (before the first step: nothing to save), raising `Stopped`.

  Returns:
    The final evaluation results (also written to workdir/eval_<sets>.{json,md}); {} when
    `train.halt_after_steps` stopped the run.
  """
  with _StopRequested() as stop:
    return _train_and_evaluate(config, workdir, stop)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        stop: '_StopRequested') -> dict[str, Any]:
  config_check.check(config)
  os.makedirs(workdir, exist_ok=True)
  train_ds, eval_ds = data_lib.load_datasets(config, workdir)
  if stop.signum is not None:
    raise Stopped(stop.signum, None)
  devices = jax.devices()
  if config.train.num_devices > 0:
    if config.train.num_devices > len(devices):
      raise ValueError(f'train.num_devices={config.train.num_devices} but only '
                       f'{len(devices)} devices are available.')
    devices = devices[:config.train.num_devices]
  if config.train.batch_size % len(devices):
    raise ValueError(f'train.batch_size={config.train.batch_size} must be divisible by the '
                     f'{len(devices)} devices.')
  per_epoch = len(train_ds.frames) / config.train.batch_size
  steps_per_epoch = (math.floor(per_epoch) if config.data.drop_remainder
                     else math.ceil(per_epoch))
  if steps_per_epoch < 1:
    raise ValueError(f'{len(train_ds.frames)} training frames are fewer than one batch of '
                     f'{config.train.batch_size}.')
  total_steps = (config.train.num_steps if config.train.num_steps > 0
                 else config.train.num_epochs * steps_per_epoch)
  eval_every = max(1, config.train.eval_every_epochs * steps_per_epoch)
  evaluating = len(eval_ds.frames) > 0   # data.eval_sets=() trains a final model on everything
  logging.info('Training on %d frames (%d steps/epoch, %d steps), evaluating on %d frames; '
               '%d device(s), parallel=%s', len(train_ds.frames), steps_per_epoch,
               total_steps, len(eval_ds.frames), len(devices), config.train.parallel)

  mesh = make_mesh(devices)
  model = models.get_model(config.model, axis_name=axis_name_for(config.train))
  eval_model = models.get_model(config.model)
  key = jax.random.key(config.seed)
  init_key, step_key = jax.random.split(key)
  state = create_train_state(config, model, init_key, total_steps)
  schedule = learning_rate_schedule(config.train, total_steps)
  checkpointer = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  try:
    restored = checkpointer.restore_latest(_state_dict(state), config.train.resume_fallback)
  except checkpointing.CheckpointError as e:
    changed = _changes_since_start(config, workdir)
    raise checkpointing.CheckpointError(
        f'{e} Changed since the run started: {"; ".join(changed) or "nothing recorded"}. '
        f'Resume with the settings in {os.path.join(workdir, checkpointing.CONFIG_FILE)}, or '
        'start a new --workdir.') from e
  # Written once the workdir's checkpoint is known to fit, so that a refused resume leaves
  # the run's own config.json in place.
  checkpointing.save_config(config, workdir)
  if restored is not None:
    state_dict, meta = restored
    state = state.replace(step=state_dict['step'], params=state_dict['params'],
                          batch_stats=state_dict['batch_stats'],
                          opt_state=state_dict['opt_state'])
    logging.info('Resumed from step %d (%s).', int(state.step), meta)
  batch_sharding = NamedSharding(mesh, P(AXIS))
  state = replicate(state, mesh)
  step_fn = make_train_step(config, mesh, schedule)
  predict_fn = evaluate_lib.make_predict_fn(eval_model)
  start_step = int(state.step)
  stream = _batch_stream(train_ds, config, steps_per_epoch, start_step)
  writer = metric_writer.MetricWriter(workdir, config.train.tensorboard, start_step)
  halt_at = (start_step + config.train.halt_after_steps
             if config.train.halt_after_steps > 0 else None)
  last_eval: dict[str, Any] | None = None
  ckpt_meta = lambda step: {'kind': 'train_state', 'step': step, 'seed': config.seed,
                            'epoch': step // steps_per_epoch, 'steps_per_epoch': steps_per_epoch}

  def save(step: int) -> None:
    host_state = jax.device_get(_state_dict(state))
    if not _all_finite(host_state['params']):
      raise FloatingPointError(f'Non-finite parameters at step {step}; not saved. The last '
                               f'good checkpoint in {workdir}/checkpoints stays.')
    checkpointer.save_latest(step, host_state, ckpt_meta(step))

  def run_eval(step: int) -> dict[str, Any]:
    variables = {'params': state.params}
    if state.batch_stats:
      variables['batch_stats'] = state.batch_stats
    results, predictions = evaluate_lib.evaluate_dataset(predict_fn, variables, eval_ds, config)
    head = evaluate_lib.headline(results)
    checkpointer.save_best(step, jax.device_get(variables), head['dice'],
                           {'kind': 'variables', 'step': step, **head})
    writer.write(step, 'eval', head)
    writer.images(step, 'eval/overlays', [image for _, image in plots.overlays(
        eval_ds.frames, predictions, config.train.tensorboard_images)])
    logging.info('step %d eval: %s', step, evaluate_lib.summary_line(results))
    results['_predictions'] = predictions
    results['_step'] = step
    return results

  window_start, window_images = time.time(), 0
  run_start = time.time()
  step = start_step
  while step < total_steps:
    batch = next(stream)
    device_batch = {k: jax.make_array_from_process_local_data(batch_sharding, batch[k])
                    for k in ('image', 'mask', 'valid')}
    state, step_metrics = step_fn(state, device_batch, step_key)
    step += 1
    window_images += int(np.sum(batch['valid'])) * jax.process_count()
    if step % config.train.log_every == 0 or step == total_steps:
      host = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
      if not all(math.isfinite(v) for v in host.values()):
        raise FloatingPointError(
            f'Non-finite training metrics at step {step}: {host}. Stopping; the last good '
            f'checkpoint in {workdir}/checkpoints stays.')
      elapsed = time.time() - window_start
      ips = window_images / max(elapsed, 1e-9)
      eta = (total_steps - step) * config.train.batch_size / max(ips, 1e-9)
      logging.info('step %d/%d  loss %.4f  dice %.4f  lr %.2e  %.1f img/s  ETA %s', step,
                   total_steps, host['loss'], host['dice'], host['learning_rate'], ips,
                   _format_seconds(eta))
      writer.write(step, 'train', {**host, 'images_per_sec': ips,
                                   'elapsed_s': time.time() - run_start})
      window_start, window_images = time.time(), 0
    if step % config.train.checkpoint_every_steps == 0:
      save(step)
    if evaluating and step % eval_every == 0 and step < total_steps:
      last_eval = run_eval(step)
    if stop.signum is not None or (halt_at is not None and step >= halt_at):
      save(step)
      checkpointer.close()
      writer.close()
      logging.warning('Stopped at step %d; rerun the same command to resume.', step)
      if stop.signum is not None:
        raise Stopped(stop.signum, step)
      return {}
  save(step)
  if not evaluating:
    writer.close()
    plots.training_curves(writer.path, os.path.join(workdir, 'training_curves.png'))
    checkpointer.close()
    logging.info('Done in %s; no evaluation set (data.eval_sets is empty): the final model is '
                 'the latest checkpoint.', _format_seconds(time.time() - run_start))
    return {}
  if last_eval is None or last_eval.get('_step') != step:
    last_eval = run_eval(step)
  predictions = last_eval.pop('_predictions')
  last_eval.pop('_step')
  name = 'eval_' + '+'.join(config.data.eval_sets)
  results_lib.write_results(last_eval, workdir, name)
  writer.close()
  plots.training_curves(writer.path, os.path.join(workdir, 'training_curves.png'))
  plots.overlay_grid(eval_ds.frames, predictions, os.path.join(workdir, 'val_overlays.png'),
                     max_items=config.train.num_overlays)
  checkpointer.close()
  logging.info('Done in %s. %s. Results: %s/%s.md', _format_seconds(time.time() - run_start),
               evaluate_lib.summary_line(last_eval), workdir, name)
  return last_eval


def _format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h:d}:{m:02d}:{s:02d}'
