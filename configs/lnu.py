"""LNU-Net: layer normalization after every convolution of every block."""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = 'lnu'
  return config
