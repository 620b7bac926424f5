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

Speed: every normalization in training mode runs through `_normalize`, which computes exactly
mean = E[x], var = max(E[x^2] - mean^2, 0) and `(x - mean) * rsqrt(var + epsilon) * scale +
bias` but has a hand-written VJP: the chain rule of those same formulas, organized as the usual
two per-channel reductions and one elementwise pass. Differentiating the formulas directly
makes XLA's CPU backend emit several extra full-size passes per layer (about 5x slower for a
128x128x16 BatchNorm + ReLU). With `relu=True` (the ReLU of the conv block) the layers go
further on the CPU: `_normalize_relu_cpu` runs the full-size passes as C++ kernels
(`lvseg_jax.cpu_kernels`, two passes over the activation each way) and keeps the arithmetic on
the statistics, `_statistics` and `_chain_rule`, shared with the XLA path.
"""

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lvseg_jax import cpu_kernels

Array = jax.Array


def _mean_and_mean_sq(x: Array, axes: Sequence[int], axis_name: str | None = None,
                      keepdims: bool = False) -> tuple[Array, Array]:
  """Float32 E[x] and E[x^2] over `axes` (and over the devices of `axis_name`)."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=tuple(axes), keepdims=keepdims)
  mean_sq = jnp.mean(jnp.square(x32), axis=tuple(axes), keepdims=keepdims)
  if axis_name is not None:
    # Equal per-device batch sizes, so averaging the moments gives the global moments.
    mean, mean_sq = jax.lax.pmean((mean, mean_sq), axis_name)
  return mean, mean_sq


def _count(x: Array, axes: Sequence[int], axis_name: str | None = None) -> Array:
  count = 1
  for a in axes:
    count *= x.shape[a]
  count = jnp.asarray(count, jnp.float32)
  if axis_name is not None:
    count = jax.lax.psum(count, axis_name)
  return count


def _sum(x: Array, axes: Sequence[int], axis_name: str | None) -> Array:
  """Sum over `axes` (keepdims), and over the devices of `axis_name` when given."""
  total = jnp.sum(x, axis=tuple(axes), keepdims=True)
  return total if axis_name is None else jax.lax.psum(total, axis_name)


def _non_channel_axes(axes: tuple[int, ...], ndim: int) -> tuple[int, ...]:
  """The axes of `axes` other than the channel (last) axis."""
  return tuple(a for a in axes if a < ndim - 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _normalize(x: Array, scale: Array | None, bias: Array | None, axes: tuple[int, ...],
               axis_name: str | None, epsilon: float) -> tuple[Array, Array, Array]:
  """`((x - mean) * rsqrt(var + epsilon)) * scale + bias` with the moments over `axes`.

  Returns the output (in x's dtype) and the float32 mean and biased variance (keepdims).
  `scale` / `bias` are per last-axis channel, or None for none. The custom VJP below is the
  exact chain rule of these formulas.
  """
  return _normalize_fwd(x, scale, bias, axes, axis_name, epsilon)[0]


def _statistics(mean: Array, mean_sq: Array, epsilon: float) -> tuple[Array, Array, Array]:
  """The raw variance E[x^2] - E[x]^2, the variance clamped at 0, and 1 / sqrt(var + eps)."""
  var_raw = mean_sq - jnp.square(mean)
  var = jnp.maximum(var_raw, 0.0)
  return var_raw, var, jax.lax.rsqrt(var + epsilon)


def _normalize_fwd(x, scale, bias, axes, axis_name, epsilon):
  mean, mean_sq = _mean_and_mean_sq(x, axes, axis_name, keepdims=True)
  var_raw, var, inv = _statistics(mean, mean_sq, epsilon)
  y = (x.astype(jnp.float32) - mean) * inv
  if scale is not None:
    y = y * scale
  if bias is not None:
    y = y + bias
  return (y.astype(x.dtype), mean, var), (x, scale, bias, mean, var_raw, inv)


def _chain_rule(x: Array, scale: Array | None, axes: tuple[int, ...], axis_name: str | None,
                mean: Array, var_raw: Array, inv: Array, sum_dy: Array, sum_dy_x: Array,
                dmean_out: Array, dvar_out: Array):
  """The normalization's gradients from the two sums of the upstream gradient dy.

  `sum_dy` and `sum_dy_x` are sum(dy) and sum(dy * x) over the statistics' non-channel axes,
  shaped like `mean` but per channel: for BatchNorm (1,1,1,C), for LayerNorm / InstanceNorm
  (N,1,1,C). Returns dscale, dbias (None where `scale` is None; dbias is returned either way)
  and per-statistic a, b, c with dx = a * dy + b * x + c.
  """
  channel_axes = tuple(range(x.ndim - 1))
  count = _count(x, axes, axis_name)
  # sum(dy * (x - mean)) is sum(dy * x) - mean * sum(dy). Reducing `dy * x` instead of
  # `dy * (x - mean)` keeps XLA:CPU from writing `x - mean` out as a full-size tensor for the
  # reduction (2-6% of a 128x128 train step); it rounds like the E[x^2] - E[x]^2 variance of
  # the forward pass.
  sum_dy_xc = sum_dy_x - mean * sum_dy
  stat_axes = _non_channel_axes(axes, x.ndim)
  other_axes = tuple(a for a in channel_axes if a not in stat_axes)
  dscale = None if scale is None else jnp.sum(sum_dy_xc * inv, axis=other_axes).reshape(
      scale.shape)
  dbias = jnp.sum(sum_dy, axis=other_axes).reshape(sum_dy.shape[-1:])
  # The same sums weighted by the per-channel scale, over the statistics' axes (LayerNorm's
  # include the channel axis), and over the devices of `axis_name` (BatchNorm under pmap).
  sum_dxhat = _sum(sum_dy if scale is None else sum_dy * scale, axes, axis_name)
  dinv = _sum(sum_dy_xc if scale is None else sum_dy_xc * scale, axes, axis_name)
  # Chain rule through y = (x - mean) * inv * scale + bias, inv = rsqrt(var + eps),
  # var = max(mean_sq - mean^2, 0), mean = E[x], mean_sq = E[x^2] (E over `axes` and devices).
  dvar = dinv * (-0.5) * inv**3 + dvar_out
  # d max(v, 0) / dv as jax.numpy differentiates it: 1 above, 0 below, 1/2 at the tie.
  dvar_raw = dvar * jnp.where(var_raw > 0, 1.0, jnp.where(var_raw == 0, 0.5, 0.0))
  dmean = -inv * sum_dxhat + dmean_out
  # dvar_raw / dx = 2 (x - mean) / count; d mean / dx = 1 / count. Written as
  # a * dy + b * x + c with per-statistic a, b, c: one elementwise pass over dy and x.
  dx_dy = inv if scale is None else inv * scale
  dx_x = dvar_raw * (2.0 / count)
  return dscale, dbias, dx_dy, dx_x, dmean / count - dx_x * mean


def _normalize_bwd(axes, axis_name, epsilon, residuals, cotangents):
  del epsilon
  x, scale, bias, mean, var_raw, inv = residuals
  dy, dmean_out, dvar_out = cotangents
  dy = dy.astype(jnp.float32)
  x32 = x.astype(jnp.float32)
  stat_axes = _non_channel_axes(axes, x.ndim)
  sum_dy = jnp.sum(dy, axis=stat_axes, keepdims=True)
  sum_dy_x = jnp.sum(dy * x32, axis=stat_axes, keepdims=True)
  dscale, dbias, dx_dy, dx_x, dx_offset = _chain_rule(
      x, scale, axes, axis_name, mean, var_raw, inv, sum_dy, sum_dy_x, dmean_out, dvar_out)
  dx = dy * dx_dy + dx_x * x32 + dx_offset
  if dscale is not None:
    dscale = dscale.astype(scale.dtype)
  dbias = None if bias is None else dbias.astype(bias.dtype)
  return dx.astype(x.dtype), dscale, dbias


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def _sample_channel_shape(x: Array) -> tuple[int, ...]:
  """x's shape with every axis between the sample and the channel axis set to 1."""
  return (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)


def _per_statistic(v: Array, x: Array) -> Array:
  """A statistic shaped like `mean` (keepdims), per channel or not, as (N, C) for the kernels."""
  return jnp.broadcast_to(v, _sample_channel_shape(x)).reshape(x.shape[0], x.shape[-1])


def _from_sample_channel_sums(sums: Array, x: Array, axes: tuple[int, ...]) -> Array:
  """(N, C) sums over the pixels, further summed over the sample / channel axes in `axes`."""
  sums = sums.reshape(_sample_channel_shape(x))
  outer = tuple(a for a in axes if a in (0, x.ndim - 1))
  return jnp.sum(sums, axis=outer, keepdims=True) if outer else sums


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _normalize_relu_cpu(x: Array, scale: Array, bias: Array, axes: tuple[int, ...],
                        axis_name: str | None, epsilon: float) -> tuple[Array, Array, Array]:
  """`relu` of `_normalize`'s output, and its mean and variance, by the C++ kernels.

  For float32 on the CPU, with the moments over the pixel axes and any of the sample and
  channel axes. The full-size passes run in `cpu_kernels`; the statistics and the chain rule
  are `_statistics` and `_chain_rule`, as in the XLA path.
  """
  return _normalize_relu_cpu_fwd(x, scale, bias, axes, axis_name, epsilon)[0]


def _normalize_relu_cpu_fwd(x, scale, bias, axes, axis_name, epsilon):
  sum_x, sum_x2 = cpu_kernels.moments(x)
  local_count = _count(x, axes)
  mean = _from_sample_channel_sums(sum_x, x, axes) / local_count
  mean_sq = _from_sample_channel_sums(sum_x2, x, axes) / local_count
  if axis_name is not None:
    mean, mean_sq = jax.lax.pmean((mean, mean_sq), axis_name)
  var_raw, var, inv = _statistics(mean, mean_sq, epsilon)
  # relu(((x - mean) * inv) * scale + bias) as relu(x * a + b).
  a = _per_statistic(inv * scale, x)
  b = _per_statistic(bias - mean * (inv * scale), x)
  y = cpu_kernels.affine_relu(x, a, b)
  return (y, mean, var), (x, scale, a, b, mean, var_raw, inv)


def _normalize_relu_cpu_bwd(axes, axis_name, epsilon, residuals, cotangents):
  del epsilon
  x, scale, a, b, mean, var_raw, inv = residuals
  dy, dmean_out, dvar_out = cotangents
  sum_dz, sum_dz_x = cpu_kernels.relu_grad_sums(dy, x, a, b)
  stat_axes = _non_channel_axes(axes, x.ndim)
  sum_dz = _from_sample_channel_sums(sum_dz, x, stat_axes)
  sum_dz_x = _from_sample_channel_sums(sum_dz_x, x, stat_axes)
  dscale, dbias, dx_dy, dx_x, dx_offset = _chain_rule(
      x, scale, axes, axis_name, mean, var_raw, inv, sum_dz, sum_dz_x, dmean_out, dvar_out)
  dx = cpu_kernels.relu_grad_apply(dy, x, a, b, _per_statistic(dx_dy, x),
                                   _per_statistic(dx_x, x), _per_statistic(dx_offset, x))
  return dx, dscale, dbias


_normalize_relu_cpu.defvjp(_normalize_relu_cpu_fwd, _normalize_relu_cpu_bwd)


# How a normalization + ReLU is computed: 'auto' takes the C++ kernels where they apply (CPU
# backend, float32, kernels built) and XLA otherwise; 'xla' always XLA; 'cpu' the kernels or an
# error.
NORM_KERNELS = ('auto', 'xla', 'cpu')


def _use_cpu_kernel(kernel: str, relu: bool, x: Array, param_dtype) -> bool:
  if kernel not in NORM_KERNELS:
    raise ValueError(f'Unknown normalization kernel {kernel!r}; choose one of {NORM_KERNELS}.')
  if not relu or kernel == 'xla':
    return False
  applies = x.dtype == jnp.float32 and jnp.dtype(param_dtype) == jnp.float32
  if kernel == 'cpu':
    if not applies:
      raise ValueError(f"Normalization kernel 'cpu' takes float32 activations and parameters, "
                       f'got {x.dtype} and {jnp.dtype(param_dtype)}.')
    if not cpu_kernels.available():
      raise ValueError("Normalization kernel 'cpu' is not available (disabled by "
                       'LVSEG_CPU_KERNELS, or it failed to build: see the log).')
    return True
  return applies and jax.default_backend() == 'cpu' and cpu_kernels.available()


def _normalize_then_relu(x: Array, scale: Array | None, bias: Array | None,
                         axes: tuple[int, ...], axis_name: str | None, epsilon: float,
                         relu: bool, kernel: str, param_dtype) -> tuple[Array, Array, Array]:
  """`_normalize`, followed by a ReLU when `relu`; by the C++ kernels where `kernel` allows."""
  if _use_cpu_kernel(kernel, relu, x, param_dtype):
    features = x.shape[-1]
    scale = jnp.ones((features,), jnp.float32) if scale is None else scale
    bias = jnp.zeros((features,), jnp.float32) if bias is None else bias
    return _normalize_relu_cpu(x, scale, bias, axes, axis_name, epsilon)
  y, mean, var = _normalize(x, scale, bias, axes, axis_name, epsilon)
  return (nn.relu(y) if relu else y), mean, var


def _affine_params(module: nn.Module, features: int, use_scale: bool, use_bias: bool,
                   param_dtype) -> tuple[Array | None, Array | None]:
  """The per-channel `scale` and `bias` parameters (None where not used)."""
  scale = (module.param('scale', nn.initializers.ones, (features,), param_dtype)
           if use_scale else None)
  bias = (module.param('bias', nn.initializers.zeros, (features,), param_dtype)
          if use_bias else None)
  return scale, bias


def _affine(module: nn.Module, y: Array, features: int, use_scale: bool, use_bias: bool,
            param_dtype) -> Array:
  """Per-channel learnable scale and bias on the last axis."""
  scale, bias = _affine_params(module, features, use_scale, use_bias, param_dtype)
  if scale is not None:
    y = y * scale
  if bias is not None:
    y = y + bias
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
    relu: apply the ReLU that follows the layer in a conv block as part of it. On the CPU
      (`kernel` 'auto' or 'cpu') the layer's full-size passes then run as C++ kernels
      (`lvseg_jax.cpu_kernels`): the same function, faster than XLA:CPU's (docs/BENCHMARKS.md,
      "Tenth run"). Their backward pass is not itself differentiable (no second derivatives).
    kernel: one of `NORM_KERNELS`; only used with `relu`.
  """
  use_running_average: bool | None = None
  axis_name: str | None = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  unbiased_running_var: bool = False
  param_dtype: jnp.dtype = jnp.float32
  relu: bool = False
  kernel: str = 'auto'

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
      y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.epsilon)
      y = _affine(self, y, features, self.use_scale, self.use_bias, self.param_dtype)
      y = nn.relu(y) if self.relu else y
      return y.astype(x.dtype)

    scale, bias = _affine_params(self, features, self.use_scale, self.use_bias,
                                 self.param_dtype)
    y, mean, var = _normalize_then_relu(x, scale, bias, reduce_axes, self.axis_name,
                                        self.epsilon, self.relu, self.kernel, self.param_dtype)
    if not self.is_initializing():
      mean, var = mean.reshape(features), var.reshape(features)
      stored_var = var
      if self.unbiased_running_var:
        count = _count(x, reduce_axes, self.axis_name)
        stored_var = var * count / jnp.maximum(count - 1.0, 1.0)
      ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * stored_var
    return y


class InstanceNorm(nn.Module):
  """Instance normalization: per sample and channel over (H, W); no running state.

  Attributes:
    relu, kernel: the ReLU after the layer, and how both are computed (see `BatchNorm`).
  """
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  param_dtype: jnp.dtype = jnp.float32
  relu: bool = False
  kernel: str = 'auto'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    spatial_axes = tuple(range(1, x.ndim - 1))
    scale, bias = _affine_params(self, x.shape[-1], self.use_scale, self.use_bias,
                                 self.param_dtype)
    return _normalize_then_relu(x, scale, bias, spatial_axes, None, self.epsilon, self.relu,
                                self.kernel, self.param_dtype)[0]


class LayerNorm(nn.Module):
  """Layer normalization in the CNN sense: per sample over (H, W, C), per-channel affine.

  This is what LN U-Nets use (PyTorch `nn.LayerNorm([C, H, W])` with a per-channel affine),
  not Flax's default of normalizing over the channel axis only.

  Attributes:
    relu, kernel: the ReLU after the layer, and how both are computed (see `BatchNorm`).
  """
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  param_dtype: jnp.dtype = jnp.float32
  relu: bool = False
  kernel: str = 'auto'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    sample_axes = tuple(range(1, x.ndim))
    scale, bias = _affine_params(self, x.shape[-1], self.use_scale, self.use_bias,
                                 self.param_dtype)
    return _normalize_then_relu(x, scale, bias, sample_axes, None, self.epsilon, self.relu,
                                self.kernel, self.param_dtype)[0]


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
# Norms that take `relu=True` (and `kernel`) and then apply the conv block's ReLU themselves.
RELU_FUSING_NORMS = ('batch', 'instance', 'layer')
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
