"""The C++ LayerNorm + ReLU kernel against NumPy, PyTorch and the library's XLA formulas."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs import default as default_config
from lvseg_jax import cpu_kernels, models, norms

EPS = 1e-5


def _rand(shape, seed=0, loc=0.0, scale=1.0):
  return np.random.default_rng(seed).normal(loc, scale, shape).astype(np.float32)


def _apply_and_grads(kernel, x, scale, bias, upstream):
  """Output of LayerNorm(relu=True) and the gradients of <output, upstream>."""
  layer = norms.LayerNorm(epsilon=EPS, relu=True, kernel=kernel)
  params = {'scale': jnp.asarray(scale), 'bias': jnp.asarray(bias)}

  def f(params, x):
    y = layer.apply({'params': params}, x)
    return jnp.vdot(y, upstream), y

  (_, y), (gp, gx) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
      params, jnp.asarray(x))
  return np.asarray(y), np.asarray(gx), np.asarray(gp['scale']), np.asarray(gp['bias'])


def _torch_reference(x, scale, bias, upstream):
  """PyTorch GroupNorm(1, C) (LayerNorm over C, H, W with a per-channel affine) + ReLU."""
  c = x.shape[-1]
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).double()
  xt.requires_grad_(True)
  gn = torch.nn.GroupNorm(1, c, eps=EPS).double()
  with torch.no_grad():
    gn.weight.copy_(torch.from_numpy(scale))
    gn.bias.copy_(torch.from_numpy(bias))
  y = torch.relu(gn(xt))
  y.backward(torch.from_numpy(np.ascontiguousarray(upstream.transpose(0, 3, 1, 2))).double())
  to_nhwc = lambda t: t.detach().numpy().transpose(0, 2, 3, 1)
  return (to_nhwc(y), to_nhwc(xt.grad), gn.weight.grad.numpy(), gn.bias.grad.numpy())


@pytest.mark.parametrize('shape, loc', [
    ((3, 5, 6, 4), 0.0),
    ((2, 16, 16, 16), 10.0),    # mean far from zero: the sums could cancel
    ((1, 9, 7, 3), -2.0),       # batch 1, channels not a multiple of the vector width
    ((4, 8, 8, 33), 0.5),
    ((2, 64, 64, 16), 0.0),     # several tasks per sample
])
def test_kernel_matches_pytorch_float64_and_xla_formulas(shape, loc):
  x = _rand(shape, seed=1, loc=loc, scale=2.0)
  scale = 1.0 + 0.5 * _rand(shape[-1:], seed=2)
  bias = 0.5 * _rand(shape[-1:], seed=3)
  upstream = _rand(shape, seed=4)
  ours = _apply_and_grads('cpu', x, scale, bias, upstream)
  xla = _apply_and_grads('xla', x, scale, bias, upstream)
  reference = _torch_reference(x.astype(np.float64), scale.astype(np.float64),
                               bias.astype(np.float64), upstream.astype(np.float64))
  for name, got, want, via_xla in zip(('y', 'dx', 'dscale', 'dbias'), ours, reference, xla):
    tol = 1e-4 * max(1.0, np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=tol, err_msg=f'{name} vs PyTorch')
    np.testing.assert_allclose(got, via_xla, rtol=1e-3, atol=tol, err_msg=f'{name} vs XLA')
  # The ReLU really cuts: a fair share of the outputs and input gradients are zero.
  assert 0.2 < np.mean(ours[0] == 0) < 0.8


def test_constant_sample_takes_the_clamped_variance_gradient_like_xla():
  """A constant sample has E[x^2] - E[x]^2 = 0 exactly: d max(v, 0)/dv = 1/2 there."""
  x = np.concatenate([np.full((1, 4, 4, 2), 0.5, np.float32), _rand((1, 4, 4, 2), seed=5)])
  scale, bias = np.array([1.5, -0.5], np.float32), np.array([0.25, 0.5], np.float32)
  upstream = _rand(x.shape, seed=6)
  for got, want in zip(_apply_and_grads('cpu', x, scale, bias, upstream),
                       _apply_and_grads('xla', x, scale, bias, upstream)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _lnu(kernel: str, width: int = 4) -> tuple[models.UNet, ml_collections.ConfigDict]:
  config = default_config.get_config()
  config.model.name = 'lnu'
  config.model.base_width = width
  config.model.depth = 2
  config.model.norm_kernel = kernel
  return models.get_model(config.model), config


def test_lnu_net_loss_and_gradients_equal_with_and_without_the_kernel():
  x = jnp.asarray(_rand((2, 16, 16, 1), seed=7))
  labels = jnp.asarray(_rand((2, 16, 16), seed=8) > 0, jnp.int32)
  model, _ = _lnu('xla')
  variables = models.init_variables(model, jax.random.key(0), 16)
  results = {}
  for kernel in ('xla', 'cpu'):
    model, _ = _lnu(kernel)

    def loss(params, model=model):
      logits = model.apply({'params': params}, x, train=True)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * (labels == 0))

    results[kernel] = jax.jit(jax.value_and_grad(loss))(variables['params'])
  np.testing.assert_allclose(results['cpu'][0], results['xla'][0], rtol=1e-5)
  flat_xla, _ = jax.flatten_util.ravel_pytree(results['xla'][1])
  flat_cpu, _ = jax.flatten_util.ravel_pytree(results['cpu'][1])
  np.testing.assert_allclose(flat_cpu, flat_xla, rtol=1e-3, atol=1e-4 * np.abs(flat_xla).max())


def _lowered_text(kernel: str) -> str:
  model, _ = _lnu(kernel)
  x = jnp.zeros((2, 16, 16, 1))
  variables = models.init_variables(model, jax.random.key(0), 16)
  grad = jax.grad(lambda p: jnp.sum(model.apply({'params': p}, x, train=True)))
  return jax.jit(grad).lower(variables['params']).as_text()


def test_auto_uses_the_kernel_on_cpu_and_xla_never_does():
  assert jax.default_backend() == 'cpu'
  auto = _lowered_text('auto')
  assert 'lvseg_layer_norm_relu_fwd' in auto and 'lvseg_layer_norm_relu_bwd' in auto
  assert 'lvseg_layer_norm_relu' not in _lowered_text('xla')


def test_env_switch_turns_the_kernel_off(monkeypatch):
  monkeypatch.setenv('LVSEG_CPU_KERNELS', '0')
  assert not cpu_kernels.available()
  assert 'lvseg_layer_norm_relu' not in _lowered_text('auto')
  with pytest.raises(ValueError, match='LVSEG_CPU_KERNELS'):
    _lowered_text('cpu')


def test_bad_kernel_name_and_dtype_give_clear_errors():
  with pytest.raises(ValueError, match="choose one of \\('auto', 'xla', 'cpu'\\)"):
    _lnu('cuda')
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


def test_batch_sharded_over_devices_equals_one_device():
  """Under a jit with the batch split over CPU devices the kernel sees its shard or the
  gathered batch; either way the result is the single-device one."""
  if jax.device_count() < 2:
    pytest.skip('needs 2 host devices (tests/conftest.py sets 8)')
  x = _rand((4, 8, 8, 8), seed=9, loc=1.0)
  scale, bias, upstream = _rand((8,), seed=10), _rand((8,), seed=11), _rand(x.shape, seed=12)
  single = _apply_and_grads('cpu', x, scale, bias, upstream)
  mesh = Mesh(np.array(jax.devices()[:2]), ('batch',))
  sharded_x = jax.device_put(jnp.asarray(x), NamedSharding(mesh, P('batch')))
  sharded_up = jax.device_put(jnp.asarray(upstream), NamedSharding(mesh, P('batch')))
  split = _apply_and_grads('cpu', sharded_x, scale, bias, sharded_up)
  for got, want in zip(split, single):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
