"""The training loss: pixel cross-entropy and soft Dice over label sets (partial labels)."""

import jax
import jax.numpy as jnp
import numpy as np

from lvseg_jax import data as data_lib


def label_sets(masks: jax.Array, num_classes: int) -> jax.Array:
  """(..., K) bool: the classes each label admits. Labels 0..K-1 admit themselves;
  BACKGROUND_OR_MYOCARDIUM (a frame without an epicardial contour) admits 0 and 2."""
  table = np.zeros((4, num_classes), bool)
  for c in range(min(num_classes, 3)):
    table[c, c] = True
  table[data_lib.BACKGROUND_OR_MYOCARDIUM, 0] = True
  if num_classes > data_lib.MYOCARDIUM:
    table[data_lib.BACKGROUND_OR_MYOCARDIUM, data_lib.MYOCARDIUM] = True
  return jnp.asarray(table)[masks]


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
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  admitted = label_sets(masks, num_classes)
  ce = -jax.nn.logsumexp(jnp.where(admitted, log_probs, -jnp.inf), axis=-1).mean(axis=(1, 2))
  probs = jnp.exp(log_probs)
  partial = jnp.any(masks == data_lib.BACKGROUND_OR_MYOCARDIUM, axis=(1, 2))
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
