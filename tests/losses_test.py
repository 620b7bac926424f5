"""Tests of lvseg_jax.losses against NumPy, by hand, and by finite differences."""

import jax
import jax.numpy as jnp
import numpy as np

from lvseg_jax import data
from lvseg_jax import losses


def _np_losses(logits, masks, smooth=1.0):
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, masks[..., None], -1)[..., 0].mean((1, 2))
  p = 1 - np.exp(logp[..., 0])
  t = (masks > 0).astype(np.float64)
  soft = (2 * (p * t).sum((1, 2)) + smooth) / (p.sum((1, 2)) + t.sum((1, 2)) + smooth)
  hard_p = logits.argmax(-1) > 0
  hard = 2 * (hard_p & (t > 0)).sum((1, 2)) / (hard_p.sum((1, 2)) + t.sum((1, 2)))
  return ce, 1 - soft, hard


def test_per_sample_losses_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 2, (3, 10, 12, 2)).astype(np.float32)
  masks = (rng.random((3, 10, 12)) < 0.3).astype(np.int32)
  got = losses.per_sample_losses(jnp.asarray(logits), jnp.asarray(masks))
  for g, e in zip(got, _np_losses(logits.astype(np.float64), masks)):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def test_partial_label_loss_by_hand():
  """A 1x2 frame, 3 classes. Full labels (cavity, myocardium): CE = mean -log p_label and the
  Dice loss averages cavity and myocardium. Partial labels (cavity, background-or-myocardium):
  the second pixel's CE is -log(p_0 + p_2) and the myocardium leaves the Dice loss."""
  logits = np.array([[[[0.0, 2.0, 1.0], [1.0, -1.0, 0.5]]]], np.float32)   # (1, 1, 2, 3)
  p = np.exp(logits[0, 0].astype(np.float64))
  p /= p.sum(-1, keepdims=True)
  soft = lambda c, true: (2 * np.dot(p[:, c], true) + 1) / (p[:, c].sum() + sum(true) + 1)
  full = np.array([[[1, 2]]], np.int32)
  ce, dice_loss, hard = losses.per_sample_losses(jnp.asarray(logits), jnp.asarray(full))
  np.testing.assert_allclose(ce, [-(np.log(p[0, 1]) + np.log(p[1, 2])) / 2], rtol=1e-6)
  np.testing.assert_allclose(
      dice_loss, [((1 - soft(1, [1, 0])) + (1 - soft(2, [0, 1]))) / 2], rtol=1e-6)
  # argmax: pixel 0 is cavity (2.0), pixel 1 background (1.0): hard cavity Dice 2*1/(1+1) = 1.
  np.testing.assert_allclose(hard, [1.0])
  partial = np.array([[[1, data.BACKGROUND_OR_MYOCARDIUM]]], np.int32)
  ce, dice_loss, _ = losses.per_sample_losses(jnp.asarray(logits), jnp.asarray(partial))
  np.testing.assert_allclose(ce, [-(np.log(p[0, 1]) + np.log(p[1, 0] + p[1, 2])) / 2],
                             rtol=1e-6)
  np.testing.assert_allclose(dice_loss, [1 - soft(1, [1, 0])], rtol=1e-6)


def test_partial_labels_equal_the_full_loss_when_every_frame_has_both_contours():
  """Complete 3-class maps: optax's cross-entropy and the mean of the two NumPy soft Dice
  losses; a batch mixing in a partial frame changes only that frame's values."""
  rng = np.random.default_rng(3)
  logits = rng.normal(0, 2, (3, 8, 9, 3)).astype(np.float32)
  masks = rng.integers(0, 3, (3, 8, 9)).astype(np.int32)
  ce, dice_loss, _ = losses.per_sample_losses(jnp.asarray(logits), jnp.asarray(masks))
  x = logits.astype(np.float64)
  logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
  want_ce = -np.take_along_axis(logp, masks[..., None], -1)[..., 0].mean((1, 2))
  probs = np.exp(logp)
  per_class = [1 - (2 * (probs[..., c] * (masks == c)).sum((1, 2)) + 1)
               / (probs[..., c].sum((1, 2)) + (masks == c).sum((1, 2)) + 1) for c in (1, 2)]
  np.testing.assert_allclose(ce, want_ce, rtol=1e-5)
  np.testing.assert_allclose(dice_loss, np.mean(per_class, axis=0), rtol=1e-5)
  mixed = masks.copy()
  mixed[1][mixed[1] != data.CAVITY] = data.BACKGROUND_OR_MYOCARDIUM
  ce2, dice2, _ = losses.per_sample_losses(jnp.asarray(logits), jnp.asarray(mixed))
  np.testing.assert_allclose(np.delete(ce2, 1), np.delete(ce, 1), rtol=1e-6)
  np.testing.assert_allclose(np.delete(dice2, 1), np.delete(dice_loss, 1), rtol=1e-6)
  np.testing.assert_allclose(dice2[1], per_class[0][1], rtol=1e-5)   # cavity term only


def test_loss_gradient_matches_finite_differences():
  """The gradient the train step uses, against central differences of the NumPy loss."""
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 2, (2, 6, 7, 2))
  masks = (rng.random((2, 6, 7)) < 0.4).astype(np.int32)

  def np_total(x):
    ce, dice_loss, _ = _np_losses(x, masks)
    return float(np.sum(ce + dice_loss))

  def jax_total(x):
    ce, dice_loss, _ = losses.per_sample_losses(x, jnp.asarray(masks))
    return jnp.sum(ce + dice_loss)

  got = np.asarray(jax.grad(jax_total)(jnp.asarray(logits, jnp.float32)))
  eps = 1e-6
  for index in zip(*(rng.integers(0, n, 25) for n in logits.shape)):
    step = np.zeros_like(logits)
    step[index] = eps
    expected = (np_total(logits + step) - np_total(logits - step)) / (2 * eps)
    np.testing.assert_allclose(got[index], expected, rtol=1e-3, atol=1e-6, err_msg=str(index))


def test_deep_supervision_loss_weights_each_level_by_hand():
  """Spatially uniform level logits upsample to themselves (any interpolation), so each level's
  loss is the NumPy loss of the broadcast logits; levels 1 and 2 weigh 1/2 and 1/4 against the
  output's 1, normalized (nnU-Net's weights)."""
  rng = np.random.default_rng(4)
  logits = rng.normal(0, 2, (2, 8, 8, 2)).astype(np.float32)
  masks = (rng.random((2, 8, 8)) < 0.4).astype(np.int32)
  uniform = {level: rng.normal(0, 2, (2, 1, 1, 2)).astype(np.float32) for level in (1, 2)}
  aux = {level: jnp.asarray(np.broadcast_to(u, (2, 8 >> level, 8 >> level, 2)))
         for level, u in uniform.items()}
  ce_weight, dice_weight = 0.7, 1.3

  def term(x):
    ce, dice_loss, _ = _np_losses(np.broadcast_to(x, logits.shape).astype(np.float64), masks)
    return ce_weight * ce + dice_weight * dice_loss

  loss, ce, hard = losses.training_loss(jnp.asarray(logits), jnp.asarray(masks), ce_weight,
                                        dice_weight, aux=aux)
  expected = (term(logits) + 0.5 * term(uniform[1]) + 0.25 * term(uniform[2])) / 1.75
  np.testing.assert_allclose(loss, expected, rtol=1e-5)   # float32 against float64
  want_ce, _, want_hard = _np_losses(logits.astype(np.float64), masks)
  np.testing.assert_allclose(ce, want_ce, rtol=1e-5)      # the output's own figures
  np.testing.assert_allclose(hard, want_hard, rtol=1e-6)
  alone, _, _ = losses.training_loss(jnp.asarray(logits), jnp.asarray(masks), ce_weight,
                                     dice_weight)
  np.testing.assert_allclose(alone, term(logits), rtol=1e-5)
