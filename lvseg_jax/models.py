"""The U-Net family of Chu & Tsekos (2022): U-Net, LNU-Net and IBU-Net.

One `UNet` module; the variants differ only in the normalization handed to its conv blocks
(a `ModuleDef`, as in Flax's examples/imagenet):

  * `unet`: the original U-Net (Ronneberger et al. 2015), no normalization
    (`model.norm='batch'` gives the common BN U-Net).
  * `lnu`: LayerNorm after every convolution of every block.
  * `ibu`: InstanceBatchNorm in the first encoder block, BatchNorm in every other block.

Convolutions are 'SAME'-padded (the original U-Net used unpadded convolutions and cropped the
skips; padding keeps input and output sizes equal, as every public SCD U-Net does).
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lvseg_jax import norms

Array = jax.Array
ModuleDef = Any

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# The collection the deep-supervision heads `sow` their logits into (Flax's name for it).
AUX_COLLECTION = 'intermediates'


class ConvBlock(nn.Module):
  """Two 3x3 convolutions, each followed by a normalization and a ReLU."""
  features: int
  norm: ModuleDef
  use_bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None) -> Array:
    for i in range(2):
      x = nn.Conv(self.features, (3, 3), padding='SAME', use_bias=self.use_bias,
                  dtype=self.dtype, name=f'conv{i}')(x)
      x = nn.relu(self.norm(name=f'norm{i}')(x, mask=mask))
    return x


class UNet(nn.Module):
  """U-Net with an injected normalization.

  Attributes:
    norm: the normalization of every conv block (a module class or `functools.partial` of
      one); layers with running statistics get `use_running_average` from `train`.
    first_norm: the first encoder block's normalization, if different (IBU-Net).
    num_classes: output logits per pixel.
    base_width: channels of the first block; doubled after each pooling.
    depth: number of 2x2 max-poolings (the bottleneck is block `depth`).
    use_bias: convolution biases (redundant before a normalization with its own bias).
    dtype: activation dtype; parameters and normalization statistics stay float32.
    deep_supervision: decoder levels 1..k below the output get a 1x1 head of their own whose
      logits go to the `AUX_COLLECTION` collection (`aux_logits`); 0: none.
  """
  norm: ModuleDef = norms.Identity
  first_norm: ModuleDef | None = None
  num_classes: int = 2
  base_width: int = 64
  depth: int = 4
  use_bias: bool = True
  dtype: Any = jnp.float32
  deep_supervision: int = 0

  @nn.compact
  def __call__(self, x: Array, train: bool = False, mask: Array | None = None) -> Array:
    """Logits (N, H, W, num_classes) of images x (N, H, W, C).

    `mask` (N,) bool, in training: the real samples of a padded batch, the only ones batch
    statistics are taken from.
    """
    size = x.shape[1:3]
    if size[0] % 2**self.depth or size[1] % 2**self.depth:
      raise ValueError(f'Input size {size} must be divisible by 2**depth = {2**self.depth}.')
    if not 0 <= self.deep_supervision < self.depth:
      raise ValueError(f'deep_supervision={self.deep_supervision} must be in [0, depth - 1 = '
                       f'{self.depth - 1}] (decoder levels below the output).')
    norm = norms.for_mode(self.norm, train)
    first_norm = norm if self.first_norm is None else norms.for_mode(self.first_norm, train)
    block = functools.partial(ConvBlock, use_bias=self.use_bias, dtype=self.dtype)
    x = x.astype(self.dtype)
    if mask is not None:
      mask = jnp.asarray(mask, bool).reshape((-1, 1, 1, 1))
    skips = []
    for level in range(self.depth):
      x = block(self.base_width * 2**level, first_norm if level == 0 else norm,
                name=f'down{level}')(x, mask)
      skips.append(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = block(self.base_width * 2**self.depth, norm, name='bottleneck')(x, mask)
    for level in reversed(range(self.depth)):
      features = self.base_width * 2**level
      x = nn.ConvTranspose(features, (2, 2), strides=(2, 2), dtype=self.dtype,
                           name=f'upconv{level}')(x)
      x = jnp.concatenate([skips[level], x], axis=-1)
      x = block(features, norm, name=f'up{level}')(x, mask)
      if 0 < level <= self.deep_supervision:
        # Deep supervision (as in nnU-Net): the train step reads these logits only when it
        # makes the collection mutable; otherwise `sow` keeps nothing and XLA drops the head.
        aux = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name=f'aux_head{level}')(x)
        self.sow(AUX_COLLECTION, f'level{level}', aux.astype(jnp.float32))
    logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name='head')(x)
    return logits.astype(jnp.float32)


def _unet(cfg: ml_collections.ConfigDict, norm: ModuleDef, first_norm: ModuleDef | None = None
          ) -> UNet:
  if cfg.dtype not in DTYPES:
    raise ValueError(f'Unknown model.dtype {cfg.dtype!r}; choose one of {sorted(DTYPES)}.')
  return UNet(norm=norm, first_norm=first_norm, num_classes=cfg.num_classes,
              base_width=cfg.base_width, depth=cfg.depth, use_bias=norm is norms.Identity,
              dtype=DTYPES[cfg.dtype], deep_supervision=cfg.deep_supervision)


def _batch_norm(cfg: ml_collections.ConfigDict, axis_name: str | None) -> ModuleDef:
  return functools.partial(norms.BatchNorm, momentum=cfg.bn_momentum,
                           epsilon=cfg.norm_epsilon, axis_name=axis_name)


UNET_NORMS = ('none', 'batch', 'layer', 'instance')


def build_unet(cfg: ml_collections.ConfigDict, axis_name: str | None = None) -> UNet:
  """The original U-Net; `cfg.norm` may add the same normalization to every block."""
  if cfg.norm not in UNET_NORMS:
    raise ValueError(f'unet takes model.norm in {UNET_NORMS}, got {cfg.norm!r}.')
  if cfg.norm == 'none':
    return _unet(cfg, norms.Identity)
  if cfg.norm == 'batch':
    return _unet(cfg, _batch_norm(cfg, axis_name))
  return _unet(cfg, functools.partial(norms.get_norm(cfg.norm), epsilon=cfg.norm_epsilon))


def build_lnu(cfg: ml_collections.ConfigDict, axis_name: str | None = None) -> UNet:
  """LNU-Net: LayerNorm after every convolution."""
  del axis_name  # no batch statistics
  return _unet(cfg, functools.partial(norms.LayerNorm, epsilon=cfg.norm_epsilon))


def build_ibu(cfg: ml_collections.ConfigDict, axis_name: str | None = None) -> UNet:
  """IBU-Net: InstanceBatchNorm in the first block, BatchNorm in all the others."""
  if cfg.ibn_mode not in norms.IBN_MODES:
    raise ValueError(f'Unknown model.ibn_mode {cfg.ibn_mode!r}; choose one of '
                     f'{norms.IBN_MODES}.')
  ibn = functools.partial(norms.InstanceBatchNorm, mode=cfg.ibn_mode, ratio=cfg.ibn_ratio,
                          momentum=cfg.bn_momentum, epsilon=cfg.norm_epsilon,
                          axis_name=axis_name)
  return _unet(cfg, _batch_norm(cfg, axis_name), first_norm=ibn)


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


def aux_logits(collections: dict[str, Any]) -> dict[int, Array]:
  """{decoder level: (N, S / 2**level, S / 2**level, K) logits} of the deep-supervision heads,
  from the mutable collections an `apply(..., mutable=[AUX_COLLECTION, ...])` returned."""
  sown = collections.get(AUX_COLLECTION, {})
  return {int(name.removeprefix('level')): values[0] for name, values in sown.items()}


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
