"""The shipped model's recipe: the three-class IBU-Net at CPU scale.

A 128x128 centre crop at native resolution: the LV sits near the image centre in the SCD (every
endocardial and epicardial mask of the 526 PNG frames lies inside the central 128x128 of its
256x256 frame, at least 9 px from its edge). Base width 16, 30 epochs. Random left-right and
up-down flips. Under cross-validation the flips, and then 30 epochs against 20, made the
epicardium and the EF agree better with the expert (docs/RESULTS.md); the flips also make flip
test-time augmentation (`predict.tta`) valid.
"""

from configs import clinical


def get_config():
  config = clinical.get_config()
  config.model.base_width = 16
  config.data.image_size = 128
  config.data.resize_mode = 'crop'
  config.train.num_epochs = 30
  config.augment.flip_lr = True
  config.augment.flip_ud = True
  return config
