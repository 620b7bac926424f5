"""The original U-Net (Ronneberger et al. 2015): no normalization layers."""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = 'unet'
  config.model.norm = 'none'
  return config
