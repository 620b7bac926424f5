"""Normalization layers written out as Flax linen modules with explicit state.

All layers take NHWC inputs. Statistics are always computed in float32 (also for bfloat16
activations) and the output is cast back to the input dtype. Variances are computed as
E[x^2] - E[x]^2 clamped at zero, which is what lets BatchNorm combine per-device moments with a
single `lax.pmean` and guarantees that the variance can never go negative.

BatchNorm state convention (documented in the README and tested against PyTorch):
  * `momentum` follows Flax: running = momentum * running + (1 - momentum) * batch, so Flax's
    0.9 is PyTorch's `momentum=0.1`.
  * `running_var` holds the *biased* batch variance by default (Flax). With
    `unbiased_running_var=True` it holds the unbiased one (PyTorch's `running_var`), which makes
    the running statistics match `torch.nn.BatchNorm2d` update for update.
  * Normalization in training mode always uses the biased batch variance (both frameworks).
"""

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def _moments(x: Array, axes: Sequence[int], axis_name: str | None = None,
             ) -> tuple[Array, Array, Array]:
  """Float32 mean, biased variance and element count over `axes` (and devices)."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=axes)
  mean_sq = jnp.mean(jnp.square(x32), axis=axes)
  count = 1
  for a in axes:
    count *= x.shape[a]
  count = jnp.asarray(count, jnp.float32)
  if axis_name is not None:
    # Equal per-device batch sizes, so averaging the moments gives the global moments.
    mean, mean_sq = jax.lax.pmean((mean, mean_sq), axis_name)
    count = jax.lax.psum(count, axis_name)
  var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
  return mean, var, count


def _affine(module: nn.Module, y: Array, features: int, use_scale: bool, use_bias: bool,
            param_dtype) -> Array:
  """Per-channel learnable scale and bias on the last axis."""
  if use_scale:
    y = y * module.param('scale', nn.initializers.ones, (features,), param_dtype)
  if use_bias:
    y = y + module.param('bias', nn.initializers.zeros, (features,), param_dtype)
  return y


class BatchNorm(nn.Module):
  """Batch normalization over (N, H, W) per channel, with running statistics.

  Attributes:
    use_running_average: normalize with the running statistics (evaluation).
    axis_name: if set, batch moments are averaged over this mapped axis (pmap / shard_map),
      so the statistics cover the global batch.
    momentum: Flax convention, see the module docstring.
    epsilon: added to the variance.
    unbiased_running_var: keep the unbiased variance in `var` (PyTorch convention).
  """
  use_running_average: bool | None = None
  axis_name: str | None = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  unbiased_running_var: bool = False
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool | None = None) -> Array:
    use_running_average = nn.merge_param(
        'use_running_average', self.use_running_average, use_running_average)
    features = x.shape[-1]
    reduce_axes = tuple(range(x.ndim - 1))
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((features,), jnp.float32))

    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      mean, var, count = _moments(x, reduce_axes, self.axis_name)
      if not self.is_initializing():
        stored_var = var
        if self.unbiased_running_var:
          stored_var = var * count / jnp.maximum(count - 1.0, 1.0)
        ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * stored_var

    y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = _affine(self, y, features, self.use_scale, self.use_bias, self.param_dtype)
    return y.astype(x.dtype)


class InstanceNorm(nn.Module):
  """Instance normalization: per sample and channel over (H, W); no running state."""
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    spatial_axes = tuple(range(1, x.ndim - 1))
    mean, var, _ = _moments(x, spatial_axes)
    mean = jnp.expand_dims(mean, spatial_axes)
    var = jnp.expand_dims(var, spatial_axes)
    y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = _affine(self, y, x.shape[-1], self.use_scale, self.use_bias, self.param_dtype)
    return y.astype(x.dtype)


class LayerNorm(nn.Module):
  """Layer normalization in the CNN sense: per sample over (H, W, C), per-channel affine.

  This is what LN U-Nets use (PyTorch `nn.LayerNorm([C, H, W])` with a per-channel affine),
  not Flax's default of normalizing over the channel axis only.
  """
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    sample_axes = tuple(range(1, x.ndim))
    mean, var, _ = _moments(x, sample_axes)
    mean = jnp.expand_dims(mean, sample_axes)
    var = jnp.expand_dims(var, sample_axes)
    y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = _affine(self, y, x.shape[-1], self.use_scale, self.use_bias, self.param_dtype)
    return y.astype(x.dtype)


IBN_MODES = ('split', 'sequential', 'blend')


class InstanceBatchNorm(nn.Module):
  """Instance and batch normalization together (the IBU-Net layer).

  Modes:
    split: IBN-Net "a" (Pan et al. 2018). Instance norm on the first `round(ratio * C)`
      channels, batch norm on the rest, concatenated. The default.
    sequential: instance norm (with affine), then batch norm.
    blend: Batch-Instance Normalization (Nam & Kim 2018): both normalizations of the same
      input mixed by a learned per-channel weight rho clipped to [0, 1] (initialized at 0.5),
      followed by one per-channel affine.
  """
  mode: str = 'split'
  ratio: float = 0.5
  use_running_average: bool | None = None
  axis_name: str | None = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  param_dtype: jnp.dtype = jnp.float32

  def _batch_norm(self, **kwargs) -> BatchNorm:
    return BatchNorm(use_running_average=self.use_running_average, axis_name=self.axis_name,
                     momentum=self.momentum, epsilon=self.epsilon,
                     param_dtype=self.param_dtype, name='batch', **kwargs)

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool | None = None) -> Array:
    if self.mode not in IBN_MODES:
      raise ValueError(f'Unknown IBN mode {self.mode!r}; choose one of {IBN_MODES}.')
    features = x.shape[-1]
    if self.mode == 'split':
      n_instance = int(round(features * self.ratio))
      if not 0 < n_instance < features:
        raise ValueError(
            f'IBN split ratio {self.ratio} leaves no channels for one of the two parts '
            f'({features} channels).')
      x_in = InstanceNorm(epsilon=self.epsilon, param_dtype=self.param_dtype,
                          name='instance')(x[..., :n_instance])
      x_bn = self._batch_norm()(x[..., n_instance:], use_running_average)
      return jnp.concatenate([x_in, x_bn], axis=-1)
    if self.mode == 'sequential':
      y = InstanceNorm(epsilon=self.epsilon, param_dtype=self.param_dtype, name='instance')(x)
      return self._batch_norm()(y, use_running_average)
    # blend: normalize without affine in both, mix, then a single affine.
    x_in = InstanceNorm(epsilon=self.epsilon, use_scale=False, use_bias=False,
                        name='instance')(x).astype(jnp.float32)
    x_bn = self._batch_norm(use_scale=False, use_bias=False)(
        x, use_running_average).astype(jnp.float32)
    rho = jnp.clip(self.param('rho', nn.initializers.constant(0.5), (features,),
                              self.param_dtype), 0.0, 1.0)
    y = rho * x_bn + (1.0 - rho) * x_in
    y = _affine(self, y, features, True, True, self.param_dtype)
    return y.astype(x.dtype)


class Identity(nn.Module):
  """No normalization (the original U-Net)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return x


# Norms that keep running statistics take `use_running_average` at call time.
STATEFUL_NORMS = ('batch', 'ibn')
NORMS: dict[str, Callable[..., nn.Module]] = {
    'none': Identity,
    'batch': BatchNorm,
    'instance': InstanceNorm,
    'layer': LayerNorm,
    'ibn': InstanceBatchNorm,
}


def get_norm(name: str) -> Callable[..., nn.Module]:
  """Returns the normalization module class registered under `name`."""
  if name not in NORMS:
    raise ValueError(f'Unknown normalization {name!r}; choose one of {sorted(NORMS)}.')
  return NORMS[name]
