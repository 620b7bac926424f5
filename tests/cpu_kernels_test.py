"""The C++ kernels (normalization + ReLU, 3x3 convolution) against NumPy, PyTorch and the
library's XLA path."""

import ctypes
import os
import platform
import shutil
import subprocess

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs import default as default_config
from lvseg_jax import cpu_kernels, models, norms

EPS = 1e-5
NORMS = {
    'batch': lambda **kw: norms.BatchNorm(use_running_average=False, **kw),
    'instance': norms.InstanceNorm,
    'layer': norms.LayerNorm,
}


def _rand(shape, seed=0, loc=0.0, scale=1.0):
  return np.random.default_rng(seed).normal(loc, scale, shape).astype(np.float32)


def _apply_and_grads(which, kernel, x, scale, bias, upstream, **kwargs):
  """Output of the norm with relu=True, its batch statistics (BatchNorm), and the gradients of
  <output, upstream>."""
  layer = NORMS[which](epsilon=EPS, relu=True, kernel=kernel, **kwargs)
  variables = layer.init(jax.random.key(0), jnp.asarray(x))
  params = {'scale': jnp.asarray(scale), 'bias': jnp.asarray(bias)}

  def f(params, x):
    y, state = layer.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
    return jnp.vdot(y, upstream), (y, state)

  (_, (y, state)), (gp, gx) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
      params, jnp.asarray(x))
  stats = jax.tree_util.tree_map(np.asarray, dict(state.get('batch_stats', {})))
  return np.asarray(y), np.asarray(gx), np.asarray(gp['scale']), np.asarray(gp['bias']), stats


def _torch_reference(which, x, scale, bias, upstream):
  """The PyTorch layer + ReLU in float64: BatchNorm2d (training), InstanceNorm2d, and
  GroupNorm(1, C) (LayerNorm over C, H, W with a per-channel affine)."""
  c = x.shape[-1]
  layer = {'batch': lambda: torch.nn.BatchNorm2d(c, eps=EPS),
           'instance': lambda: torch.nn.InstanceNorm2d(c, eps=EPS, affine=True),
           'layer': lambda: torch.nn.GroupNorm(1, c, eps=EPS)}[which]().double()
  with torch.no_grad():
    layer.weight.copy_(torch.from_numpy(scale))
    layer.bias.copy_(torch.from_numpy(bias))
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).double()
  xt.requires_grad_(True)
  y = torch.relu(layer(xt))
  y.backward(torch.from_numpy(np.ascontiguousarray(upstream.transpose(0, 3, 1, 2))).double())
  to_nhwc = lambda t: t.detach().numpy().transpose(0, 2, 3, 1)
  return to_nhwc(y), to_nhwc(xt.grad), layer.weight.grad.numpy(), layer.bias.grad.numpy()


@pytest.mark.parametrize('which', sorted(NORMS))
@pytest.mark.parametrize('shape, loc', [
    ((3, 5, 6, 4), 0.0),
    ((2, 16, 16, 16), 10.0),    # mean far from zero: the sums could cancel
    ((1, 9, 7, 3), -2.0),       # batch 1, channels not a multiple of the vector width
    ((4, 8, 8, 33), 0.5),
    ((2, 64, 64, 16), 0.0),     # several tasks per sample
])
def test_kernels_match_pytorch_float64_and_xla_path(which, shape, loc):
  x = _rand(shape, seed=1, loc=loc, scale=2.0)
  scale = 1.0 + 0.5 * _rand(shape[-1:], seed=2)
  bias = 0.5 * _rand(shape[-1:], seed=3)
  upstream = _rand(shape, seed=4)
  ours = _apply_and_grads(which, 'cpu', x, scale, bias, upstream)
  xla = _apply_and_grads(which, 'xla', x, scale, bias, upstream)
  reference = _torch_reference(which, x.astype(np.float64), scale.astype(np.float64),
                               bias.astype(np.float64), upstream.astype(np.float64))
  for name, got, want, via_xla in zip(('y', 'dx', 'dscale', 'dbias'), ours, reference, xla):
    tol = 1e-4 * max(1.0, np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=tol, err_msg=f'{name} vs PyTorch')
    np.testing.assert_allclose(got, via_xla, rtol=1e-3, atol=tol, err_msg=f'{name} vs XLA')
  # BatchNorm's running statistics take the same batch mean and variance on both paths.
  assert ours[4].keys() == xla[4].keys()
  for key in ours[4]:
    np.testing.assert_allclose(ours[4][key], xla[4][key], rtol=1e-5, atol=1e-5)
  # The ReLU really cuts: a fair share of the outputs are zero.
  assert 0.2 < np.mean(ours[0] == 0) < 0.8


@pytest.mark.parametrize('which', sorted(NORMS))
def test_constant_input_takes_the_clamped_variance_gradient_like_xla(which):
  """A constant sample / channel has E[x^2] - E[x]^2 = 0 exactly: d max(v, 0)/dv = 1/2."""
  x = np.concatenate([np.full((1, 4, 4, 2), 0.5, np.float32), _rand((1, 4, 4, 2), seed=5)])
  x[..., 0] = 0.5  # a constant channel for BatchNorm too
  scale, bias = np.array([1.5, -0.5], np.float32), np.array([0.25, 0.5], np.float32)
  upstream = _rand(x.shape, seed=6)
  ours = _apply_and_grads(which, 'cpu', x, scale, bias, upstream)
  xla = _apply_and_grads(which, 'xla', x, scale, bias, upstream)
  for got, want in zip(ours[:4], xla[:4]):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('num_devices', [4])
def test_batchnorm_kernels_under_shard_map_equal_global_batch(num_devices):
  """With `axis_name` the moments and the gradient sums are summed over devices in JAX."""
  x = _rand((num_devices * 2, 6, 6, 3), loc=0.5, scale=2.0)
  scale, bias, upstream = _rand((3,), seed=1), _rand((3,), seed=2), _rand(x.shape, seed=3)
  reference = _apply_and_grads('batch', 'cpu', x, scale, bias, upstream)
  mapped = norms.BatchNorm(use_running_average=False, axis_name='batch', relu=True,
                           kernel='cpu')
  variables = norms.BatchNorm(use_running_average=False).init(jax.random.key(0), jnp.asarray(x))
  params = {'scale': jnp.asarray(scale), 'bias': jnp.asarray(bias)}

  def local(params, xs, us):
    def f(params, xs):
      y, state = mapped.apply({**variables, 'params': params}, xs, mutable=['batch_stats'])
      return jnp.vdot(y, us), (y, state['batch_stats'])
    (_, (y, stats)), (gp, gx) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, xs)
    return y, gx, jax.lax.psum(gp, 'batch'), stats

  mesh = Mesh(np.array(jax.devices()[:num_devices]), ('batch',))
  y, gx, gp, stats = jax.jit(jax.shard_map(
      local, mesh=mesh, in_specs=(P(), P('batch'), P('batch')),
      out_specs=(P('batch'), P('batch'), P(), P()), check_vma=False))(params, x, upstream)
  for got, want in zip((y, gx, gp['scale'], gp['bias']), reference[:4]):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  for key in ('mean', 'var'):
    np.testing.assert_allclose(stats[key], reference[4][key], rtol=1e-5, atol=1e-5)


def _model(name: str, norm_kernel: str = 'auto', conv_kernel: str = 'auto', width: int = 4,
           depth: int = 2) -> models.UNet:
  config = default_config.get_config()
  config.model.name = 'unet' if name == 'unet_bn' else name
  config.model.norm = 'batch' if name == 'unet_bn' else 'none'
  config.model.base_width = width
  config.model.depth = depth
  config.model.norm_kernel = norm_kernel
  config.model.conv_kernel = conv_kernel
  return models.get_model(config.model)


def _loss_with_state(model, variables, x, labels):
  """params -> (a cross-entropy-like loss of the model's logits, its batch_stats update)."""
  def loss(params):
    logits, state = model.apply({**variables, 'params': params}, x, train=True,
                                mutable=['batch_stats'])
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * (labels == 0)), state
  return loss


@pytest.mark.parametrize('name', ['lnu', 'ibu', 'unet_bn'])
def test_models_loss_gradients_and_stats_equal_with_and_without_the_kernels(name):
  x = jnp.asarray(_rand((2, 16, 16, 1), seed=7))
  labels = jnp.asarray(_rand((2, 16, 16), seed=8) > 0, jnp.int32)
  variables = models.init_variables(_model(name, 'xla'), jax.random.key(0), 16)
  results = {}
  for kernel in ('xla', 'cpu'):
    loss = _loss_with_state(_model(name, kernel), variables, x, labels)
    results[kernel] = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
  (loss_xla, state_xla), grads_xla = results['xla']
  (loss_cpu, state_cpu), grads_cpu = results['cpu']
  np.testing.assert_allclose(loss_cpu, loss_xla, rtol=1e-5)
  for a, b in ((grads_cpu, grads_xla), (state_cpu, state_xla)):
    flat_a, _ = jax.flatten_util.ravel_pytree(a)
    flat_b, _ = jax.flatten_util.ravel_pytree(b)
    assert flat_a.shape == flat_b.shape
    if flat_b.size:
      np.testing.assert_allclose(flat_a, flat_b, rtol=1e-3, atol=1e-4 * np.abs(flat_b).max())


def _lowered_text(kernel: str, name: str = 'lnu') -> str:
  model = _model(name, kernel)
  x = jnp.zeros((2, 16, 16, 1))
  variables = models.init_variables(model, jax.random.key(0), 16)

  def loss(params):
    logits, _ = model.apply({**variables, 'params': params}, x, train=True,
                            mutable=['batch_stats'])
    return jnp.sum(logits)

  return jax.jit(jax.grad(loss)).lower(variables['params']).as_text()


@pytest.mark.parametrize('name', ['lnu', 'ibu'])
def test_auto_uses_the_kernels_on_cpu_and_xla_never_does(name):
  assert jax.default_backend() == 'cpu'
  auto = _lowered_text('auto', name)
  for target in ('lvseg_norm_moments', 'lvseg_norm_affine_relu', 'lvseg_norm_relu_grad_sums',
                 'lvseg_norm_relu_grad_apply'):
    assert target in auto
  assert 'lvseg_norm' not in _lowered_text('xla', name)


def test_env_switch_turns_the_kernels_off(monkeypatch):
  monkeypatch.setenv('LVSEG_CPU_KERNELS', '0')
  assert not cpu_kernels.available()
  assert 'lvseg_norm' not in _lowered_text('auto')
  with pytest.raises(ValueError, match='LVSEG_CPU_KERNELS'):
    _lowered_text('cpu')


def test_bad_kernel_name_and_dtype_give_clear_errors():
  with pytest.raises(ValueError, match="choose one of \\('auto', 'xla', 'cpu'\\)"):
    _model('lnu', 'cuda')
  layer = norms.LayerNorm(relu=True, kernel='cpu')
  with pytest.raises(ValueError, match='float32'):
    layer.init(jax.random.key(0), jnp.zeros((1, 4, 4, 2), jnp.bfloat16))
  # 'auto' falls back to the XLA formulas for bfloat16.
  auto = norms.LayerNorm(relu=True)
  variables = auto.init(jax.random.key(0), jnp.ones((1, 4, 4, 2), jnp.bfloat16))
  assert auto.apply(variables, jnp.ones((1, 4, 4, 2), jnp.bfloat16)).dtype == jnp.bfloat16


def test_build_failure_names_the_compiler_and_its_output(monkeypatch, tmp_path):
  monkeypatch.setenv('LVSEG_KERNEL_CACHE', str(tmp_path))
  monkeypatch.setenv('CXX', 'false')
  with pytest.raises(cpu_kernels.KernelBuildError, match='false .*failed'):
    cpu_kernels.build()
  assert not list(tmp_path.iterdir())  # no half-written library left behind


def test_build_caches_the_library(monkeypatch, tmp_path):
  monkeypatch.setenv('LVSEG_KERNEL_CACHE', str(tmp_path))
  path = cpu_kernels.build()
  assert path.parent == tmp_path and path.exists()
  mtime = path.stat().st_mtime_ns
  assert cpu_kernels.build() == path and path.stat().st_mtime_ns == mtime


@pytest.mark.parametrize('which', sorted(NORMS))
def test_batch_sharded_over_devices_equals_one_device(which):
  """Under a jit with the batch split over CPU devices the kernels see their shard or the
  gathered batch; either way the result is the single-device one."""
  if jax.device_count() < 2:
    pytest.skip('needs 2 host devices (tests/conftest.py sets 8)')
  x = _rand((4, 8, 8, 8), seed=9, loc=1.0)
  scale, bias, upstream = _rand((8,), seed=10), _rand((8,), seed=11), _rand(x.shape, seed=12)
  single = _apply_and_grads(which, 'cpu', x, scale, bias, upstream)
  mesh = Mesh(np.array(jax.devices()[:2]), ('batch',))
  sharded_x = jax.device_put(jnp.asarray(x), NamedSharding(mesh, P('batch')))
  sharded_up = jax.device_put(jnp.asarray(upstream), NamedSharding(mesh, P('batch')))
  split = _apply_and_grads(which, 'cpu', sharded_x, scale, bias, sharded_up)
  for got, want in zip(split[:4], single[:4]):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- 3x3 convolution kernels

def _conv_reference_float64(x, kernel, dy):
  """y, dx and dkernel of a 3x3 'SAME' NHWC convolution by PyTorch's conv2d in float64."""
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).double()
  kt = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))).double()
  xt.requires_grad_(True)
  kt.requires_grad_(True)
  y = torch.nn.functional.conv2d(xt, kt, padding=1)
  y.backward(torch.from_numpy(np.ascontiguousarray(dy.transpose(0, 3, 1, 2))).double())
  return (y.detach().numpy().transpose(0, 2, 3, 1), xt.grad.numpy().transpose(0, 2, 3, 1),
          kt.grad.numpy().transpose(2, 3, 1, 0))


def _conv_numpy_float64(x, kernel):
  """The forward pass as the sum over the nine taps of shifted-input matmuls, in NumPy."""
  n, h, w, _ = x.shape
  padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sum(padded[:, p:p + h, q:q + w, :] @ kernel[p, q].astype(np.float64)
             for p in range(3) for q in range(3))


def _conv_kernel_path(x, kernel, dy, which):
  conv = lambda a, b: models.conv_general_dilated(a, b, (1, 1), 'SAME',
                                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                                  kernel=which)
  y, vjp = jax.vjp(jax.jit(conv), jnp.asarray(x), jnp.asarray(kernel))
  dx, dk = vjp(jnp.asarray(dy))
  return np.asarray(y), np.asarray(dx), np.asarray(dk)


@pytest.mark.parametrize('shape, out_channels', [
    ((1, 1, 1, 16), 16),       # every tap but the centre reads padding
    ((2, 5, 7, 16), 32),       # rows shorter than a tile of pixels
    ((1, 37, 19, 32), 16),     # 19 = 16 + 2 + 1 pixels: every tile size
    ((3, 33, 40, 48), 64),     # four output vectors per tile; several tasks per sample
    ((2, 20, 21, 64), 48),     # 48 = three single-vector tiles
    ((4, 70, 64, 16), 16),     # several row blocks and partial sums in the kernel gradient
    ((1, 6, 6, 16), 128),
])
def test_conv3x3_kernels_match_pytorch_and_numpy_float64(shape, out_channels):
  if not cpu_kernels.conv3x3_available():
    pytest.skip('the convolution kernels need AVX-512')
  x = _rand(shape, seed=20, loc=0.3)
  kernel = _rand((3, 3, shape[-1], out_channels), seed=21) / np.sqrt(9 * shape[-1])
  dy = _rand(shape[:3] + (out_channels,), seed=22)
  ours = _conv_kernel_path(x, kernel, dy, 'cpu')
  reference = _conv_reference_float64(x, kernel, dy)
  np.testing.assert_allclose(reference[0], _conv_numpy_float64(x, kernel), rtol=1e-10,
                             atol=1e-10)
  for name, got, want in zip(('y', 'dx', 'dkernel'), ours, reference):
    assert got.shape == want.shape, name
    # float32 sums of 9 * C (y, dx) or N * H * W (dkernel) terms.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5 * np.abs(want).max(),
                               err_msg=name)


def test_conv3x3_kernels_equal_xla_within_float32_rounding():
  if not cpu_kernels.conv3x3_available():
    pytest.skip('the convolution kernels need AVX-512')
  x = _rand((2, 32, 32, 32), seed=23)
  kernel = _rand((3, 3, 32, 16), seed=24) / np.sqrt(9 * 32)
  dy = _rand((2, 32, 32, 16), seed=25)
  for got, want in zip(_conv_kernel_path(x, kernel, dy, 'cpu'),
                       _conv_kernel_path(x, kernel, dy, 'xla')):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_conv3x3_kernel_rejects_shapes_it_does_not_take():
  if not cpu_kernels.conv3x3_available():
    pytest.skip('the convolution kernels need AVX-512')
  x = jnp.ones((1, 4, 4, 16))
  with pytest.raises(Exception, match='output channels must be a multiple of 16'):
    jax.block_until_ready(cpu_kernels.conv3x3(x, jnp.ones((3, 3, 16, 8))))
  with pytest.raises(Exception, match=r'kernel must be \(3, 3, in, out\)'):
    jax.block_until_ready(cpu_kernels.conv3x3(x, jnp.ones((3, 3, 8, 16))))
  with pytest.raises(Exception, match='input and output channels must be multiples of 16'):
    jax.block_until_ready(cpu_kernels.conv3x3_kernel_grad(jnp.ones((1, 4, 4, 8)), x))


def _lhs_rhs(size, cin, cout, dtype=jnp.float32, kernel_size=3):
  return (jnp.zeros((2, size, size, cin), dtype),
          jnp.zeros((kernel_size, kernel_size, cin, cout), dtype))


def test_which_convolutions_take_the_kernels():
  """'auto': float32 3x3 'SAME' layers with channels in 16s from 32x32 pixels up (where they
  were measured faster); 'cpu' at any size; 'xla' never."""
  applies = models._conv3x3_kernel_applies  # pylint: disable=protected-access
  same = ((1, 1), (1, 1))
  expected = cpu_kernels.conv3x3_available()
  assert applies(*_lhs_rhs(32, 16, 16), same, 'auto') == expected
  assert applies(*_lhs_rhs(128, 64, 32), same, 'auto') == expected
  assert not applies(*_lhs_rhs(16, 128, 128), same, 'auto')
  assert applies(*_lhs_rhs(16, 128, 128), same, 'cpu') == expected
  assert not applies(*_lhs_rhs(128, 16, 16), same, 'xla')
  for lhs_rhs, padding in [(_lhs_rhs(64, 1, 16), same),                      # first layer
                           (_lhs_rhs(64, 16, 8), same),
                           (_lhs_rhs(64, 16, 16, jnp.bfloat16), same),
                           (_lhs_rhs(64, 16, 16, kernel_size=5), ((2, 2), (2, 2))),
                           (_lhs_rhs(64, 16, 16), ((0, 0), (0, 0)))]:        # 'VALID'
    assert not applies(*lhs_rhs, padding, 'auto')
    assert not applies(*lhs_rhs, padding, 'cpu')
  with pytest.raises(ValueError, match=r"choose one of \('auto', 'xla', 'cpu'\)"):
    applies(*_lhs_rhs(64, 16, 16), same, 'onednn')


@pytest.mark.parametrize('name', ['unet', 'ibu'])
def test_models_loss_and_gradients_equal_with_and_without_the_conv_kernels(name):
  if not cpu_kernels.conv3x3_available():
    pytest.skip('the convolution kernels need AVX-512')
  x = jnp.asarray(_rand((2, 32, 32, 1), seed=26))
  labels = jnp.asarray(_rand((2, 32, 32), seed=27) > 0, jnp.int32)
  make_model = lambda conv_kernel: _model(name, conv_kernel=conv_kernel, width=16, depth=1)
  variables = models.init_variables(make_model('xla'), jax.random.key(1), 32)
  results = {}
  for conv_kernel in ('xla', 'auto'):
    loss = _loss_with_state(make_model(conv_kernel), variables, x, labels)
    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    results[conv_kernel] = step(variables['params'])
    lowered = step.lower(variables['params']).as_text()
    # Under 'auto' three of the six 3x3 layers take the kernels: the second of the 32x32
    # encoder block and both of the decoder block; not the 1-channel first layer, and not the
    # 16x16 bottleneck's two (below the 32x32 pixels where the kernels pay).
    assert lowered.count('lvseg_conv3x3_kernel_grad') == (3 if conv_kernel == 'auto' else 0)
  ((loss_xla, _), grads_xla), ((loss_cpu, _), grads_cpu) = results['xla'], results['auto']
  np.testing.assert_allclose(loss_cpu, loss_xla, rtol=1e-5)
  flat_cpu, _ = jax.flatten_util.ravel_pytree(grads_cpu)
  flat_xla, _ = jax.flatten_util.ravel_pytree(grads_xla)
  np.testing.assert_allclose(flat_cpu, flat_xla, rtol=1e-3, atol=1e-4 * np.abs(flat_xla).max())


def test_conv_kernels_under_a_batch_sharded_jit_equal_one_device():
  if not cpu_kernels.conv3x3_available():
    pytest.skip('the convolution kernels need AVX-512')
  if jax.device_count() < 2:
    pytest.skip('needs 2 host devices (tests/conftest.py sets 8)')
  x = _rand((4, 8, 8, 16), seed=28)
  kernel = _rand((3, 3, 16, 16), seed=29) / 12.0
  dy = _rand((4, 8, 8, 16), seed=30)
  single = _conv_kernel_path(x, kernel, dy, 'cpu')
  mesh = Mesh(np.array(jax.devices()[:2]), ('batch',))
  split = _conv_kernel_path(jax.device_put(jnp.asarray(x), NamedSharding(mesh, P('batch'))),
                            kernel,
                            jax.device_put(jnp.asarray(dy), NamedSharding(mesh, P('batch'))),
                            'cpu')
  for got, want in zip(split, single):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_env_switch_turns_the_conv_kernels_off(monkeypatch):
  monkeypatch.setenv('LVSEG_CPU_KERNELS', '0')
  assert not cpu_kernels.conv3x3_available()
  assert not models._conv3x3_kernel_applies(  # pylint: disable=protected-access
      *_lhs_rhs(64, 16, 16), ((1, 1), (1, 1)), 'auto')
  with pytest.raises(ValueError, match='LVSEG_CPU_KERNELS'):
    models._conv3x3_kernel_applies(  # pylint: disable=protected-access
        *_lhs_rhs(64, 16, 16), ((1, 1), (1, 1)), 'cpu')


@pytest.mark.skipif(platform.machine() not in ('x86_64', 'AMD64'), reason='x86-64 flags')
def test_conv_kernels_report_unsupported_without_avx512(tmp_path):
  """Built for a CPU without AVX-512 the library still loads, and says the convolution
  kernels cannot run (so the models keep XLA's convolutions)."""
  compiler = os.environ.get('CXX') or shutil.which('c++') or shutil.which('g++')
  if compiler is None:
    pytest.skip('no C++ compiler')
  library = tmp_path / 'kernels.so'
  subprocess.run([compiler, '-O1', '-std=c++17', '-shared', '-fPIC', '-march=x86-64-v3',
                  f'-I{jax.ffi.include_dir()}',
                  *(str(source) for source in cpu_kernels._SOURCES),  # pylint: disable=protected-access
                  '-o', str(library)], check=True, capture_output=True)
  assert ctypes.CDLL(str(library)).LvsegConv3x3Supported() == 0
