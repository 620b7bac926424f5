"""Normalization layers written out as Flax linen modules with explicit state.

All layers take NHWC inputs. Statistics are computed in float32 (also for bfloat16 activations)
and the output is cast back to the input dtype. The variance is computed in two passes (the
mean, then the mean squared deviation), each a `lax.pmean` under a mapped axis, so it is never
negative and does not cancel for activations far from zero. JAX differentiates the layers.

BatchNorm state convention (tested against PyTorch and Flax):
  * `momentum` follows Flax: running = momentum * running + (1 - momentum) * batch, so Flax's
    0.9 is PyTorch's `momentum=0.1`.
  * `var` holds the *biased* batch variance by default (Flax). With `unbiased_running_var=True`
    it holds the unbiased one (PyTorch's `running_var`).
  * Normalization in training mode always uses the biased batch variance (both frameworks).
"""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
ModuleDef = Any


def _moments(x: Array, axes: Sequence[int], axis_name: str | None = None,
             mask: Array | None = None) -> tuple[Array, Array]:
  """Float32 mean and biased variance over `axes` (and the devices of `axis_name`), keepdims.

  Two passes: the variance is the mean of (x - mean)^2, not E[x^2] - E[x]^2, which cancels
  catastrophically for activations far from zero (offset 1e3, spread 0.1: normalized outputs
  off by ~100). `mask` (broadcastable to x, True = counts) restricts the statistics to those
  entries, e.g. the real rows of a padded batch.
  """
  axes = tuple(axes)
  if mask is None:
    def average(v):
      v = jnp.mean(v, axis=axes, keepdims=True)
      # Equal per-device batch sizes, so averaging the per-device means gives the global one.
      return v if axis_name is None else jax.lax.pmean(v, axis_name)
  else:
    w = jnp.broadcast_to(mask, x.shape).astype(jnp.float32)
    # Devices may hold different numbers of real rows: sum, then divide.
    count = jnp.maximum(_psum(jnp.sum(w, axis=axes, keepdims=True), axis_name), 1.0)

    def average(v):
      return _psum(jnp.sum(v * w, axis=axes, keepdims=True), axis_name) / count
  x32 = x.astype(jnp.float32)
  mean = average(x32)
  return mean, average(jnp.square(x32 - mean))


def _count(x: Array, axes: Sequence[int], axis_name: str | None = None) -> Array:
  count = jnp.asarray(1.0, jnp.float32)
  for a in axes:
    count *= x.shape[a]
  return count if axis_name is None else jax.lax.psum(count, axis_name)


def _psum(value: Array, axis_name: str | None) -> Array:
  return value if axis_name is None else jax.lax.psum(value, axis_name)


def _affine(module: nn.Module, y: Array, use_scale: bool, use_bias: bool,
            param_dtype: Any) -> Array:
  """Per-channel learnable `scale` and `bias` on the last axis."""
  features = y.shape[-1]
  if use_scale:
    y = y * module.param('scale', nn.initializers.ones, (features,), param_dtype)
  if use_bias:
    y = y + module.param('bias', nn.initializers.zeros, (features,), param_dtype)
  return y


def _normalize(module: nn.Module, x: Array, axes: Sequence[int], use_scale: bool,
               use_bias: bool, param_dtype: Any, epsilon: float,
               axis_name: str | None = None, mask: Array | None = None
               ) -> tuple[Array, Array, Array]:
  """`(x - mean) / sqrt(var + epsilon) * scale + bias` over `axes`; also the moments."""
  mean, var = _moments(x, axes, axis_name, mask)
  y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + epsilon)
  y = _affine(module, y, use_scale, use_bias, param_dtype)
  return y.astype(x.dtype), mean, var


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
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool | None = None, *,
               mask: Array | None = None) -> Array:
    """`mask` (broadcastable to x, True = counts, as in Flax): the entries the batch statistics
    come from, e.g. `valid[:, None, None, None]` to leave a padded batch's filler rows out."""
    use_running_average = nn.merge_param(
        'use_running_average', self.use_running_average, use_running_average)
    features = x.shape[-1]
    axes = tuple(range(x.ndim - 1))
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((features,), jnp.float32))
    if use_running_average:
      y = (x.astype(jnp.float32) - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon)
      y = _affine(self, y, self.use_scale, self.use_bias, self.param_dtype)
      return y.astype(x.dtype)
    y, mean, var = _normalize(self, x, axes, self.use_scale, self.use_bias, self.param_dtype,
                              self.epsilon, self.axis_name, mask)
    if not self.is_initializing():
      mean, var = mean.reshape(features), var.reshape(features)
      if self.unbiased_running_var:
        count = (_count(x, axes, self.axis_name) if mask is None else _psum(
            jnp.sum(jnp.broadcast_to(mask, x.shape)[..., 0].astype(jnp.float32)),
            self.axis_name))
        var = var * count / jnp.maximum(count - 1.0, 1.0)
      ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * var
    return y


class InstanceNorm(nn.Module):
  """Instance normalization: per sample and channel over (H, W); no running state.

  Per-sample statistics need no batch `mask`; it is accepted so every norm can be called alike.
  """
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
    del mask
    axes = tuple(range(1, x.ndim - 1))
    return _normalize(self, x, axes, self.use_scale, self.use_bias, self.param_dtype,
                      self.epsilon)[0]


class LayerNorm(nn.Module):
  """Layer normalization in the CNN sense: per sample over (H, W, C), per-channel affine.

  This is what LN U-Nets use (PyTorch `nn.LayerNorm([C, H, W])` with a per-channel affine),
  not Flax's default of normalizing over the channel axis only. Per-sample statistics: the
  batch `mask` is accepted and not needed.
  """
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
    del mask
    axes = tuple(range(1, x.ndim))
    return _normalize(self, x, axes, self.use_scale, self.use_bias, self.param_dtype,
                      self.epsilon)[0]


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
  param_dtype: Any = jnp.float32

  def _batch_norm(self, **kwargs) -> BatchNorm:
    return BatchNorm(use_running_average=self.use_running_average, axis_name=self.axis_name,
                     momentum=self.momentum, epsilon=self.epsilon,
                     param_dtype=self.param_dtype, name='batch', **kwargs)

  def _instance_norm(self, **kwargs) -> InstanceNorm:
    return InstanceNorm(epsilon=self.epsilon, param_dtype=self.param_dtype, name='instance',
                        **kwargs)

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool | None = None, *,
               mask: Array | None = None) -> Array:
    """`mask`: as `BatchNorm`'s, for the batch-normalized part."""
    if self.mode not in IBN_MODES:
      raise ValueError(f'Unknown IBN mode {self.mode!r}; choose one of {IBN_MODES}.')
    features = x.shape[-1]
    if self.mode == 'split':
      n_instance = int(round(features * self.ratio))
      if not 0 < n_instance < features:
        raise ValueError(
            f'IBN split ratio {self.ratio} leaves no channels for one of the two parts '
            f'({features} channels).')
      x_in = self._instance_norm()(x[..., :n_instance])
      x_bn = self._batch_norm()(x[..., n_instance:], use_running_average, mask=mask)
      return jnp.concatenate([x_in, x_bn], axis=-1)
    if self.mode == 'sequential':
      return self._batch_norm()(self._instance_norm()(x), use_running_average, mask=mask)
    # blend: normalize without affine in both, mix, then a single affine.
    x_in = self._instance_norm(use_scale=False, use_bias=False)(x).astype(jnp.float32)
    x_bn = self._batch_norm(use_scale=False, use_bias=False)(
        x, use_running_average, mask=mask).astype(jnp.float32)
    rho = jnp.clip(self.param('rho', nn.initializers.constant(0.5), (features,),
                              self.param_dtype), 0.0, 1.0)
    y = _affine(self, rho * x_bn + (1.0 - rho) * x_in, True, True, self.param_dtype)
    return y.astype(x.dtype)


class Identity(nn.Module):
  """No normalization (the original U-Net)."""

  @nn.compact
  def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
    del mask
    return x


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


def for_mode(norm: ModuleDef, train: bool) -> ModuleDef:
  """`norm` with `use_running_average=not train` bound where the layer keeps running stats.

  Any linen module with a `use_running_average` field qualifies (ours, and Flax's BatchNorm).
  """
  cls = norm.func if isinstance(norm, functools.partial) else norm
  if 'use_running_average' in getattr(cls, '__dataclass_fields__', {}):
    return functools.partial(norm, use_running_average=not train)
  return norm
