"""CPU-feasible training: 128x128 images, base width 16. Pick the model with
`--config.model.name=unet|lnu|ibu` (for `unet`, `--config.model.norm=batch` gives BN U-Net)."""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = 'ibu'
  config.model.base_width = 16
  config.data.image_size = 128
  config.train.batch_size = 8
  config.train.num_epochs = 30
  config.train.eval_every_epochs = 5
  return config
