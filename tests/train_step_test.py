"""Train step: loss against NumPy, and the parallel variants against a single device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import smoke
from lvseg_jax import losses
from lvseg_jax import models
from lvseg_jax import train


def _config(name='ibu', parallel='jit', depth=2, width=4, size=16, optimizer='adam'):
  config = smoke.get_config()
  config.train.optimizer = optimizer
  config.model.name = name
  config.model.base_width = width
  config.model.depth = depth
  config.data.image_size = size
  config.augment.enabled = False   # identical batches on every path
  config.train.parallel = parallel
  config.train.warmup_steps = 0
  config.train.learning_rate = 1e-2
  return config


def _batch(n=8, size=16, seed=0):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]
  masks = np.stack([((yy - size / 2 - rng.integers(-2, 3))**2 +
                     (xx - size / 2 - rng.integers(-2, 3))**2 < rng.integers(9, 25))
                    for _ in range(n)]).astype(np.int32)
  images = (masks[..., None] + rng.normal(0, 0.3, (n, size, size, 1))).astype(np.float32)
  return {'image': images, 'mask': masks, 'valid': np.ones((n,), bool)}


@pytest.mark.parametrize('name', ['lnu', 'ibu'])
def test_padded_samples_change_neither_loss_nor_update(name):
  """Padding rows (valid=False, junk images) stay out of the loss and, for IBU-Net's BatchNorm,
  out of the batch statistics: the step equals the step on the unpadded batch."""
  config = _config(name)
  model = models.get_model(config.model)
  mesh = train.make_mesh(jax.devices()[:1])
  schedule = train.learning_rate_schedule(config.train, 10)
  state = train.create_train_state(config, model, jax.random.key(0), 10)
  batch = _batch(4)
  padded = {k: np.concatenate([v, np.zeros_like(v[:2]) if k != 'image'
                               else 100 + np.zeros_like(v[:2])]) for k, v in batch.items()}
  step = train.make_train_step(config, mesh, schedule)
  s1, m1 = step(jax.tree_util.tree_map(jnp.array, state), batch, jax.random.key(1))
  s2, m2 = step(jax.tree_util.tree_map(jnp.array, state), padded, jax.random.key(1))
  np.testing.assert_allclose(m1['loss'], m2['loss'], rtol=1e-6)
  # The masked sums add the same terms in another grouping: float32 rounding, 1e-6 relative.
  for a, b in zip(jax.tree_util.tree_leaves((s1.params, s1.batch_stats)),
                  jax.tree_util.tree_leaves((s2.params, s2.batch_stats))):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def _run(config, devices, batches, use_raw_pmap=False):
  model = models.get_model(config.model, axis_name=train.axis_name_for(config.train))
  schedule = train.learning_rate_schedule(config.train, 10)
  state = train.create_train_state(config, model, jax.random.key(0), 10)
  initial = jax.tree_util.tree_map(np.asarray, {'params': state.params,
                                                'batch_stats': state.batch_stats})
  key = jax.random.key(1)
  if use_raw_pmap:
    n = len(devices)
    body = jax.pmap(functools.partial(train.train_step, config=config, schedule=schedule,
                                      axis_name=train.AXIS),
                    axis_name=train.AXIS, devices=devices, in_axes=(0, 0, None))
    state = jax.tree_util.tree_map(lambda x: np.stack([np.asarray(x)] * n), state)
    for b in batches:
      local = {k: v.reshape(n, -1, *v.shape[1:]) for k, v in b.items()}
      state, _ = body(state, local, key)
    final = jax.tree_util.tree_map(lambda x: np.asarray(x[0]),
                                   {'params': state.params, 'batch_stats': state.batch_stats})
    return final, initial
  mesh = train.make_mesh(devices)
  step = train.make_train_step(config, mesh, schedule)
  sharding = NamedSharding(mesh, P(train.AXIS))
  state = train.replicate(state, mesh)
  for b in batches:
    state, metrics = step(state, {k: jax.device_put(v, sharding) for k, v in b.items()}, key)
    assert np.isfinite(float(metrics['loss']))
  final = jax.tree_util.tree_map(np.asarray,
                                 {'params': state.params, 'batch_stats': state.batch_stats})
  return final, initial


@pytest.mark.parametrize('num_devices, width, size', [(2, 4, 16), (8, 4, 16), (2, 16, 32)])
def test_single_jit_sharded_shard_map_and_pmap_steps_agree(num_devices, width, size):
  """Two SGD steps of IBU-Net (BatchNorm across devices) give the same parameter and
  running-statistic changes on one device, jit-sharded, under shard_map and under raw pmap."""
  assert jax.device_count() >= num_devices, 'conftest forces 8 host devices'
  batches = [_batch(8, size=size, seed=s) for s in range(2)]
  # SGD: the update is linear in the gradient, so float32 summation-order differences stay
  # of their own size (Adam's first step is g / |g|, which turns rounding of a near-zero
  # gradient into a full-size update and makes no tolerance derivable).
  config = lambda parallel: _config('ibu', parallel, depth=1, width=width, size=size,
                                    optimizer='sgd')
  single = _run(config('jit'), jax.devices()[:1], batches)
  variants = {
      'jit-sharded': _run(config('jit'), jax.devices()[:num_devices], batches),
      'shard_map': _run(config('shard_map'), jax.devices()[:num_devices], batches),
      'pmap': _run(config('shard_map'), jax.devices()[:num_devices], batches,
                   use_raw_pmap=True),
  }
  single, initial = single
  assert jax.tree_util.tree_leaves(single['batch_stats'])
  # Every change is a float32 sum over the batch's n = B*H*W pixels, computed in another
  # order on each path. A sum's rounding error grows like sqrt(n) * u * sum|terms| (u = 2^-24;
  # random-walk bound for blocked/tree sums), and sum|terms| is of the order of the largest
  # change in the leaf: 4 sqrt(n) u max|change| per path (two steps, each a forward and a
  # backward reduction). Storing the parameters rounds by u |p| per step: 2 u |p| per path.
  # Two paths, each off by up to that: the bound is twice the sum, about 4e-5 of the largest
  # change at n = 8192. Dropping the BatchNorm pmean (local statistics) exceeds it 500-1000x.
  u = 2.0**-24
  n = 8 * size * size
  flat_init = jax.tree_util.tree_leaves(initial)
  flat_single = jax.tree_util.tree_leaves_with_path(single)
  for name, (result, _) in variants.items():
    for (path, a), b, p0 in zip(flat_single, jax.tree_util.tree_leaves(result), flat_init):
      change = a - p0
      atol = 2 * (4 * np.sqrt(n) * u * np.abs(change).max() + 2 * u * np.abs(p0))
      excess = np.abs((b - p0) - change) / atol
      assert excess.max() <= 1.0, (f'{name} differs at {jax.tree_util.keystr(path)}: '
                                   f'{excess.max():.3g} x the bound')


def test_overfitting_one_batch_drives_the_loss_down():
  config = _config('ibu')
  config.train.learning_rate = 3e-2
  model = models.get_model(config.model)
  schedule = train.learning_rate_schedule(config.train, 60)
  mesh = train.make_mesh(jax.devices()[:1])
  state = train.replicate(train.create_train_state(config, model, jax.random.key(0), 60), mesh)
  step = train.make_train_step(config, mesh, schedule)
  batch = _batch(4)
  losses = []
  for _ in range(60):
    state, metrics = step(state, batch, jax.random.key(1))
    losses.append(float(metrics['loss']))
  assert losses[-1] < 0.3 * losses[0], losses[::10]
  assert float(metrics['dice']) > 0.8


@pytest.mark.parametrize('optimizer,weight_decay,clip', [('adam', 0.0, 0.0),
                                                         ('adamw', 1e-2, 0.5),
                                                         ('sgd', 1e-3, 0.1)])
def test_flattened_optimizer_gives_the_per_leaf_update(optimizer, weight_decay, clip):
  """`train.flatten_optimizer` changes how the state is stored, not the parameters it makes."""
  config = _config('ibu')
  config.train.optimizer = optimizer
  config.train.weight_decay = weight_decay
  config.train.grad_clip_norm = clip
  config.train.warmup_steps = 2
  model = models.get_model(config.model)
  schedule = train.learning_rate_schedule(config.train, 5)
  mesh = train.make_mesh(jax.devices()[:1])
  results = {}
  for flatten in (False, True):
    config.train.flatten_optimizer = flatten
    state = train.replicate(train.create_train_state(config, model, jax.random.key(0), 5), mesh)
    step = train.make_train_step(config, mesh, schedule)
    for seed in range(4):
      state, _ = step(state, _batch(4, seed=seed), jax.random.key(1))
    results[flatten] = state
  leaves = lambda tree: jax.tree_util.tree_leaves(tree)
  assert len(leaves(results[True].opt_state)) < len(leaves(results[False].opt_state))
  for a, b in zip(leaves(results[False].params), leaves(results[True].params)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_unknown_parallel_mode_is_a_clear_error():
  config = _config()
  config.train.parallel = 'ddp'
  with pytest.raises(ValueError, match=r"Unknown train.parallel 'ddp'.*'jit', 'shard_map'"):
    train.make_train_step(config, train.make_mesh(), lambda s: 0.0)


def test_pmap_is_a_deprecated_name_for_shard_map():
  config = _config(parallel='pmap')
  assert train.parallel_mode(config.train) == 'shard_map'
  assert train.axis_name_for(config.train) == train.AXIS


def test_deep_supervision_trains_its_heads_with_the_weighted_loss():
  """model.deep_supervision=1: the level-1 head's parameters move, and the step's loss is
  (output + level 1 / 2) / 1.5 of the two outputs' losses (the weighting itself is checked
  against NumPy in losses_test)."""
  config = _config('ibu')
  config.model.deep_supervision = 1
  model = models.get_model(config.model)
  mesh = train.make_mesh(jax.devices()[:1])
  schedule = train.learning_rate_schedule(config.train, 10)
  state = train.create_train_state(config, model, jax.random.key(0), 10)
  batch = _batch(4)
  step = train.make_train_step(config, mesh, schedule)
  new_state, metrics = step(jax.tree_util.tree_map(jnp.array, state), batch, jax.random.key(1))
  head = state.params['aux_head1']['kernel']
  assert np.abs(np.asarray(new_state.params['aux_head1']['kernel']) - head).max() > 1e-4
  logits, updates = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                                batch['image'], train=True, mask=batch['valid'],
                                mutable=['batch_stats', models.AUX_COLLECTION])
  up = jax.image.resize(models.aux_logits(updates)[1], logits.shape, method='bilinear')
  weights = config.train.ce_weight, config.train.dice_weight
  term = lambda z: sum(w * t for w, t in zip(weights, losses.per_sample_losses(z, batch['mask'])))
  expected = np.mean((term(logits) + 0.5 * term(up)) / 1.5)
  np.testing.assert_allclose(metrics['loss'], expected, rtol=1e-5)   # same float32 sums
