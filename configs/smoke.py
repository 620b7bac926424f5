"""A tiny configuration for tests and quick CPU runs (seconds, not hours).

Pick the model on the command line: `--config=configs/smoke.py --config.model.name=lnu`.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = 'ibu'
  config.model.base_width = 8
  config.model.depth = 3
  config.data.image_size = 64
  config.train.batch_size = 4
  config.train.num_steps = 4
  config.train.warmup_steps = 1
  config.train.log_every = 1
  config.train.checkpoint_every_steps = 2
  config.train.num_overlays = 4
  config.eval.batch_size = 8
  return config
