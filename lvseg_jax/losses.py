"""The training loss: pixel cross-entropy and soft Dice, with partial labels."""

from typing import Mapping

import jax
import jax.numpy as jnp
import optax

from lvseg_jax import data as data_lib


def per_sample_losses(logits: jax.Array, masks: jax.Array,
                      smooth: float = 1.0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-sample pixel cross-entropy, soft-Dice loss on the foreground classes, hard cavity Dice.

  Partial labels: a pixel labelled BACKGROUND_OR_MYOCARDIUM contributes -log(p_0 + p_2), the
  likelihood of its label set, and a frame with such pixels leaves the myocardium out of its
  Dice loss, so a frame without an epicardial contour never says "no myocardium here". With
  complete labels both are the usual K-class losses.

  Args:
    logits: (N, H, W, K) float32.
    masks: (N, H, W) int class maps (`data.preprocess.class_map`): 0 background, 1 LV cavity,
      2 myocardium, 3 background or myocardium.
    smooth: additive smoothing of the soft Dice.

  Returns:
    ce (N,), soft_dice_loss = 1 - soft Dice, averaged over the foreground classes each frame
    labels (N,), hard Dice of the argmax's cavity (N,).
  """
  num_classes = logits.shape[-1]
  unknown = masks == data_lib.BACKGROUND_OR_MYOCARDIUM
  # Complete labels: optax's cross-entropy. The label set {background, myocardium}: the
  # log-likelihood of the set, logaddexp of the two log-probabilities.
  ce = optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.where(unknown, 0, jnp.minimum(masks, num_classes - 1)))
  if num_classes > data_lib.MYOCARDIUM:
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    either = -jnp.logaddexp(log_probs[..., 0], log_probs[..., data_lib.MYOCARDIUM])
    ce = jnp.where(unknown, either, ce)
  ce = ce.mean(axis=(1, 2))
  probs = jax.nn.softmax(logits, axis=-1)
  partial = jnp.any(unknown, axis=(1, 2))
  losses, weights = [], []
  for c in range(1, num_classes):
    true = (masks == c).astype(jnp.float32)
    inter = jnp.sum(probs[..., c] * true, axis=(1, 2))
    soft = (2.0 * inter + smooth) / (probs[..., c].sum(axis=(1, 2)) + true.sum(axis=(1, 2))
                                     + smooth)
    weight = (jnp.ones_like(soft) if c != data_lib.MYOCARDIUM else (~partial).astype(jnp.float32))
    losses.append(weight * (1.0 - soft))
    weights.append(weight)
  dice_loss = sum(losses) / sum(weights)
  pred = (jnp.argmax(logits, axis=-1) == data_lib.CAVITY).astype(jnp.float32)
  true = (masks == data_lib.CAVITY).astype(jnp.float32)
  denom = pred.sum(axis=(1, 2)) + true.sum(axis=(1, 2))
  hard = jnp.where(denom > 0, 2.0 * jnp.sum(pred * true, axis=(1, 2)) / jnp.maximum(denom, 1.0),
                   1.0)
  return ce, dice_loss, hard


def training_loss(logits: jax.Array, masks: jax.Array, ce_weight: float, dice_weight: float,
                  aux: Mapping[int, jax.Array] | None = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-sample `ce_weight * CE + dice_weight * soft-Dice loss`, with deep supervision.

  Deep supervision (nnU-Net's weights): the logits of decoder level l (`aux`, at 1/2**l of the
  resolution) are upsampled bilinearly to the masks' size and scored alike; the loss is the
  mean over the outputs weighted 2**-l (1 for the output itself), normalized to sum to 1.
  Upsampling the logits rather than downsampling the masks keeps partial labels exact.

  Args:
    logits: (N, H, W, K) the network's output.
    masks: (N, H, W) class maps, as for `per_sample_losses`.
    ce_weight, dice_weight: the two terms' weights (`config.train`).
    aux: {level: (N, H / 2**level, W / 2**level, K)} (`models.aux_logits`); None or {}: none.

  Returns:
    The weighted loss (N,), and the output's own CE (N,) and hard cavity Dice (N,).
  """
  ce, dice_loss, hard_dice = per_sample_losses(logits, masks)
  loss = ce_weight * ce + dice_weight * dice_loss
  total_weight = 1.0
  for level, level_logits in sorted((aux or {}).items()):
    up = jax.image.resize(level_logits, logits.shape, method='bilinear')
    level_ce, level_dice, _ = per_sample_losses(up, masks)
    weight = 0.5**level
    loss = loss + weight * (ce_weight * level_ce + dice_weight * level_dice)
    total_weight += weight
  return loss / total_weight, ce, hard_dice
