"""PyTorch reference of the lvseg_jax U-Net family, for the throughput benchmarks only.

Same architecture as `lvseg_jax.models.UNet`: `depth` 2x2 max-poolings, two 3x3 'same'
convolutions per block (bias only without normalization), 2x2 stride-2 transposed
convolutions, skip concatenation `[skip, up]`, 1x1 head. Normalization layers:

  * `batch`: `nn.BatchNorm2d` (momentum 0.1 == Flax 0.9).
  * `layer`: normalization over (C, H, W) per sample with a per-channel affine, which is
    exactly `nn.GroupNorm(1, C)`.
  * `ibn`: IBN-Net "a" split: `InstanceNorm2d(affine=True)` on the first round(ratio * C)
    channels, `BatchNorm2d` on the rest, concatenated.

Loss: soft Dice on the foreground probability + pixel cross-entropy (the lvseg_jax loss),
optimizer `torch.optim.Adam`. Images are NCHW float32 (PyTorch's native layout).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class IBN(nn.Module):
  """IBN-Net "a": instance norm on a fraction of the channels, batch norm on the rest."""

  def __init__(self, channels: int, ratio: float = 0.5, eps: float = 1e-5):
    super().__init__()
    self.half = int(round(channels * ratio))
    self.instance = nn.InstanceNorm2d(self.half, eps=eps, affine=True)
    self.batch = nn.BatchNorm2d(channels - self.half, eps=eps, momentum=0.1)

  def forward(self, x):
    return torch.cat([self.instance(x[:, :self.half]), self.batch(x[:, self.half:])], dim=1)


def make_norm(name: str, channels: int, eps: float = 1e-5) -> nn.Module:
  if name == 'none':
    return nn.Identity()
  if name == 'batch':
    return nn.BatchNorm2d(channels, eps=eps, momentum=0.1)
  if name == 'layer':
    return nn.GroupNorm(1, channels, eps=eps)   # LayerNorm over (C, H, W), per-channel affine
  if name == 'instance':
    return nn.InstanceNorm2d(channels, eps=eps, affine=True)
  if name == 'ibn':
    return IBN(channels, eps=eps)
  raise ValueError(f'Unknown norm {name!r}')


class ConvBlock(nn.Module):

  def __init__(self, cin: int, cout: int, norm: str):
    super().__init__()
    layers = []
    for i in range(2):
      layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=norm == 'none'),
                 make_norm(norm, cout), nn.ReLU(inplace=True)]
    self.body = nn.Sequential(*layers)

  def forward(self, x):
    return self.body(x)


class UNet(nn.Module):

  def __init__(self, block_norms, base_width: int = 16, depth: int = 4, in_channels: int = 1,
               num_classes: int = 2):
    super().__init__()
    assert len(block_norms) == 2 * depth + 1
    self.depth = depth
    w = [base_width * 2**i for i in range(depth + 1)]
    self.down = nn.ModuleList()
    cin = in_channels
    for level in range(depth):
      self.down.append(ConvBlock(cin, w[level], block_norms[level]))
      cin = w[level]
    self.bottleneck = ConvBlock(cin, w[depth], block_norms[depth])
    cin = w[depth]
    self.upconv = nn.ModuleList()
    self.up = nn.ModuleList()
    for i, level in enumerate(reversed(range(depth))):
      self.upconv.append(nn.ConvTranspose2d(cin, w[level], 2, stride=2))
      self.up.append(ConvBlock(2 * w[level], w[level], block_norms[depth + 1 + i]))
      cin = w[level]
    self.head = nn.Conv2d(cin, num_classes, 1)

  def forward(self, x):
    skips = []
    for block in self.down:
      x = block(x)
      skips.append(x)
      x = F.max_pool2d(x, 2)
    x = self.bottleneck(x)
    for upconv, block, skip in zip(self.upconv, self.up, reversed(skips)):
      x = block(torch.cat([skip, upconv(x)], dim=1))
    return self.head(x)


def block_norms_for(model: str, depth: int) -> tuple[str, ...]:
  """The per-block norms of the lvseg_jax variants: unet, unet_bn, lnu, ibu."""
  n = 2 * depth + 1
  if model == 'unet':
    return ('none',) * n
  if model == 'unet_bn':
    return ('batch',) * n
  if model == 'lnu':
    return ('layer',) * n
  if model == 'ibu':
    return ('ibn',) + ('batch',) * (n - 1)
  raise ValueError(f'Unknown model {model!r}')


def dice_ce_loss(logits, masks, dice_weight: float = 1.0, ce_weight: float = 1.0,
                 smooth: float = 1.0):
  """`lvseg_jax.losses.per_sample_losses`: per-sample pixel CE + (1 - soft Dice) on the
  foreground probability 1 - p(background), averaged over the batch. Also returns the hard
  (argmax) Dice the JAX step reports as a metric, so both steps do the same work."""
  ce = F.cross_entropy(logits, masks, reduction='none').mean(dim=(1, 2))
  fg = 1.0 - torch.softmax(logits, dim=1)[:, 0]
  target = (masks > 0).to(fg.dtype)
  inter = (fg * target).sum(dim=(1, 2))
  soft = (2.0 * inter + smooth) / (fg.sum(dim=(1, 2)) + target.sum(dim=(1, 2)) + smooth)
  loss = (ce_weight * ce + dice_weight * (1.0 - soft)).mean()
  with torch.no_grad():
    pred = (logits.argmax(dim=1) > 0).to(fg.dtype)
    denom = pred.sum(dim=(1, 2)) + target.sum(dim=(1, 2))
    hard = torch.where(denom > 0, 2.0 * (pred * target).sum(dim=(1, 2)) / denom.clamp(min=1.0),
                       torch.ones_like(denom))
  return loss, hard.mean()


def make_train_step(model: nn.Module, lr: float = 1e-3, channels_last: bool = False,
                    autocast_dtype: torch.dtype | None = None):
  """Returns `step(images_nchw, masks) -> loss` doing forward, backward and an Adam update.

  The step runs on the device of the model's parameters (move the model first).
  `autocast_dtype=torch.bfloat16` runs the forward pass under `torch.autocast` (bf16
  convolutions, float32 parameters and optimizer), PyTorch's counterpart of
  `config.model.dtype='bfloat16'`.
  """
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
  opt = torch.optim.Adam(model.parameters(), lr=lr)
  model.train()
  device_type = next(model.parameters()).device.type

  def step(images, masks):
    if channels_last:
      images = images.contiguous(memory_format=torch.channels_last)
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
      logits = model(images)
    loss, _ = dice_ce_loss(logits.float(), masks)
    loss.backward()
    opt.step()
    return loss

  return step


def count_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())
