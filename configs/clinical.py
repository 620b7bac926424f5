"""The three-class IBU-Net for clinical measurements: background, LV cavity, LV myocardium.

Trained with partial labels: frames without an epicardial contour only teach cavity vs the rest.
The paper's configs (unet.py, lnu.py, ibu.py) stay cavity-only, as the paper segments.
"""

from configs import ibu


def get_config():
  config = ibu.get_config()
  config.model.num_classes = 3
  config.data.myocardium = True
  return config
