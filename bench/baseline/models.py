"""The U-Net family of Chu & Tsekos (2022): U-Net, LNU-Net and IBU-Net.

One `UNet` module; the variants differ only in which normalization each conv block uses:

  * `unet`: the original U-Net (Ronneberger et al. 2015), no normalization
    (`model.norm='batch'` gives the common BN U-Net).
  * `lnu`: LayerNorm after every convolution of every block.
  * `ibu`: InstanceBatchNorm in the first encoder block, BatchNorm in every other block.

Convolutions are 'SAME'-padded (the original U-Net used unpadded convolutions and cropped the
skips; padding keeps input and output sizes equal, as every public SCD U-Net does).
"""

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from bench.baseline import norms

Array = jax.Array

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class ConvBlock(nn.Module):
  """Two 3x3 convolutions, each followed by a normalization and ReLU."""
  features: int
  norm: str = 'none'
  norm_kwargs: dict[str, Any] | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    norm_cls = norms.get_norm(self.norm)
    kwargs = dict(self.norm_kwargs or {})
    for i in range(2):
      # A bias before a normalization with its own bias is redundant.
      x = nn.Conv(self.features, (3, 3), padding='SAME', use_bias=self.norm == 'none',
                  dtype=self.dtype, name=f'conv{i}')(x)
      norm = norm_cls(name=f'norm{i}', **kwargs)
      if self.norm in norms.STATEFUL_NORMS:
        x = norm(x, use_running_average=not train)
      else:
        x = norm(x)
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
  """
  num_classes: int = 2
  base_width: int = 64
  depth: int = 4
  block_norms: Sequence[str] = ('none',) * 9
  norm_kwargs: dict[str, Any] | None = None
  ibn_kwargs: dict[str, Any] | None = None
  axis_name: str | None = None
  dtype: Any = jnp.float32

  def _block(self, index: int, features: int, name: str) -> ConvBlock:
    norm = self.block_norms[index]
    kwargs = {}
    if norm != 'none':
      kwargs.update(self.norm_kwargs or {})
    if norm in norms.STATEFUL_NORMS:
      kwargs['axis_name'] = self.axis_name
    if norm == 'ibn':
      kwargs.update(self.ibn_kwargs or {})
    return ConvBlock(features, norm=norm, norm_kwargs=kwargs, dtype=self.dtype, name=name)

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
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = self._block(self.depth, self.base_width * 2**self.depth, 'bottleneck')(x, train)
    for i, level in enumerate(reversed(range(self.depth))):
      features = self.base_width * 2**level
      x = nn.ConvTranspose(features, (2, 2), strides=(2, 2), dtype=self.dtype,
                           name=f'upconv{level}')(x)
      x = jnp.concatenate([skips[level], x], axis=-1)
      x = self._block(self.depth + 1 + i, features, f'up{level}')(x, train)
    logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name='head')(x)
    return logits.astype(jnp.float32)


def _common_kwargs(cfg: ml_collections.ConfigDict, axis_name: str | None) -> dict[str, Any]:
  if cfg.dtype not in DTYPES:
    raise ValueError(f'Unknown model dtype {cfg.dtype!r}; choose one of {sorted(DTYPES)}.')
  return dict(num_classes=cfg.num_classes, base_width=cfg.base_width, depth=cfg.depth,
              axis_name=axis_name, dtype=DTYPES[cfg.dtype],
              norm_kwargs=dict(momentum=cfg.bn_momentum, epsilon=cfg.norm_epsilon))


def _norm_kwargs_for(norm: str, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  if norm in norms.STATEFUL_NORMS:
    return dict(momentum=cfg.bn_momentum, epsilon=cfg.norm_epsilon)
  return dict(epsilon=cfg.norm_epsilon)


def build_unet(cfg: ml_collections.ConfigDict, axis_name: str | None = None) -> UNet:
  """The original U-Net; `cfg.norm` may add the same normalization to every block."""
  if cfg.norm not in ('none', 'batch', 'layer', 'instance'):
    raise ValueError(f"unet takes model.norm in ('none', 'batch', 'layer', 'instance'), "
                     f'got {cfg.norm!r}.')
  kwargs = _common_kwargs(cfg, axis_name)
  kwargs['norm_kwargs'] = _norm_kwargs_for(cfg.norm, cfg)
  return UNet(block_norms=(cfg.norm,) * (2 * cfg.depth + 1), **kwargs)


def build_lnu(cfg: ml_collections.ConfigDict, axis_name: str | None = None) -> UNet:
  """LNU-Net: LayerNorm after every convolution."""
  kwargs = _common_kwargs(cfg, axis_name)
  kwargs['norm_kwargs'] = _norm_kwargs_for('layer', cfg)
  return UNet(block_norms=('layer',) * (2 * cfg.depth + 1), **kwargs)


def build_ibu(cfg: ml_collections.ConfigDict, axis_name: str | None = None) -> UNet:
  """IBU-Net: InstanceBatchNorm in the first block, BatchNorm in all the others."""
  if cfg.ibn_mode not in norms.IBN_MODES:
    raise ValueError(f'Unknown model.ibn_mode {cfg.ibn_mode!r}; choose one of '
                     f'{norms.IBN_MODES}.')
  kwargs = _common_kwargs(cfg, axis_name)
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
