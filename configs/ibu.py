"""IBU-Net: instance + batch normalization in the first block, batch norm elsewhere."""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = 'ibu'
  return config
