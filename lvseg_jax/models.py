"""The U-Net family of Chu & Tsekos (2022): U-Net, LNU-Net and IBU-Net.

One `UNet` module; the variants differ only in which normalization each conv block uses:

  * `unet`: the original U-Net (Ronneberger et al. 2015), no normalization
    (`model.norm='batch'` gives the common BN U-Net).
  * `lnu`: LayerNorm after every convolution of every block.
  * `ibu`: InstanceBatchNorm in the first encoder block, BatchNorm in every other block.

Convolutions are 'SAME'-padded (the original U-Net used unpadded convolutions and cropped the
skips; padding keeps input and output sizes equal, as every public SCD U-Net does).

CPU speed (see docs/BENCHMARKS.md, "Training throughput"): two layers are written so that XLA's
CPU backend runs them as fast kernels, computing exactly what `nn.ConvTranspose` and
`nn.max_pool` compute, with the same parameters:
  * `UpConv2x2`, the 2x2 stride-2 transposed convolution, as one matmul to 4 * features per
    pixel and a depth-to-space (XLA CPU otherwise runs the input-dilated convolution and its
    weight gradient with a naive loop emitter);
  * `max_pool_2x2` as a reshape + max whose gradient goes to the first maximum of each window,
    like `select_and_scatter` (which XLA CPU runs as an index-tracking reduce-window + scatter);
  * `conv_general_dilated`, the convolutions' kernel gradient computed with the roles of
    input and output gradient swapped where the layer has few output channels.
On the CPU, two parts run as C++ kernels (`lvseg_jax.cpu_kernels`), with the same values and
gradients:
  * the 3x3 convolutions with channels in multiples of 16, from 32x32 pixels up, forward and
    both gradients (`conv_general_dilated`; `model.conv_kernel`);
  * BatchNorm, InstanceNorm and LayerNorm, which apply the block's ReLU themselves
    (`relu=True`; `model.norm_kernel`).
"""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import ml_collections

from lvseg_jax import cpu_kernels
from lvseg_jax import norms

Array = jax.Array

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@jax.custom_vjp
def max_pool_2x2(x: Array) -> Array:
  """2x2 stride-2 max pooling of NHWC `x` (even H and W): `nn.max_pool(x, (2, 2), (2, 2))`.

  Same values as `nn.max_pool`; the gradient goes, like XLA's `select_and_scatter` (the
  `nn.max_pool` gradient), to the first maximum of each window in row-major order, so even at
  exact ties both give the same gradients.
  """
  n, h, w, c = x.shape
  return jnp.max(x.reshape(n, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def _max_pool_fwd(x: Array) -> tuple[Array, tuple[Array, Array]]:
  y = max_pool_2x2(x)
  return y, (x, y)


def _max_pool_bwd(residuals: tuple[Array, Array], g: Array) -> tuple[Array]:
  x, y = residuals
  n, h, w, c = x.shape
  x6 = x.reshape(n, h // 2, 2, w // 2, 2, c)
  is_max = x6 == y[:, :, None, :, None, :]
  # Window elements in row-major order; each one wins only if no earlier one is a maximum.
  taken = jnp.zeros_like(is_max[:, :, 0, :, 0])
  first = []
  for a in range(2):
    for b in range(2):
      here = is_max[:, :, a, :, b] & ~taken
      first.append(here)
      taken = taken | here
  first = jnp.stack(first, axis=-2).reshape(n, h // 2, w // 2, 2, 2, c)
  first = first.transpose(0, 1, 3, 2, 4, 5)            # (n, h/2, a, w/2, b, c)
  dx = jnp.where(first, g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
  return (dx.reshape(n, h, w, c),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


# XLA:CPU computes a convolution's kernel gradient as a convolution whose output features are
# the layer's output channels; with 16 or fewer of them its matrix kernel runs narrow, and the
# same gradient computed as a convolution over the layer's input channels is 1.2-3.6x faster
# when those are more (docs/BENCHMARKS.md, "Seventh run"). With 32 or more output channels
# neither form wins consistently, so those stay with XLA's.
_NARROW_OUTPUT_CHANNELS = 16
_NHWC_HWIO = ('NHWC', 'HWIO', 'NHWC')


def _swapped_kernel_grad_pays(in_channels: int, out_channels: int) -> bool:
  return out_channels <= _NARROW_OUTPUT_CHANNELS and out_channels < in_channels


def _conv_nhwc(x: Array, kernel: Array, padding: tuple[tuple[int, int], ...],
               precision: Any) -> Array:
  return lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_NHWC_HWIO,
                                  precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_swapped_kernel_grad(x: Array, kernel: Array, padding: tuple[tuple[int, int], ...],
                              precision: Any) -> Array:
  """A stride-1 NHWC convolution whose kernel gradient contracts over the output gradient."""
  return _conv_nhwc(x, kernel, padding, precision)


def _conv_swapped_fwd(x, kernel, padding, precision):
  return _conv_nhwc(x, kernel, padding, precision), (x, kernel)


def _conv_swapped_bwd(padding, precision, residuals, dy):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda a: _conv_nhwc(a, kernel, padding, precision), x)
  (dx,) = input_vjp(dy)
  # dkernel[p, q, i, o] = sum_{n,h,w} x[n, h + p - lo_h, w + q - lo_w, i] dy[n, h, w, o]: a
  # convolution of the padded dy (batch: the output channels o; features: the samples n) with
  # x as its window (in: n, out: i), whose output taps come out flipped.
  kernel_size = kernel.shape[:2]
  swapped_padding = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(kernel_size, padding))
  grad = lax.conv_general_dilated(dy, x, (1, 1), swapped_padding,
                                  dimension_numbers=('CHWN', 'IHWO', 'NHWC'),
                                  precision=precision)
  dkernel = jnp.transpose(grad[:, ::-1, ::-1, :], (1, 2, 3, 0))
  return dx, dkernel.astype(kernel.dtype)


_conv_swapped_kernel_grad.defvjp(_conv_swapped_fwd, _conv_swapped_bwd)


# How a 3x3 convolution is computed: 'auto' takes the C++ kernels (`cpu_kernels.conv3x3`) on
# the CPU where they were measured faster than XLA's (float32, channels multiples of 16, at
# least 32x32 pixels: docs/BENCHMARKS.md, "Eleventh run") and XLA otherwise; 'xla' always XLA;
# 'cpu' the kernels wherever the layer's form allows them, or an error if they are unavailable.
CONV_KERNELS = ('auto', 'xla', 'cpu')
_KERNEL_CHANNELS = 16
_KERNEL_MIN_PIXELS = 32 * 32


@jax.custom_vjp
def _conv3x3_cpu(x: Array, kernel: Array) -> Array:
  """A 3x3 stride-1 'SAME' NHWC convolution and its gradients by the C++ kernels."""
  return cpu_kernels.conv3x3(x, kernel)


def _conv3x3_cpu_fwd(x, kernel):
  return cpu_kernels.conv3x3(x, kernel), (x, kernel)


def _conv3x3_cpu_bwd(residuals, dy):
  x, kernel = residuals
  # The input gradient is the convolution of dy with the kernel flipped in space and its
  # input and output channels swapped ('SAME' 3x3 padding is symmetric).
  dx = cpu_kernels.conv3x3(dy, jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2)))
  return dx, cpu_kernels.conv3x3_kernel_grad(x, dy)


_conv3x3_cpu.defvjp(_conv3x3_cpu_fwd, _conv3x3_cpu_bwd)


def _conv3x3_kernel_applies(lhs: Array, rhs: Array, padding: tuple[tuple[int, int], ...],
                            kernel: str) -> bool:
  """Whether `kernel` sends this plain stride-1 NHWC convolution to `_conv3x3_cpu`."""
  if kernel not in CONV_KERNELS:
    raise ValueError(f'Unknown convolution kernel {kernel!r}; choose one of {CONV_KERNELS}.')
  if kernel == 'xla':
    return False
  fits = (rhs.shape[:2] == (3, 3) and padding == ((1, 1), (1, 1))
          and lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32
          and rhs.shape[2] % _KERNEL_CHANNELS == 0 and rhs.shape[3] % _KERNEL_CHANNELS == 0)
  if kernel == 'cpu':
    if fits and not cpu_kernels.conv3x3_available():
      raise ValueError("Convolution kernel 'cpu' is not available (disabled by "
                       'LVSEG_CPU_KERNELS, no AVX-512, or it failed to build: see the log).')
    return fits
  return (fits and lhs.shape[1] * lhs.shape[2] >= _KERNEL_MIN_PIXELS
          and cpu_kernels.conv3x3_available())


def conv_general_dilated(lhs: Array, rhs: Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]], lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                         precision: Any = None, kernel: str = 'auto') -> Array:
  """`lax.conv_general_dilated` (for `nn.Conv(conv_general_dilated=...)`), same values.

  On the CPU backend, a plain stride-1 2-D NHWC convolution goes
  * to the C++ kernels (`_conv3x3_cpu`) if it is a 'SAME' 3x3 one that `kernel` allows there;
  * else, with at most 16 output channels, fewer than its input channels (the 1x1 head), to the
    swapped kernel gradient above;
  everything else to `lax.conv_general_dilated` unchanged.
  """
  plain = functools.partial(lax.conv_general_dilated, lhs, rhs, window_strides, padding,
                            lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                            dimension_numbers=dimension_numbers,
                            feature_group_count=feature_group_count, precision=precision)
  if (lhs.ndim != 4 or jax.default_backend() != 'cpu' or feature_group_count != 1
      or any(s != 1 for s in window_strides)
      or any(d != 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
      or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC_HWIO)):
    return plain()
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if _conv3x3_kernel_applies(lhs, rhs, padding, kernel):
    return _conv3x3_cpu(lhs, rhs)
  if not _swapped_kernel_grad_pays(rhs.shape[2], rhs.shape[3]):
    return plain()
  return _conv_swapped_kernel_grad(lhs, rhs, padding, precision)


class UpConv2x2(nn.Module):
  """`nn.ConvTranspose(features, (2, 2), strides=(2, 2))` (padding 'SAME') as a matmul.

  Same parameters as `nn.ConvTranspose` (`kernel` (2, 2, in, features), `bias`) and the same
  initialization. With stride = kernel size the output windows do not overlap: output pixel
  (2i + a, 2j + b) is `x[i, j] @ kernel[1 - a, 1 - b] + bias` (lax.conv_transpose with
  'SAME' padding and no kernel transposition flips the kernel), so the layer is one
  (N*H*W, in) x (in, 4 * features) matmul followed by a depth-to-space.
  """
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Callable[..., Array] = nn.initializers.lecun_normal()
  bias_init: Callable[..., Array] = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n, h, w, cin = x.shape
    kernel = self.param('kernel', self.kernel_init, (2, 2, cin, self.features),
                        self.param_dtype)
    bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    # (cin, a, b, features) with the spatial flip, as one (cin, 4 * features) matrix.
    k = jnp.transpose(kernel[::-1, ::-1], (2, 0, 1, 3)).reshape(cin, 4 * self.features)
    y = jnp.dot(x.reshape(n * h * w, cin), k)
    y = y.reshape(n, h, w, 2, 2, self.features).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(n, 2 * h, 2 * w, self.features) + bias


class ConvBlock(nn.Module):
  """Two 3x3 convolutions, each followed by a normalization and ReLU."""
  features: int
  norm: str = 'none'
  norm_kwargs: dict[str, Any] | None = None
  dtype: Any = jnp.float32
  conv_kernel: str = 'auto'

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    norm_cls = norms.get_norm(self.norm)
    kwargs = dict(self.norm_kwargs or {})
    for i in range(2):
      # A bias before a normalization with its own bias is redundant.
      x = nn.Conv(self.features, (3, 3), padding='SAME', use_bias=self.norm == 'none',
                  dtype=self.dtype, name=f'conv{i}',
                  conv_general_dilated=functools.partial(conv_general_dilated,
                                                         kernel=self.conv_kernel))(x)
      fuse_relu = self.norm in norms.RELU_FUSING_NORMS
      norm = norm_cls(name=f'norm{i}', **kwargs, **({'relu': True} if fuse_relu else {}))
      if self.norm in norms.STATEFUL_NORMS:
        x = norm(x, use_running_average=not train)
      else:
        x = norm(x)
      if not fuse_relu:
        x = nn.relu(x)
    return x


class UNet(nn.Module):
  """U-Net with a configurable normalization per block.

  Attributes:
    num_classes: output logits per pixel.
    base_width: channels of the first block; doubled after each pooling.
    depth: number of 2x2 max-poolings (the bottleneck is block `depth`).
    block_norms: normalization name of each of the `2 * depth + 1` conv blocks, in order
      (encoder blocks 0..depth-1, bottleneck, decoder blocks depth-1..0).
    norm_kwargs: keyword arguments for the normalization layers (momentum, epsilon, ...).
    ibn_kwargs: extra keyword arguments for InstanceBatchNorm layers (mode, ratio).
    axis_name: mapped axis over which BatchNorm statistics are averaged (pmap / shard_map).
    dtype: activation dtype; parameters and normalization statistics stay float32.
    conv_kernel: how the 3x3 convolutions are computed, one of `CONV_KERNELS`.
  """
  num_classes: int = 2
  base_width: int = 64
  depth: int = 4
  block_norms: Sequence[str] = ('none',) * 9
  norm_kwargs: dict[str, Any] | None = None
  ibn_kwargs: dict[str, Any] | None = None
  axis_name: str | None = None
  dtype: Any = jnp.float32
  conv_kernel: str = 'auto'

  def _block(self, index: int, features: int, name: str) -> ConvBlock:
    norm = self.block_norms[index]
    kwargs = {}
    if norm != 'none':
      kwargs.update(self.norm_kwargs or {})
    if norm in norms.STATEFUL_NORMS:
      kwargs['axis_name'] = self.axis_name
    if norm == 'ibn':
      kwargs.update(self.ibn_kwargs or {})
    if norm not in norms.RELU_FUSING_NORMS:
      kwargs.pop('kernel', None)
    return ConvBlock(features, norm=norm, norm_kwargs=kwargs, dtype=self.dtype,
                     conv_kernel=self.conv_kernel, name=name)

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if len(self.block_norms) != 2 * self.depth + 1:
      raise ValueError(f'block_norms needs {2 * self.depth + 1} entries for depth '
                       f'{self.depth}, got {len(self.block_norms)}.')
    size = x.shape[1:3]
    if size[0] % 2**self.depth or size[1] % 2**self.depth:
      raise ValueError(f'Input size {size} must be divisible by 2**depth = {2**self.depth}.')
    x = x.astype(self.dtype)
    skips = []
    for level in range(self.depth):
      x = self._block(level, self.base_width * 2**level, f'down{level}')(x, train)
      skips.append(x)
      x = max_pool_2x2(x)
    x = self._block(self.depth, self.base_width * 2**self.depth, 'bottleneck')(x, train)
    for i, level in enumerate(reversed(range(self.depth))):
      features = self.base_width * 2**level
      x = UpConv2x2(features, dtype=self.dtype, name=f'upconv{level}')(x)
      x = jnp.concatenate([skips[level], x], axis=-1)
      x = self._block(self.depth + 1 + i, features, f'up{level}')(x, train)
    logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                     conv_general_dilated=conv_general_dilated, name='head')(x)
    return logits.astype(jnp.float32)


def _common_kwargs(cfg: ml_collections.ConfigDict, axis_name: str | None,
                   norm: str) -> dict[str, Any]:
  """UNet keyword arguments, with the normalization layers' for the model's `norm`."""
  if cfg.dtype not in DTYPES:
    raise ValueError(f'Unknown model dtype {cfg.dtype!r}; choose one of {sorted(DTYPES)}.')
  return dict(num_classes=cfg.num_classes, base_width=cfg.base_width, depth=cfg.depth,
              axis_name=axis_name, dtype=DTYPES[cfg.dtype],
              conv_kernel=_kernel_choice(cfg, 'conv_kernel', CONV_KERNELS),
              norm_kwargs=_norm_kwargs_for(norm, cfg))


def _kernel_choice(cfg: ml_collections.ConfigDict, field: str, choices: tuple[str, ...]) -> str:
  """`cfg.<field>` ('auto' where the config predates it), checked against `choices`."""
  kernel = cfg.get(field, 'auto')
  if kernel not in choices:
    raise ValueError(f'Unknown model.{field} {kernel!r}; choose one of {choices}.')
  return kernel


def _norm_kwargs_for(norm: str, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  kwargs = dict(epsilon=cfg.norm_epsilon,
                kernel=_kernel_choice(cfg, 'norm_kernel', norms.NORM_KERNELS))
  if norm in norms.STATEFUL_NORMS:
    kwargs['momentum'] = cfg.bn_momentum
  return kwargs


def build_unet(cfg: ml_collections.ConfigDict, axis_name: str | None = None) -> UNet:
  """The original U-Net; `cfg.norm` may add the same normalization to every block."""
  if cfg.norm not in ('none', 'batch', 'layer', 'instance'):
    raise ValueError(f"unet takes model.norm in ('none', 'batch', 'layer', 'instance'), "
                     f'got {cfg.norm!r}.')
  return UNet(block_norms=(cfg.norm,) * (2 * cfg.depth + 1),
              **_common_kwargs(cfg, axis_name, cfg.norm))


def build_lnu(cfg: ml_collections.ConfigDict, axis_name: str | None = None) -> UNet:
  """LNU-Net: LayerNorm after every convolution."""
  return UNet(block_norms=('layer',) * (2 * cfg.depth + 1),
              **_common_kwargs(cfg, axis_name, 'layer'))


def build_ibu(cfg: ml_collections.ConfigDict, axis_name: str | None = None) -> UNet:
  """IBU-Net: InstanceBatchNorm in the first block, BatchNorm in all the others."""
  if cfg.ibn_mode not in norms.IBN_MODES:
    raise ValueError(f'Unknown model.ibn_mode {cfg.ibn_mode!r}; choose one of '
                     f'{norms.IBN_MODES}.')
  kwargs = _common_kwargs(cfg, axis_name, 'ibn')
  kwargs['ibn_kwargs'] = dict(mode=cfg.ibn_mode, ratio=cfg.ibn_ratio)
  block_norms = ('ibn',) + ('batch',) * (2 * cfg.depth)
  return UNet(block_norms=block_norms, **kwargs)


MODELS: dict[str, Callable[..., UNet]] = {
    'unet': build_unet,
    'lnu': build_lnu,
    'ibu': build_ibu,
}


def get_model(cfg: ml_collections.ConfigDict, axis_name: str | None = None) -> UNet:
  """Builds the model named by `cfg.name` from a `config.model` section.

  Args:
    cfg: the `config.model` ConfigDict.
    axis_name: set when the model runs under pmap / shard_map so BatchNorm statistics are
      averaged over devices.
  """
  if cfg.name not in MODELS:
    raise ValueError(f'Unknown model name {cfg.name!r}; choose one of {sorted(MODELS)}.')
  return MODELS[cfg.name](cfg, axis_name)


def init_variables(model: nn.Module, key: jax.Array, image_size: int,
                   in_channels: int = 1) -> dict[str, Any]:
  """Initializes params (and `batch_stats` where the model has them)."""
  dummy = jnp.zeros((1, image_size, image_size, in_channels), jnp.float32)
  return dict(model.init(key, dummy, train=False))


def has_batch_stats(cfg: ml_collections.ConfigDict) -> bool:
  """Whether the configured model keeps running statistics."""
  return cfg.name == 'ibu' or (cfg.name == 'unet' and cfg.norm == 'batch')


def count_params(params: Any) -> int:
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
