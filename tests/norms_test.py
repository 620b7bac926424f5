"""Normalization layers against NumPy formulas, PyTorch layers and Flax's built-ins."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, PartitionSpec as P

from lvseg_jax import norms

EPS = 1e-5


def _rand(shape, seed=0, loc=0.0, scale=1.0):
  return np.random.default_rng(seed).normal(loc, scale, shape).astype(np.float32)


def _np_norm(x, axes, eps=EPS):
  mean = x.mean(axis=axes, keepdims=True, dtype=np.float64)
  var = x.var(axis=axes, keepdims=True, dtype=np.float64)
  return ((x - mean) / np.sqrt(var + eps)).astype(np.float32)


def _to_torch(x):  # NHWC -> NCHW
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _from_torch(t):
  return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def _set_affine(variables, scale, bias):
  params = dict(variables['params'])
  params['scale'] = jnp.asarray(scale)
  params['bias'] = jnp.asarray(bias)
  return {**variables, 'params': params}


# ------------------------------------------------------------------- BatchNorm

def test_batchnorm_train_output_matches_numpy():
  x = _rand((4, 6, 5, 3), loc=2.0, scale=3.0)
  scale, bias = _rand((3,), 1), _rand((3,), 2)
  layer = norms.BatchNorm(use_running_average=False)
  variables = _set_affine(layer.init(jax.random.key(0), x), scale, bias)
  y, _ = layer.apply(variables, x, mutable=['batch_stats'])
  expected = _np_norm(x, (0, 1, 2)) * scale + bias
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('unbiased', [False, True])
def test_batchnorm_running_stats_follow_documented_formula(unbiased):
  layer = norms.BatchNorm(use_running_average=False, momentum=0.8,
                          unbiased_running_var=unbiased)
  variables = layer.init(jax.random.key(0), _rand((2, 4, 4, 3)))
  mean, var = np.zeros(3), np.ones(3)
  for step in range(4):
    x = _rand((3, 4, 5, 3), seed=step + 10, loc=step, scale=step + 1.0)
    _, updates = layer.apply(variables, x, mutable=['batch_stats'])
    variables = {**variables, **updates}
    batch_var = x.reshape(-1, 3).var(axis=0, ddof=1 if unbiased else 0)
    mean = 0.8 * mean + 0.2 * x.reshape(-1, 3).mean(axis=0)
    var = 0.8 * var + 0.2 * batch_var
  np.testing.assert_allclose(variables['batch_stats']['mean'], mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(variables['batch_stats']['var'], var, rtol=1e-5, atol=1e-5)


def test_batchnorm_matches_pytorch_train_eval_and_running_stats():
  """PyTorch momentum 0.1 == our 0.9; `unbiased_running_var` gives PyTorch's running_var."""
  c = 4
  torch_bn = torch.nn.BatchNorm2d(c, eps=EPS, momentum=0.1)
  scale, bias = _rand((c,), 1), _rand((c,), 2)
  with torch.no_grad():
    torch_bn.weight.copy_(torch.from_numpy(scale))
    torch_bn.bias.copy_(torch.from_numpy(bias))
  layer = norms.BatchNorm(momentum=0.9, epsilon=EPS, unbiased_running_var=True)
  variables = _set_affine(layer.init(jax.random.key(0), _rand((1, 4, 4, c)),
                                     use_running_average=False), scale, bias)
  torch_bn.train()
  for step in range(5):
    x = _rand((3, 7, 6, c), seed=step, loc=1.5, scale=2.0)
    y, updates = layer.apply(variables, x, use_running_average=False, mutable=['batch_stats'])
    variables = {**variables, **updates}
    np.testing.assert_allclose(y, _from_torch(torch_bn(_to_torch(x))), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(variables['batch_stats']['mean'],
                             torch_bn.running_mean.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(variables['batch_stats']['var'],
                             torch_bn.running_var.numpy(), rtol=1e-5, atol=1e-5)
  torch_bn.eval()
  x = _rand((2, 5, 5, c), seed=99)
  y = layer.apply(variables, x, use_running_average=True)
  np.testing.assert_allclose(y, _from_torch(torch_bn(_to_torch(x))), rtol=1e-4, atol=1e-4)


def test_batchnorm_default_convention_matches_flax():
  c = 3
  ours = norms.BatchNorm(momentum=0.9, epsilon=EPS)
  flax_bn = nn.BatchNorm(momentum=0.9, epsilon=EPS)
  v_ours = ours.init(jax.random.key(0), _rand((1, 4, 4, c)), use_running_average=False)
  v_flax = flax_bn.init(jax.random.key(0), _rand((1, 4, 4, c)), use_running_average=False)
  for step in range(3):
    x = _rand((4, 5, 5, c), seed=step, loc=-1.0, scale=0.5)
    y1, u1 = ours.apply(v_ours, x, use_running_average=False, mutable=['batch_stats'])
    y2, u2 = flax_bn.apply(v_flax, x, use_running_average=False, mutable=['batch_stats'])
    v_ours, v_flax = {**v_ours, **u1}, {**v_flax, **u2}
    np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)
  for key in ('mean', 'var'):
    np.testing.assert_allclose(v_ours['batch_stats'][key], v_flax['batch_stats'][key],
                               rtol=1e-6, atol=1e-6)
  x = _rand((2, 5, 5, c), seed=7)
  np.testing.assert_allclose(ours.apply(v_ours, x, use_running_average=True),
                             flax_bn.apply(v_flax, x, use_running_average=True),
                             rtol=1e-5, atol=1e-5)


def test_batchnorm_init_does_not_update_stats_and_eval_does_not_mutate():
  layer = norms.BatchNorm()
  x = _rand((2, 4, 4, 2), loc=5.0)
  variables = layer.init(jax.random.key(0), x, use_running_average=False)
  np.testing.assert_array_equal(variables['batch_stats']['mean'], np.zeros(2))
  np.testing.assert_array_equal(variables['batch_stats']['var'], np.ones(2))
  _, updates = layer.apply(variables, x, use_running_average=True, mutable=['batch_stats'])
  np.testing.assert_array_equal(updates['batch_stats']['mean'], np.zeros(2))


def test_bfloat16_statistics_in_float32_and_variance_nonnegative():
  # A large offset with a small spread, where E[x^2] - E[x]^2 cancels catastrophically (that
  # formula gives outputs off by ~100 here). Oracle: the float64 formula on the same float32
  # input. Bound: a float32 sum of n values near 1e3 errs by at most n * 2^-24 * 1e3 per value
  # of the mean, 256 * 6e-8 * 1e3 = 0.015 in x; divided by the spread 0.1 that is 0.15 in y,
  # a worst case that round-off far from attains.
  x = (1e3 + _rand((4, 8, 8, 2), scale=0.1)).astype(np.float32)
  for layer, axes in ((norms.BatchNorm(use_running_average=False), (0, 1, 2)),
                      (norms.LayerNorm(), (1, 2, 3)), (norms.InstanceNorm(), (1, 2))):
    variables = layer.init(jax.random.key(0), x)
    y = layer.apply(variables, x, mutable=['batch_stats'])
    y = y[0] if isinstance(y, tuple) else y
    x64 = x.astype(np.float64)
    want = (x64 - x64.mean(axes, keepdims=True)) / np.sqrt(x64.var(axes, keepdims=True)
                                                           + layer.epsilon)
    np.testing.assert_allclose(np.asarray(y), want, atol=0.15, err_msg=type(layer).__name__)
  xb = jnp.asarray(_rand((2, 8, 8, 4), loc=1.0), jnp.bfloat16)
  layer = norms.InstanceNorm()
  variables = layer.init(jax.random.key(0), xb)
  y = layer.apply(variables, xb)
  assert y.dtype == jnp.bfloat16
  x32 = np.asarray(xb.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(y, np.float32), _np_norm(x32, (1, 2)), atol=2e-2)
  bn = norms.BatchNorm(use_running_average=False)
  v = bn.init(jax.random.key(0), xb)
  _, upd = bn.apply(v, xb, mutable=['batch_stats'])
  assert upd['batch_stats']['mean'].dtype == jnp.float32
  np.testing.assert_allclose(upd['batch_stats']['mean'],
                             0.1 * x32.reshape(-1, 4).mean(0), rtol=1e-5)


# ------------------------------------------------------------------- InstanceNorm / LayerNorm

def test_instancenorm_matches_numpy_pytorch_and_flax():
  c = 3
  x = _rand((2, 6, 7, c), loc=3.0, scale=2.0)
  scale, bias = _rand((c,), 1), _rand((c,), 2)
  layer = norms.InstanceNorm(epsilon=EPS)
  variables = _set_affine(layer.init(jax.random.key(0), x), scale, bias)
  y = np.asarray(layer.apply(variables, x))
  np.testing.assert_allclose(y, _np_norm(x, (1, 2)) * scale + bias, rtol=1e-5, atol=1e-5)
  torch_in = torch.nn.InstanceNorm2d(c, eps=EPS, affine=True)
  with torch.no_grad():
    torch_in.weight.copy_(torch.from_numpy(scale))
    torch_in.bias.copy_(torch.from_numpy(bias))
  for mode in (torch_in.train, torch_in.eval):  # no running stats: both modes agree
    mode()
    np.testing.assert_allclose(y, _from_torch(torch_in(_to_torch(x))), rtol=1e-4, atol=1e-4)
  flax_in = nn.InstanceNorm(epsilon=EPS)
  fv = flax_in.init(jax.random.key(0), x)
  fv = {'params': {'scale': jnp.asarray(scale), 'bias': jnp.asarray(bias)}}
  np.testing.assert_allclose(y, flax_in.apply(fv, x), rtol=1e-5, atol=1e-5)


def test_layernorm_over_hwc_matches_numpy_pytorch_and_flax():
  c = 4
  x = _rand((3, 5, 6, c), loc=-2.0, scale=4.0)
  scale, bias = _rand((c,), 1), _rand((c,), 2)
  layer = norms.LayerNorm(epsilon=EPS)
  variables = _set_affine(layer.init(jax.random.key(0), x), scale, bias)
  y = np.asarray(layer.apply(variables, x))
  np.testing.assert_allclose(y, _np_norm(x, (1, 2, 3)) * scale + bias, rtol=1e-5, atol=1e-5)
  torch_ln = torch.nn.LayerNorm([c, 5, 6], eps=EPS)
  with torch.no_grad():  # PyTorch's affine is per element: broadcast our per-channel one
    torch_ln.weight.copy_(torch.from_numpy(np.broadcast_to(scale[:, None, None], (c, 5, 6)).copy()))
    torch_ln.bias.copy_(torch.from_numpy(np.broadcast_to(bias[:, None, None], (c, 5, 6)).copy()))
  for mode in (torch_ln.train, torch_ln.eval):
    mode()
    np.testing.assert_allclose(y, _from_torch(torch_ln(_to_torch(x))), rtol=1e-4, atol=1e-4)
  flax_ln = nn.LayerNorm(epsilon=EPS, reduction_axes=(1, 2, 3), feature_axes=-1)
  fv = {'params': {'scale': jnp.asarray(scale), 'bias': jnp.asarray(bias)}}
  np.testing.assert_allclose(y, flax_ln.apply(fv, x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------- InstanceBatchNorm

def test_ibn_split_matches_pytorch_ibn_a():
  c, ratio = 6, 0.5
  half = 3
  x = _rand((4, 5, 5, c), loc=1.0, scale=2.0)
  layer = norms.InstanceBatchNorm(mode='split', ratio=ratio)
  variables = layer.init(jax.random.key(0), x, use_running_average=False)
  assert set(variables['params']) == {'instance', 'batch'}
  assert set(variables['batch_stats']) == {'batch'}
  assert variables['params']['instance']['scale'].shape == (half,)
  assert variables['params']['batch']['scale'].shape == (c - half,)
  t_in = torch.nn.InstanceNorm2d(half, eps=EPS, affine=True)
  t_bn = torch.nn.BatchNorm2d(c - half, eps=EPS, momentum=0.1)
  params = jax.tree_util.tree_map(np.asarray, variables['params'])
  params['instance']['scale'] = _rand((half,), 3)
  params['batch']['bias'] = _rand((c - half,), 4)
  with torch.no_grad():
    t_in.weight.copy_(torch.from_numpy(params['instance']['scale']))
    t_bn.bias.copy_(torch.from_numpy(params['batch']['bias']))
  variables = {**variables, 'params': params}
  y, _ = layer.apply(variables, x, use_running_average=False, mutable=['batch_stats'])
  xt = _to_torch(x)
  expected = torch.cat([t_in(xt[:, :half]), t_bn(xt[:, half:])], dim=1)
  np.testing.assert_allclose(y, _from_torch(expected), rtol=1e-4, atol=1e-4)


def test_ibn_sequential_and_blend_match_numpy():
  x = _rand((4, 6, 6, 4), loc=2.0, scale=3.0)
  seq = norms.InstanceBatchNorm(mode='sequential')
  v = seq.init(jax.random.key(0), x, use_running_average=False)
  y, _ = seq.apply(v, x, use_running_average=False, mutable=['batch_stats'])
  np.testing.assert_allclose(y, _np_norm(_np_norm(x, (1, 2)), (0, 1, 2)), atol=1e-4)

  blend = norms.InstanceBatchNorm(mode='blend')
  v = blend.init(jax.random.key(0), x, use_running_average=False)
  rho = np.array([0.0, 0.25, 1.0, 1.7], np.float32)  # 1.7 is clipped to 1
  v = {**v, 'params': {**v['params'], 'rho': jnp.asarray(rho)}}
  y, _ = blend.apply(v, x, use_running_average=False, mutable=['batch_stats'])
  r = np.clip(rho, 0, 1)
  expected = r * _np_norm(x, (0, 1, 2)) + (1 - r) * _np_norm(x, (1, 2))
  np.testing.assert_allclose(y, expected, atol=1e-4)


def test_ibn_rejects_bad_mode_and_ratio():
  x = _rand((2, 4, 4, 4))
  with pytest.raises(ValueError, match='split'):
    norms.InstanceBatchNorm(mode='nope').init(jax.random.key(0), x, use_running_average=False)
  with pytest.raises(ValueError, match='ratio'):
    norms.InstanceBatchNorm(ratio=1.0).init(jax.random.key(0), x, use_running_average=False)
  with pytest.raises(ValueError, match='batch'):
    norms.get_norm('groupish')


# ------------------------------------------------------------------- cross-device BatchNorm

def _global_reference(x, variables):
  layer = norms.BatchNorm(use_running_average=False)
  return layer.apply(variables, x, mutable=['batch_stats'])


@pytest.mark.parametrize('num_devices', [2, 8])
def test_batchnorm_pmap_equals_global_batch(num_devices):
  assert jax.device_count() >= num_devices
  x = _rand((num_devices * 3, 4, 4, 5), loc=1.0, scale=2.0)
  layer = norms.BatchNorm(use_running_average=False, axis_name='batch')
  variables = norms.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
  y_ref, upd_ref = _global_reference(x, variables)

  def step(v, xs):
    return layer.apply(v, xs, mutable=['batch_stats'])

  rep = jax.tree_util.tree_map(lambda a: np.stack([a] * num_devices), variables)
  y, upd = jax.pmap(step, axis_name='batch', devices=jax.devices()[:num_devices])(
      rep, x.reshape(num_devices, -1, *x.shape[1:]))
  np.testing.assert_allclose(np.asarray(y).reshape(x.shape), y_ref, rtol=1e-5, atol=1e-5)
  for key in ('mean', 'var'):
    for d in range(num_devices):
      np.testing.assert_allclose(upd['batch_stats'][key][d], upd_ref['batch_stats'][key],
                                 rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('num_devices', [2, 8])
def test_batchnorm_shard_map_equals_global_batch(num_devices):
  x = _rand((num_devices * 2, 4, 4, 3), loc=-1.0, scale=3.0)
  layer = norms.BatchNorm(use_running_average=False, axis_name='batch')
  variables = norms.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
  y_ref, upd_ref = _global_reference(x, variables)
  mesh = Mesh(np.array(jax.devices()[:num_devices]), ('batch',))

  def step(v, xs):
    return layer.apply(v, xs, mutable=['batch_stats'])

  sharded = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P('batch')),
                                  out_specs=(P('batch'), P())))
  y, upd = sharded(variables, x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for key in ('mean', 'var'):
    np.testing.assert_allclose(upd['batch_stats'][key], upd_ref['batch_stats'][key],
                               rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------- gradients

PROJECTION_SEED = 123


def _grads(layer, variables, x, **kwargs):
  """d/d(params, x) of a fixed random projection of the layer output."""
  w = jnp.asarray(_rand(x.shape, seed=PROJECTION_SEED))

  def f(params, x):
    out = layer.apply({**variables, 'params': params}, x, mutable=['batch_stats'], **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    return jnp.sum(jnp.sin(out) * w)

  return jax.grad(f, argnums=(0, 1))(variables['params'], jnp.asarray(x))


@pytest.mark.parametrize('which', ['batch', 'layer', 'instance'])
def test_gradients_match_flax_autodiff(which):
  """Our layers' gradients (input and affine) equal autodiff through Flax's built-ins."""
  x = _rand((3, 6, 5, 4), loc=1.0, scale=2.0)
  scale, bias = _rand((4,), 1), _rand((4,), 2)
  ours, theirs, kwargs = {
      'batch': (norms.BatchNorm(), nn.BatchNorm(epsilon=EPS), {'use_running_average': False}),
      'layer': (norms.LayerNorm(), nn.LayerNorm(epsilon=EPS, reduction_axes=(1, 2, 3),
                                                feature_axes=-1), {}),
      'instance': (norms.InstanceNorm(), nn.InstanceNorm(epsilon=EPS), {}),
  }[which]
  v_ours = _set_affine(ours.init(jax.random.key(0), x, **kwargs), scale, bias)
  v_theirs = _set_affine(theirs.init(jax.random.key(0), x, **kwargs), scale, bias)
  (gp1, gx1), (gp2, gx2) = _grads(ours, v_ours, x, **kwargs), _grads(theirs, v_theirs, x,
                                                                     **kwargs)
  np.testing.assert_allclose(gx1, gx2, rtol=1e-4, atol=1e-5)
  for key in ('scale', 'bias'):
    np.testing.assert_allclose(gp1[key], gp2[key], rtol=1e-4, atol=1e-5)


def _np_norm_grads(x, g, scale, axes):
  """Float64 textbook gradients of y = x_hat * scale + bias for an upstream gradient g."""
  x, g = x.astype(np.float64), g.astype(np.float64)
  mean = x.mean(axis=axes, keepdims=True)
  inv = 1.0 / np.sqrt(x.var(axis=axes, keepdims=True) + EPS)
  x_hat = (x - mean) * inv
  g_hat = g * scale
  count = np.prod([x.shape[a] for a in axes])
  dx = inv / count * (count * g_hat - g_hat.sum(axis=axes, keepdims=True)
                      - x_hat * (g_hat * x_hat).sum(axis=axes, keepdims=True))
  return dx, (g * x_hat).sum(axis=(0, 1, 2)), g.sum(axis=(0, 1, 2))


@pytest.mark.parametrize('which', ['batch', 'layer', 'instance'])
def test_gradients_match_float64_formula_when_the_mean_dominates(which):
  """Activations far from zero mean (mean 10 std) are where the sums could cancel."""
  x = _rand((4, 8, 8, 3), seed=3, loc=10.0)
  scale, bias = _rand((3,), 1), _rand((3,), 2)
  layer, axes, kwargs = {
      'batch': (norms.BatchNorm(), (0, 1, 2), {'use_running_average': False}),
      'layer': (norms.LayerNorm(), (1, 2, 3), {}),
      'instance': (norms.InstanceNorm(), (1, 2), {}),
  }[which]
  variables = _set_affine(layer.init(jax.random.key(0), x, **kwargs), scale, bias)
  gp, gx = _grads(layer, variables, x, **kwargs)
  y = _np_norm(x, axes).astype(np.float64) * scale + bias
  upstream = np.cos(y) * _rand(x.shape, seed=PROJECTION_SEED)  # d/dy of _grads' projection
  dx, dscale, dbias = _np_norm_grads(x, upstream, scale, axes)
  # float32 rounding of the forward's E[x^2] - E[x]^2 variance alone is 1e-5 to 3e-5 of the
  # largest gradient here.
  np.testing.assert_allclose(gx, dx, rtol=1e-3, atol=1e-4 * np.abs(dx).max())
  np.testing.assert_allclose(gp['scale'], dscale, rtol=1e-3, atol=1e-4 * np.abs(dscale).max())
  np.testing.assert_allclose(gp['bias'], dbias, rtol=1e-3, atol=1e-4 * np.abs(dbias).max())


def test_batchnorm_gradients_match_pytorch_backward():
  c = 3
  x = _rand((4, 5, 6, c), loc=-1.0, scale=1.5)
  w = _rand(x.shape, seed=9)
  layer = norms.BatchNorm(use_running_average=False)
  variables = layer.init(jax.random.key(0), x)

  def f(params, x):
    y, _ = layer.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
    return jnp.sum(y * y * w)

  gp, gx = jax.grad(f, argnums=(0, 1))(variables['params'], jnp.asarray(x))
  bn = torch.nn.BatchNorm2d(c, eps=EPS)
  xt = _to_torch(x).requires_grad_(True)
  yt = bn(xt)
  (yt * yt * _to_torch(w)).sum().backward()
  np.testing.assert_allclose(gx, _from_torch(xt.grad), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gp['scale'], bn.weight.grad.numpy(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gp['bias'], bn.bias.grad.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('num_devices', [4])
def test_batchnorm_gradients_under_shard_map_equal_global_batch(num_devices):
  x = _rand((num_devices * 2, 4, 4, 3), loc=0.5, scale=2.0)
  w = jnp.asarray(_rand(x.shape, seed=5))
  plain = norms.BatchNorm(use_running_average=False)
  mapped = norms.BatchNorm(use_running_average=False, axis_name='batch')
  variables = plain.init(jax.random.key(0), x)

  def loss(layer, params, xs, ws):
    y, _ = layer.apply({**variables, 'params': params}, xs, mutable=['batch_stats'])
    return jnp.sum(jnp.sin(y) * ws)

  g_ref = jax.grad(functools.partial(loss, plain), argnums=(0, 1))(
      variables['params'], jnp.asarray(x), w)
  mesh = Mesh(np.array(jax.devices()[:num_devices]), ('batch',))

  def local(params, xs, ws):
    gp, gx = jax.grad(functools.partial(loss, mapped), argnums=(0, 1))(params, xs, ws)
    return jax.lax.psum(gp, 'batch'), gx

  gp, gx = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P('batch'), P('batch')),
                                 out_specs=(P(), P('batch')), check_vma=False))(
                                     variables['params'], x, w)
  np.testing.assert_allclose(gx, g_ref[1], rtol=1e-4, atol=1e-5)
  for key in ('scale', 'bias'):
    np.testing.assert_allclose(gp[key], g_ref[0][key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('num_devices', [1, 4])
def test_batchnorm_mask_takes_statistics_from_the_real_rows_only(num_devices):
  """Rows 2, 5 and 7 are padding (junk values): the masked layer's statistics and its output on
  the real rows equal the plain layer's on the real rows alone, on one device and under
  shard_map with a different number of real rows per device."""
  x = _rand((8, 4, 4, 3), loc=1.0, scale=2.0)
  valid = np.ones(8, bool)
  valid[[2, 5, 7]] = False
  x[~valid] = 1e3
  plain = norms.BatchNorm(use_running_average=False)
  variables = plain.init(jax.random.key(0), x)
  y_ref, upd_ref = plain.apply(variables, x[valid], mutable=['batch_stats'])
  mask = valid[:, None, None, None]
  if num_devices == 1:
    y, upd = plain.apply(variables, x, mask=mask, mutable=['batch_stats'])
  else:
    mapped = norms.BatchNorm(use_running_average=False, axis_name='batch')
    mesh = Mesh(np.array(jax.devices()[:num_devices]), ('batch',))
    step = lambda v, xs, ms: mapped.apply(v, xs, mask=ms, mutable=['batch_stats'])
    y, upd = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P('batch'), P('batch')),
                                   out_specs=(P('batch'), P())))(variables, x, mask)
  np.testing.assert_allclose(np.asarray(y)[valid], y_ref, rtol=1e-5, atol=1e-5)
  for key in ('mean', 'var'):
    np.testing.assert_allclose(upd['batch_stats'][key], upd_ref['batch_stats'][key],
                               rtol=1e-5, atol=1e-6)
