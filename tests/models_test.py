"""U-Net family: shapes, parameter counts, where state lives, configs, registry errors."""

import glob
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from lvseg_jax import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model_config(name, **overrides):
  cfg = default.get_config().model
  cfg.name = name
  cfg.base_width = 4
  cfg.depth = 2
  for key, value in overrides.items():
    setattr(cfg, key, value)
  return cfg


def _norm_layers(tree, prefix=()):
  """Yields (path, subtree) of every normalization layer (modules named norm0 / norm1)."""
  for key, value in tree.items():
    if key.startswith('norm'):
      yield prefix + (key,), value
    elif isinstance(value, dict):
      yield from _norm_layers(value, prefix + (key,))


@pytest.mark.parametrize('name', ['unet', 'lnu', 'ibu'])
def test_output_shapes_and_param_counts_at_128_and_256(name):
  cfg = _model_config(name)
  model = models.get_model(cfg)
  counts = []
  for size in (128, 256):
    variables = models.init_variables(model, jax.random.key(0), size)
    x = jnp.zeros((2, size, size, 1))
    out = model.apply(variables, x, train=False)
    assert out.shape == (2, size, size, cfg.num_classes)
    assert out.dtype == jnp.float32
    counts.append(models.count_params(variables['params']))
  assert counts[0] == counts[1]


def test_param_count_matches_formula():
  """Analytic count for the plain U-Net: convs, transposed convs and the head."""
  cfg = _model_config('unet', depth=3, base_width=5)
  variables = models.init_variables(models.get_model(cfg), jax.random.key(0), 64)
  w = [5 * 2**i for i in range(4)]
  conv = lambda cin, cout: 9 * cin * cout + cout
  total = 0
  cin = 1
  for level in range(4):                      # encoder + bottleneck
    total += conv(cin, w[level]) + conv(w[level], w[level])
    cin = w[level]
  for level in reversed(range(3)):            # decoder
    total += 4 * cin * w[level] + w[level]    # 2x2 transposed conv
    total += conv(2 * w[level], w[level]) + conv(w[level], w[level])
    cin = w[level]
  total += cin * 2 + 2                        # 1x1 head
  assert models.count_params(variables['params']) == total


@pytest.mark.parametrize('name,norm,expect_stats', [
    ('unet', 'none', False), ('unet', 'batch', True), ('lnu', 'none', False),
    ('ibu', 'none', True)])
def test_batch_stats_exactly_where_batchnorm_or_ibn(name, norm, expect_stats):
  cfg = _model_config(name, norm=norm)
  variables = models.init_variables(models.get_model(cfg), jax.random.key(0), 64)
  assert ('batch_stats' in variables) == expect_stats == models.has_batch_stats(cfg)
  param_norms = dict(_norm_layers(variables['params']))
  stat_norms = dict(_norm_layers(variables.get('batch_stats', {})))
  if name == 'unet' and norm == 'none':
    assert not param_norms
  if name == 'lnu':
    assert len(param_norms) == 2 * (2 * cfg.depth + 1)
    assert all(set(p) == {'scale', 'bias'} for p in param_norms.values())
  if expect_stats:
    # Every BatchNorm/IBN layer has running stats, and nothing else does.
    assert set(stat_norms) == set(param_norms)


def test_ibu_first_block_holds_instance_and_batch_parts():
  cfg = _model_config('ibu', base_width=8)
  variables = models.init_variables(models.get_model(cfg), jax.random.key(0), 64)
  for i in range(2):
    first = variables['params']['down0'][f'norm{i}']
    assert set(first) == {'instance', 'batch'}
    assert first['instance']['scale'].shape == (4,)   # ratio 0.5 of 8 channels
    assert first['batch']['scale'].shape == (4,)
    assert set(variables['batch_stats']['down0'][f'norm{i}']) == {'batch'}
  # Every other block is a plain BatchNorm.
  for block in ('down1', 'bottleneck', 'up0', 'up1'):
    assert set(variables['params'][block]['norm0']) == {'scale', 'bias'}
    assert set(variables['batch_stats'][block]['norm0']) == {'mean', 'var'}


def test_ibu_first_block_output_mixes_instance_and_batch_statistics():
  """Scaling one sample changes the instance half of block 0 differently from the BN half."""
  cfg = _model_config('ibu', base_width=4, depth=1)
  model = models.get_model(cfg)
  x = np.random.default_rng(0).normal(size=(2, 16, 16, 1)).astype(np.float32)
  variables = models.init_variables(model, jax.random.key(1), 16)
  _, state = model.apply(variables, x, train=True, mutable=['batch_stats', 'intermediates'])
  mean = state['batch_stats']['down0']['norm0']['batch']['mean']
  assert mean.shape == (2,) and np.all(np.isfinite(mean))
  assert not np.allclose(mean, 0.0)   # running stats really updated in train mode


@pytest.mark.parametrize('mode', ['split', 'sequential', 'blend'])
def test_ibn_modes_build_and_run(mode):
  cfg = _model_config('ibu', ibn_mode=mode)
  model = models.get_model(cfg)
  variables = models.init_variables(model, jax.random.key(0), 32)
  out, updates = model.apply(variables, jnp.ones((2, 32, 32, 1)), train=True,
                             mutable=['batch_stats'])
  assert out.shape == (2, 32, 32, 2) and np.all(np.isfinite(out))
  assert 'batch_stats' in updates


def test_train_and_eval_differ_only_for_stateful_models():
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 1)).astype(np.float32)
  for name, stateful in (('lnu', False), ('ibu', True)):
    model = models.get_model(_model_config(name))
    variables = models.init_variables(model, jax.random.key(0), 32)
    y_eval = model.apply(variables, x, train=False)
    y_train, _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
    assert np.allclose(y_eval, y_train, atol=1e-5) != stateful


def test_bfloat16_model_runs_with_float32_params_and_stats():
  cfg = _model_config('ibu', dtype='bfloat16')
  model = models.get_model(cfg)
  variables = models.init_variables(model, jax.random.key(0), 32)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
  out, updates = model.apply(variables, jnp.ones((2, 32, 32, 1)), train=True,
                             mutable=['batch_stats'])
  assert out.dtype == jnp.float32
  assert all(s.dtype == jnp.float32 for s in jax.tree_util.tree_leaves(updates))


def test_unknown_names_give_clear_errors():
  with pytest.raises(ValueError, match=r"Unknown model name 'vnet'.*ibu.*lnu.*unet"):
    models.get_model(_model_config('vnet'))
  with pytest.raises(ValueError, match='ibn_mode'):
    models.get_model(_model_config('ibu', ibn_mode='mixed'))
  with pytest.raises(ValueError, match='dtype'):
    models.get_model(_model_config('unet', dtype='float16x'))
  with pytest.raises(ValueError, match='divisible'):
    model = models.get_model(_model_config('unet'))
    models.init_variables(model, jax.random.key(0), 30)


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(REPO, 'configs', '*.py'))))
def test_every_config_loads_and_builds_its_model(path):
  if path.endswith('__init__.py'):
    return
  spec = importlib.util.spec_from_file_location('cfg', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.base_width = min(config.model.base_width, 4)   # build cheaply
  model = models.get_model(config.model)
  size = 2**config.model.depth * 2
  variables = models.init_variables(model, jax.random.key(0), size)
  out = model.apply(variables, jnp.zeros((1, size, size, 1)), train=False)
  assert out.shape == (1, size, size, config.model.num_classes)
  expected = {'unet.py': 'unet', 'lnu.py': 'lnu', 'ibu.py': 'ibu'}.get(os.path.basename(path))
  if expected:
    assert config.model.name == expected


def test_fast_pool_and_upconv_equal_flax_layers_in_value_and_gradient():
  """The CPU-friendly max pool / 2x2 transposed conv compute what nn.max_pool and
  nn.ConvTranspose compute, gradients included (ties in the pool too)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 8, 6, 3)).astype(np.float32)
  x[0, 0:2, 0:2, 0] = 1.0   # an exact tie inside one window
  w = rng.normal(size=(2, 4, 3, 3)).astype(np.float32)
  pool_ref = lambda a: jnp.sum(nn.max_pool(a, (2, 2), strides=(2, 2)) * w)
  pool_new = lambda a: jnp.sum(models.max_pool_2x2(a) * w)
  np.testing.assert_array_equal(models.max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))
  np.testing.assert_array_equal(jax.grad(pool_new)(x), jax.grad(pool_ref)(x))

  ref = nn.ConvTranspose(5, (2, 2), strides=(2, 2))
  new = models.UpConv2x2(5)
  variables = ref.init(jax.random.key(0), x)
  variables = jax.tree_util.tree_map(
      lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), variables)
  assert (jax.tree_util.tree_structure(new.init(jax.random.key(0), x)) ==
          jax.tree_util.tree_structure(variables))
  np.testing.assert_allclose(new.apply(variables, x), ref.apply(variables, x),
                             rtol=1e-5, atol=1e-5)
  wy = rng.normal(size=(2, 16, 12, 5)).astype(np.float32)
  g_new = jax.grad(lambda v, a: jnp.sum(new.apply(v, a) * wy), argnums=(0, 1))(variables, x)
  g_ref = jax.grad(lambda v, a: jnp.sum(ref.apply(v, a) * wy), argnums=(0, 1))(variables, x)
  for a, b in zip(jax.tree_util.tree_leaves(g_new), jax.tree_util.tree_leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _np_conv_kernel_grad(x, dy, kernel_size, padding):
  """dK[p, q, i, o] = sum over n, h, w of xpad[n, h + p, w + q, i] * dy[n, h, w, o]."""
  (lo_h, hi_h), (lo_w, hi_w) = padding
  xpad = np.pad(x.astype(np.float64), ((0, 0), (lo_h, hi_h), (lo_w, hi_w), (0, 0)))
  _, h, w, _ = dy.shape
  return np.stack([np.stack([np.einsum('nhwi,nhwo->io', xpad[:, p:p + h, q:q + w], dy)
                             for q in range(kernel_size[1])]) for p in range(kernel_size[0])])


@pytest.mark.parametrize('in_ch,out_ch,padding,swapped,size', [
    (6, 4, 'SAME', True, 3),              # few output channels, more input channels
    (20, 16, ((0, 2), (2, 0)), True, 3),  # asymmetric explicit padding
    (5, 3, 'VALID', True, 3),
    (16, 2, 'SAME', True, 1),             # the 1x1 head
    (4, 6, 'SAME', False, 3),             # more output than input channels: XLA's own gradient
    (40, 32, 'SAME', False, 3),           # more than 16 output channels
])
def test_conv_with_swapped_kernel_gradient_equals_lax(in_ch, out_ch, padding, swapped, size):
  """`models.conv_general_dilated` in nn.Conv: same output, input and kernel gradients as
  lax's convolution, and the kernel gradient against a NumPy sum over shifted windows."""
  rng = np.random.default_rng(in_ch)
  x = rng.normal(size=(3, 9, 7, in_ch)).astype(np.float32)
  plain = nn.Conv(out_ch, (size, size), padding=padding)
  custom = nn.Conv(out_ch, (size, size), padding=padding,
                   conv_general_dilated=models.conv_general_dilated)
  variables = plain.init(jax.random.key(0), x)
  out = plain.apply(variables, x)
  dy = rng.normal(size=out.shape).astype(np.float32)
  loss = lambda module: lambda v, a: jnp.sum(module.apply(v, a) * dy)
  np.testing.assert_allclose(custom.apply(variables, x), out, rtol=1e-5, atol=1e-5)
  g_custom = jax.grad(loss(custom), argnums=(0, 1))(variables, x)
  g_plain = jax.grad(loss(plain), argnums=(0, 1))(variables, x)
  for a, b in zip(jax.tree_util.tree_leaves(g_custom), jax.tree_util.tree_leaves(g_plain)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  pads = jax.lax.padtype_to_pads((9, 7), (size, size), (1, 1), padding) if isinstance(
      padding, str) else padding
  np.testing.assert_allclose(g_custom[0]['params']['kernel'],
                             _np_conv_kernel_grad(x, dy, (size, size), pads),
                             rtol=1e-4, atol=1e-4)
  jaxpr = str(jax.make_jaxpr(loss(custom))(variables, x))
  # Only XLA:CPU gets the swapped form (it was measured there); elsewhere lax's own gradient.
  assert ('custom_vjp' in jaxpr) == (swapped and jax.default_backend() == 'cpu')


def test_swapped_kernel_gradient_keeps_bfloat16_and_strided_convs_fall_back():
  x = jnp.ones((2, 8, 8, 8), jnp.bfloat16)
  conv = nn.Conv(4, (3, 3), padding='SAME', dtype=jnp.bfloat16, param_dtype=jnp.float32,
                 conv_general_dilated=models.conv_general_dilated)
  variables = conv.init(jax.random.key(0), x)
  grads = jax.grad(lambda v: jnp.sum(conv.apply(v, x).astype(jnp.float32)))(variables)
  assert grads['params']['kernel'].dtype == jnp.float32
  assert conv.apply(variables, x).dtype == jnp.bfloat16
  strided = nn.Conv(4, (3, 3), strides=2, conv_general_dilated=models.conv_general_dilated)
  jaxpr = str(jax.make_jaxpr(lambda v: strided.apply(v, x.astype(jnp.float32)))(variables))
  assert 'custom_vjp' not in jaxpr
  np.testing.assert_allclose(
      strided.apply(variables, x.astype(jnp.float32)),
      nn.Conv(4, (3, 3), strides=2).apply(variables, x.astype(jnp.float32)), rtol=1e-6)
