"""The first stage of a `resize_mode='roi'` model: another trained model segments each frame,
and the centre of the LV it finds is where the ROI model's window goes."""

import os
from typing import Sequence

import ml_collections
import numpy as np

from lvseg_jax import checkpointing
from lvseg_jax import data as data_lib
from lvseg_jax import models
from lvseg_jax import pretrained
from lvseg_jax.predict import inference

Centre = tuple[float, float]   # (row, col) in original pixels


def resolve(spec: str) -> str:
  """The folder of `data.roi_localizer`: a shipped model's name or a training workdir."""
  if not spec:
    raise ValueError(f"resize_mode='{data_lib.ROI_MODE}' needs data.roi_localizer: the model "
                     f'that finds the LV (a shipped model, one of {pretrained.names()}, or a '
                     'training workdir).')
  if spec in pretrained.names():
    return pretrained.path(spec)
  if os.path.isdir(spec):
    return spec
  raise ValueError(f'data.roi_localizer={spec!r}: neither a shipped model '
                   f'({pretrained.names()}) nor a folder.')


def fill_missing(found: Sequence[Centre | None],
                 frames: Sequence[data_lib.Frame]) -> list[Centre]:
  """Centres for the frames where the localizer found nothing (slices beyond the apex or base):
  the median of the same slice's other phases, else of every frame, else the frame's centre."""
  by_slice: dict[tuple, list[Centre]] = {}
  for frame, centre in zip(frames, found):
    if centre is not None and frame.slice_index is not None:
      by_slice.setdefault((frame.case, frame.slice_index), []).append(centre)
  every = [c for c in found if c is not None]
  out = []
  for frame, centre in zip(frames, found):
    if centre is None:
      near = by_slice.get((frame.case, frame.slice_index)) or every
      centre = (tuple(float(v) for v in np.median(near, axis=0)) if near else
                data_lib.frame_centre(frame.shape))
    out.append(centre)
  return out


class Localizer:
  """Finds the LV centre of frames with a trained model of another resize_mode: the centre of
  the bounding box of its epicardial mask (cavity + myocardium), else of its cavity."""

  def __init__(self, workdir: str, run_config: ml_collections.ConfigDict,
               checkpoint: str = 'best'):
    """Loads the model of `workdir` (a shipped model's folder or a training workdir); its
    preprocessing comes from there, prediction settings from `run_config`."""
    trained, self.variables = checkpointing.load_for_inference(workdir, checkpoint)
    if trained.data.resize_mode == data_lib.ROI_MODE:
      raise ValueError(f'{workdir}: a localizer cannot itself be a '
                       f"resize_mode='{data_lib.ROI_MODE}' model.")
    self.workdir = workdir
    self.config = checkpointing.config_for_run(run_config, trained)
    self.config.predict.tta = False        # a centre needs no test-time augmentation
    self.config.predict.progress = False
    self.model = models.get_model(self.config.model)
    self._forward = inference.make_forward_fn(self.model)

  @classmethod
  def for_config(cls, config: ml_collections.ConfigDict) -> 'Localizer | None':
    """The localizer `config.data.roi_localizer` names; None unless resize_mode is 'roi'."""
    if config.data.resize_mode != data_lib.ROI_MODE:
      return None
    return cls(resolve(config.data.roi_localizer), config, config.predict.checkpoint)

  def centres(self, frames: Sequence[data_lib.Frame]) -> list[Centre]:
    """One (row, col) per frame (`fill_missing` where nothing is found)."""
    predictions = inference.predict_frames(self.model, self.variables, frames, self.config,
                                           forward_fn=self._forward, desc='localize')
    return fill_missing([data_lib.mask_centre(p.epi_mask if p.epi_mask is not None else p.mask)
                         for p in predictions], frames)
