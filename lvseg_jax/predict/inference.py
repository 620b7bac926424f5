"""The inference core: a jitted (optionally test-time augmented) forward pass over frames,
probabilities mapped back to each frame's grid, post-processing and the automatic contour."""

import dataclasses
import sys
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy import ndimage

from lvseg_jax import contours as contours_lib
from lvseg_jax import data as data_lib
from lvseg_jax import metrics

# The label of the LV cavity in the model's output (the training class maps' CAVITY).
LV_CLASS = data_lib.CAVITY

# Test-time augmentation: (number of 90-degree rotations, left-right flip) pairs.
TTA_TRANSFORMS = {
    'none': ((0, False),),
    'lr': ((0, False), (0, True)),                             # identity, left-right flip
    'flips': ((0, False), (0, True), (2, False), (2, True)),  # id, lr, lr+ud (= rot180), ud
    'd4': tuple((k, flip) for flip in (False, True) for k in range(4)),  # all 8 symmetries
}


@dataclasses.dataclass
class Prediction:
  """The model's output for one frame, on the frame's original grid.

  Contours are sub-pixel (`metrics.probability_contour` at 0.5), moved in by the training
  masks' outset (`config.data.mask_outset_px`). The epicardium fields are None for a
  cavity-only model.
  """
  frame: data_lib.Frame
  probability: np.ndarray          # (H, W) float32 LV cavity probability (TTA mean)
  mask: np.ndarray                 # (H, W) uint8 {0, 1} cavity, after post-processing
  contour: np.ndarray              # (P, 2) endocardial (x, y) contour; (0, 2) if mask is empty
  uncertainty: np.ndarray | None   # (H, W) float32 variance of the LV probability across TTA
  epi_mask: np.ndarray | None = None      # (H, W) uint8 cavity + myocardium, filled
  epi_contour: np.ndarray | None = None   # (P, 2) epicardial contour
  cut_by_window: bool = False   # the LV reaches an edge of the network window that lies inside
                                # the frame (crop mode): part of it may be outside the window

  @property
  def myocardium(self) -> np.ndarray | None:
    """(H, W) bool myocardium: inside the epicardium, outside the cavity."""
    return None if self.epi_mask is None else (self.epi_mask != 0) & (self.mask == 0)


def _transform(x: jax.Array, k: int, flip: bool) -> jax.Array:
  """Flip left-right (optional), then rotate by k x 90 degrees; NHWC, square images."""
  if flip:
    x = jnp.flip(x, axis=2)
  return jnp.rot90(x, k, axes=(1, 2))


def _untransform(x: jax.Array, k: int, flip: bool) -> jax.Array:
  x = jnp.rot90(x, -k, axes=(1, 2))
  if flip:
    x = jnp.flip(x, axis=2)
  return x


def tta_mode(predict_config: ml_collections.ConfigDict) -> str:
  """The TTA transforms a `config.predict` asks for: `tta_transforms`, or 'none' when `tta` is
  off."""
  return predict_config.tta_transforms if predict_config.tta else 'none'


def unseen_tta(augment: ml_collections.ConfigDict, tta_transforms: str) -> str:
  """Why `tta_transforms` makes inputs the model's training augmentation never made ('' when it
  does not): flipped copies need flip augmentation, d4's 90-degree turns rotations that large."""
  transforms = TTA_TRANSFORMS[tta_transforms]
  if len(transforms) > 1 and not (augment.enabled and (augment.flip_lr or augment.flip_ud)):
    return 'the model was trained without flip augmentation (augment.flip_lr/flip_ud)'
  rotation = augment.rotation_deg if augment.enabled and augment.affine else 0.0
  if any(k % 2 for k, _ in transforms) and rotation < 90:
    return (f'{tta_transforms} turns inputs by 90 degrees, but the model was trained with '
            f'rotations of at most {rotation:g} degrees (augment.rotation_deg)')
  return ''


def make_forward_fn(model, tta_transforms: str = 'none') -> Callable:
  """Jitted `(variables, images (B,S,S,C)) -> (probs (B,S,S,K), lv_variance (B,S,S))`.

  With TTA the transformed copies of the batch go through the network as one larger batch;
  softmax outputs are mapped back and averaged, and the variance of the LV probability across
  the copies is the uncertainty (0 without TTA). `variables` may also be a list of variable
  sets of this model (an ensemble): every member's copies are averaged alike.
  """
  if tta_transforms not in TTA_TRANSFORMS:
    raise ValueError(f'Unknown predict.tta_transforms {tta_transforms!r}; choices: '
                     f'{sorted(TTA_TRANSFORMS)}')
  transforms = TTA_TRANSFORMS[tta_transforms]

  @jax.jit
  def forward(variables, images):
    if len(transforms) > 1 and images.shape[1] != images.shape[2]:
      raise ValueError(f'TTA rotations need square inputs, got {images.shape[1:3]}')
    members = variables if isinstance(variables, (list, tuple)) else [variables]
    batch = images.shape[0]
    stacked = jnp.concatenate([_transform(images, k, f) for k, f in transforms], axis=0)
    copies = []
    for member in members:
      probs = jax.nn.softmax(model.apply(member, stacked, train=False), axis=-1)
      copies += [_untransform(probs[i * batch:(i + 1) * batch], k, f)
                 for i, (k, f) in enumerate(transforms)]
    probs = jnp.stack(copies)
    return probs.mean(axis=0), probs[..., LV_CLASS].var(axis=0)

  return forward


def postprocess_mask(mask: np.ndarray, largest_component: bool = True,
                     fill_holes: bool = True) -> np.ndarray:
  """Keeps the largest 4-connected component and/or fills holes; returns uint8 {0, 1}.

  Largest component first: a stray blob elsewhere in the image (e.g. the right ventricle) must
  not count towards the LV volume. Holes come from papillary muscles and trabeculae, which the
  SCD endocardial contours include in the cavity.
  """
  mask = np.asarray(mask) != 0
  if largest_component:
    mask = metrics.largest_component(mask)
  if fill_holes:
    mask = ndimage.binary_fill_holes(mask)
  return mask.astype(np.uint8)


def _foreground_box(labels: np.ndarray, margin: int = 3) -> tuple[slice, slice]:
  """The rows and columns of the non-background pixels plus `margin`, within the frame (the
  whole frame when there are none)."""
  rows, cols = np.flatnonzero(labels.any(axis=1)), np.flatnonzero(labels.any(axis=0))
  if rows.size == 0:
    return slice(0, labels.shape[0]), slice(0, labels.shape[1])
  return (slice(max(rows[0] - margin, 0), rows[-1] + margin + 1),
          slice(max(cols[0] - margin, 0), cols[-1] + margin + 1))


def _prediction(frame: data_lib.Frame, probs: np.ndarray, uncertainty: np.ndarray | None,
                config: ml_collections.ConfigDict) -> Prediction:
  """Masks and sub-pixel contours of one frame from its (H, W, K) class probabilities.

  The work is done on the box around the predicted foreground (`_foreground_box`), a few
  percent of an SCD frame: with a margin of background around it, component labelling, hole
  filling and the contours' neighbourhood are the same as on the whole frame.
  """
  post = dict(largest_component=bool(config.predict.largest_component),
              fill_holes=bool(config.predict.fill_holes))
  inset = float(config.data.mask_outset_px)
  full_labels = np.argmax(probs, axis=-1)
  box = _foreground_box(full_labels)
  offset = np.array([box[1].start, box[0].start], np.float64)   # (x, y) of the box's corner

  def on_frame(mask: np.ndarray, contour: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    whole = np.zeros(full_labels.shape, np.uint8)
    whole[box] = mask
    return whole, contour + offset

  probs_box, labels = probs[box], full_labels[box]
  mask = postprocess_mask(labels == LV_CLASS, **post)
  cavity = probs_box[..., LV_CLASS]
  # Contours follow the argmax boundary at sub-pixel precision: the 0.5 level of
  # (1 + p_region - p_best_other) / 2, which is the region's probability with two classes.
  others = np.delete(probs_box, LV_CLASS, axis=-1).max(axis=-1)
  contour = contours_lib.offset_inward(
      metrics.probability_contour((1.0 + cavity - others) / 2.0, mask), inset)
  epi_mask = epi_contour = None
  if probs.shape[-1] > data_lib.MYOCARDIUM:
    epi_mask = postprocess_mask(np.isin(labels, (LV_CLASS, data_lib.MYOCARDIUM)), **post) | mask
    inside = np.maximum(cavity, probs_box[..., data_lib.MYOCARDIUM])
    epi_contour = contours_lib.offset_inward(
        metrics.probability_contour((1.0 + inside - probs_box[..., 0]) / 2.0, epi_mask), inset)
    epi_mask, epi_contour = on_frame(epi_mask, epi_contour)
  mask, contour = on_frame(mask, contour)
  return Prediction(frame=frame, probability=probs[..., LV_CLASS], mask=mask, contour=contour,
                    uncertainty=uncertainty, epi_mask=epi_mask, epi_contour=epi_contour)


def _cut_by_window(foreground: np.ndarray, geometry: data_lib.Geometry) -> bool:
  """Whether (S, S) `foreground` touches a window edge beyond which the frame goes on."""
  edges = []
  for axis, (n, o) in enumerate(zip(geometry.scaled_shape, geometry.offset)):
    first, last = np.take(foreground, 0, axis=axis), np.take(foreground, -1, axis=axis)
    edges += [first.any() and o > 0, last.any() and o + geometry.size < n]
  return bool(any(edges))


class _Progress:
  """tqdm when installed, else a log line every 10% (long series take minutes on CPU)."""

  def __init__(self, total: int, desc: str, enabled: bool):
    self.total, self.done, self.desc, self._last = total, 0, desc, -1
    self._bar = None
    if enabled:
      try:
        import tqdm  # pylint: disable=g-import-not-at-top
        self._bar = tqdm.tqdm(total=total, desc=desc, unit='frame', file=sys.stderr,
                              leave=False)
      except ImportError:
        pass
    self.enabled = enabled

  def update(self, n: int) -> None:
    self.done += n
    if self._bar is not None:
      self._bar.update(n)
    elif self.enabled and self.total:
      decile = 10 * self.done // self.total
      if decile != self._last:
        self._last = decile
        logging.info('%s: %d/%d frames', self.desc, self.done, self.total)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def predict_frames(model, variables: dict[str, Any] | list[dict[str, Any]],
                   frames: Sequence[data_lib.Frame], config: ml_collections.ConfigDict, *,
                   forward_fn: Callable | None = None, desc: str = 'predict',
                   centres: Sequence[tuple[float, float]] | None = None
                   ) -> list[Prediction]:
  """Segments frames with a model; the core of prediction, independent of checkpoints and I/O.

  Args:
    model: the Flax module (`models.get_model(config.model)`).
    variables: {'params'[, 'batch_stats']}, or a list of them (an ensemble, averaged).
    frames: frames at their original resolution (any size; each is preprocessed on its own).
    config: uses `config.data` (preprocessing, as in training) and `config.predict`
      (batch_size, tta, tta_transforms, largest_component, fill_holes, progress).
    forward_fn: a `make_forward_fn` result, to reuse one compiled function across series.
    desc: progress bar label.
    centres: resize_mode 'roi': each frame's LV centre (row, col), e.g. from
      `roi.Localizer.centres`.

  Returns:
    One `Prediction` per frame, in order.
  """
  batch_size = int(config.predict.batch_size)   # checked by config_check
  transforms = tta_mode(config.predict)
  if forward_fn is None:
    forward_fn = make_forward_fn(model, transforms)
  if config.data.resize_mode == data_lib.ROI_MODE and (centres is None or
                                                       len(centres) != len(frames)):
    raise ValueError(f"resize_mode='{data_lib.ROI_MODE}': predict_frames needs one LV centre "
                     'per frame (lvseg_jax.predict.roi.Localizer)')
  variables = jax.device_put(variables)
  progress = _Progress(len(frames), desc, bool(config.predict.progress) and len(frames) > 0)

  def dispatch(start: int) -> tuple:
    chunk = frames[start:start + batch_size]
    prepared = [data_lib.preprocess_image(f.image, config.data,
                                          centres[start + i] if centres else None,
                                          f.pixel_spacing) for i, f in enumerate(chunk)]
    images = np.stack([image for image, _ in prepared])
    # Pad to a full batch so every call has one shape and compiles once.
    pad = batch_size - len(chunk)
    if pad:
      images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
    return chunk, prepared, forward_fn(variables, images)   # returns before the result is ready

  results: list[Prediction] = []
  starts = list(range(0, len(frames), batch_size))
  try:
    pending = dispatch(starts[0]) if starts else None
    for following in starts[1:] + [None]:
      chunk, prepared, outputs = pending
      # The next batch runs on the device (or XLA's CPU threads) while this one is
      # post-processed on the host.
      pending = dispatch(following) if following is not None else None
      probs, variance = jax.device_get(outputs)
      for i, (frame, (_, geometry)) in enumerate(zip(chunk, prepared)):
        probs_o = geometry.invert(np.asarray(probs[i], np.float32), labels=False)
        probs_o = probs_o.reshape(frame.shape + (-1,))
        # Outside the network window (crop mode) the inverse fills 0 for every class: background.
        probs_o[..., 0] = np.where(probs_o.sum(-1) == 0, 1.0, probs_o[..., 0])
        uncertainty = None
        if transforms != 'none':
          uncertainty = np.clip(geometry.invert(np.asarray(variance[i], np.float32),
                                                labels=False), 0.0, None)
        p = _prediction(frame, probs_o, uncertainty, config)
        p.cut_by_window = _cut_by_window(np.argmax(probs[i], axis=-1) != 0, geometry)
        results.append(p)
      progress.update(len(chunk))
  finally:
    progress.close()
  return results
