"""U-Net family: shapes, parameter counts, where state lives, configs, registry errors."""

import functools
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
  """In IBU-Net's first block layer, an affine change of one sample (x1 -> 3 x1 + 5) leaves
  the instance-normalized half of both samples unchanged (per-sample statistics) and changes
  the batch-normalized half of the other sample (shared batch statistics)."""
  cfg = _model_config('ibu', base_width=8, depth=1)
  ibn = models.get_model(cfg).first_norm(use_running_average=False)
  x = np.random.default_rng(0).normal(size=(2, 8, 8, 8)).astype(np.float32)
  variables = ibn.init(jax.random.key(0), x)
  y, state = ibn.apply(variables, x, mutable=['batch_stats'])
  x2 = x.copy()
  x2[1] = 3 * x[1] + 5
  y2, _ = ibn.apply(variables, x2, mutable=['batch_stats'])
  half = int(round(8 * cfg.ibn_ratio))
  # The variance is E[x^2] - E[x]^2 in float32 over a 64-pixel plane: its relative rounding is
  # about n u E[x^2] / var = 64 * 6e-8 * 34 / 9 = 1.5e-5 for the shifted sample, and |y| < 4.
  np.testing.assert_allclose(y2[..., :half], y[..., :half], atol=1e-4)
  assert np.abs(y2[0, ..., half:] - y[0, ..., half:]).mean() > 0.1   # ~0.7: new batch stats
  assert not np.allclose(state['batch_stats']['batch']['mean'], 0.0)


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


def test_injected_flax_batchnorm_gives_the_bn_unet():
  """The norm is injected as a ModuleDef: Flax's own BatchNorm in its place is an oracle for
  our BN U-Net (same parameter tree, same outputs and running statistics)."""
  cfg = _model_config('unet', norm='batch')
  ours = models.get_model(cfg)
  theirs = models.UNet(norm=functools.partial(nn.BatchNorm, momentum=cfg.bn_momentum,
                                              epsilon=cfg.norm_epsilon),
                       base_width=cfg.base_width, depth=cfg.depth, use_bias=False)
  x = np.random.default_rng(0).normal(2.0, 3.0, size=(3, 16, 16, 1)).astype(np.float32)
  variables = models.init_variables(ours, jax.random.key(0), 16)
  assert (jax.tree_util.tree_structure(variables) ==
          jax.tree_util.tree_structure(models.init_variables(theirs, jax.random.key(0), 16)))
  for train in (True, False):
    y1, s1 = ours.apply(variables, x, train=train, mutable=['batch_stats'])
    y2, s2 = theirs.apply(variables, x, train=train, mutable=['batch_stats'])
    # float32 through 10 conv + norm layers; both normalize with E[x^2] - E[x]^2.
    np.testing.assert_allclose(y1, y2, rtol=1e-4, atol=1e-4)
    for a, b in zip(jax.tree_util.tree_leaves(s1), jax.tree_util.tree_leaves(s2)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_deep_supervision_heads_read_their_decoder_level_and_leave_the_output_alone():
  """Levels 1..k get a 1x1 head on that decoder block's output, at 1/2**level resolution
  (checked against the block's features captured from the model without heads, times the
  head's kernel); the output is the model without heads (same parameters otherwise)."""
  cfg = _model_config('ibu', depth=3, deep_supervision=2)
  model = models.get_model(cfg)
  variables = models.init_variables(model, jax.random.key(0), 32)
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 1)).astype(np.float32)
  out, sown = model.apply(variables, x, train=False, mutable=[models.AUX_COLLECTION])
  aux = models.aux_logits(sown)
  assert sorted(aux) == [1, 2]
  plain = models.get_model(_model_config('ibu', depth=3))
  params = {k: v for k, v in variables['params'].items() if not k.startswith('aux_head')}
  assert len(params) == len(variables['params']) - 2
  ref, captured = plain.apply(dict(variables, params=params), x, train=False,
                              capture_intermediates=lambda m, _: m.name in ('up1', 'up2'),
                              mutable=['intermediates'])
  np.testing.assert_array_equal(out, ref)
  for level in (1, 2):
    assert aux[level].shape == (2, 32 >> level, 32 >> level, cfg.num_classes)
    features = np.asarray(captured['intermediates'][f'up{level}']['__call__'][0], np.float64)
    head = variables['params'][f'aux_head{level}']
    want = features @ np.asarray(head['kernel'][0, 0], np.float64) + np.asarray(head['bias'])
    # 8 to 16 float32 products per logit: a few ulp of the features' scale.
    np.testing.assert_allclose(aux[level], want, rtol=1e-5, atol=1e-5)
  # Without the collection mutable (a step without deep supervision) the heads leave nothing.
  _, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  assert set(updates) == {'batch_stats'} and models.aux_logits(updates) == {}
  with pytest.raises(ValueError, match='deep_supervision=3'):
    models.init_variables(models.get_model(_model_config('ibu', depth=3, deep_supervision=3)),
                          jax.random.key(0), 32)
