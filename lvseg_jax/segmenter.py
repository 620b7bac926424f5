"""Segmentation from Python without a config object.

  seg = lvseg_jax.Segmenter.pretrained()            # or Segmenter.from_workdir('runs/ibu')
  result = seg.segment(image, pixel_spacing=(1.37, 1.37))   # one 2D frame
  result.labels, result.endocardium, result.cavity_area_mm2
  for series in seg.segment_series('path/to/cine'):  # DICOM series, tree or PNG folder
    print(series.summary['volumes'], series.summary['lv_mass_g'])
"""

import dataclasses
from typing import Any, Mapping

import numpy as np

from lvseg_jax import checkpointing
from lvseg_jax import data as data_lib
from lvseg_jax import models
from lvseg_jax import pretrained
from lvseg_jax.predict import inference
from lvseg_jax.predict import inputs
from lvseg_jax.predict import measure
from lvseg_jax.predict import outputs
from lvseg_jax.predict import pipeline
from lvseg_jax.predict import roi


@dataclasses.dataclass
class Segmentation:
  """One frame's result, on the frame's grid. Contours are (P, 2) sub-pixel (x, y) = (column,
  row); the epicardium fields are None for a cavity-only model."""
  labels: np.ndarray                    # (H, W) uint8: 0 background, 1 LV cavity, 2 myocardium
  endocardium: np.ndarray               # (P, 2); (0, 2) where no cavity was found
  epicardium: np.ndarray | None
  cavity_area_mm2: float                # inside the endocardial contour (predict.areas)
  myocardium_area_mm2: float | None     # epicardial minus endocardial area
  prediction: inference.Prediction      # probabilities and masks, for everything else


@dataclasses.dataclass
class SeriesResult:
  series: inputs.Series                 # the frames as loaded (DICOM geometry, expert contours)
  predictions: list[inference.Prediction]
  summary: dict[str, Any]               # what predict writes to summary.json: volumes, EF, mass,
                                        # excluded slices, per-frame rows


class Segmenter:
  """A trained model with its preprocessing and post-processing, ready to segment."""

  def __init__(self, workdir: str, checkpoint: str = 'best',
               overrides: Mapping[str, Any] | None = None):
    """Loads the model of a training workdir or a shipped model's folder.

    Args:
      workdir: the folder (`from_workdir`, `pretrained`).
      checkpoint: 'best' | 'latest' (training workdirs).
      overrides: config fields by dotted name, e.g. {'predict.areas': 'pixels'}; the model
        and preprocessing always come from the workdir.
    """
    from configs import default  # pylint: disable=g-import-not-at-top

    config = default.get_config()
    for key, value in (overrides or {}).items():
      section, _, field = key.rpartition('.')
      if section not in config or field not in config[section]:
        raise ValueError(f'overrides: no config field {key!r}.')
      config[section][field] = value
    config.predict.progress = False
    trained, self.variables = checkpointing.load_for_inference(workdir, checkpoint)
    self.config = pipeline.inference_config(config, trained, sorted(overrides or {}))
    self.model = models.get_model(self.config.model)
    self._forward = inference.make_forward_fn(self.model, inference.tta_mode(self.config.predict))
    self._localizer = roi.Localizer.for_config(self.config)   # None unless resize_mode='roi'

  @classmethod
  def pretrained(cls, name: str = pretrained.DEFAULT, **kwargs) -> 'Segmenter':
    """A model shipped with the package (`lvseg_jax.pretrained.names()`)."""
    return cls(pretrained.path(name), **kwargs)

  @classmethod
  def from_workdir(cls, workdir: str, **kwargs) -> 'Segmenter':
    """The model of a training run (`python main.py --workdir=...`)."""
    return cls(workdir, **kwargs)

  @property
  def num_classes(self) -> int:
    return int(self.config.model.num_classes)

  def segment(self, image: np.ndarray, pixel_spacing: tuple[float, float] = (1.0, 1.0)
              ) -> Segmentation:
    """Segments one 2D short-axis frame of any size.

    Args:
      image: (H, W) raw intensities (any scale: normalized as in training).
      pixel_spacing: (row, column) mm, for the areas.
    """
    image = np.asarray(image, np.float32)
    if image.ndim != 2 or min(image.shape) < 2:
      raise ValueError(f'segment: expected one 2D image (H, W), got shape {image.shape}.')
    frame = data_lib.Frame(case='', frame_id='image', instance=0, image=image, mask=None,
                           contour=None, pixel_spacing=tuple(map(float, pixel_spacing)),
                           spacing_source='given')
    (p,) = inference.predict_frames(
        self.model, self.variables, [frame], self.config, forward_fn=self._forward,
        centres=self._localizer.centres([frame]) if self._localizer else None)
    areas = measure.frame_areas([p], self.config.predict.areas)
    return Segmentation(
        labels=outputs.label_map(p), endocardium=p.contour, epicardium=p.epi_contour,
        cavity_area_mm2=areas['cavity'][0], myocardium_area_mm2=areas['myocardium'][0],
        prediction=p)

  def segment_series(self, path: str, output: str | None = None) -> list[SeriesResult]:
    """Segments and measures every series under `path` (a DICOM series, a tree of series or
    a PNG folder, as `--mode=predict --input`); with `output`, also writes predict's files."""
    report = data_lib.LoadReport(self.config.predict.on_error)
    series = inputs.find_series(path, self.config, report)
    if output:
      results: list = []
      pipeline.run_series(self.model, self.variables, series, self.config, output,
                          skipped=report.skipped, collect=results, forward_fn=self._forward,
                          localizer=self._localizer)
    else:
      results = [r[:3] for r in pipeline.segment_series(self.model, self.variables, series,
                                                        self.config, self._forward,
                                                        self._localizer)]
    return [SeriesResult(*r) for r in results]
