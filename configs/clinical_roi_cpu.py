"""The second stage of a two-stage model: the shipped recipe on a 120 mm square around the LV.

Training centres each window on the expert's LV (`data.roi_mm`, with the recipe's random
shifts and zooms); evaluation and prediction centre it on the LV that the shipped model
(`data.roi_localizer`) finds, so a prediction runs two networks. At the SCD's 1.37 mm pixels
the window is 88 pixels resampled to 128: 1.45x the resolution of `clinical_cpu.py`'s crop.
Under 5-fold cross-validation it gained nothing over the crop, at 1.5x the prediction time
(docs/RESULTS.md), so the shipped model stays one stage.
"""

from configs import clinical_cpu


def get_config():
  config = clinical_cpu.get_config()
  config.data.resize_mode = 'roi'
  config.data.roi_localizer = 'ibu3-cpu'
  return config
