"""A per-layer table of a configured model: parameters, state and total counts."""

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from lvseg_jax import config_check
from lvseg_jax import models


def model_summary(config: ml_collections.ConfigDict) -> str:
  """Returns a Markdown-style table of the model's layers and its parameter count."""
  config_check.check(config)
  model = models.get_model(config.model)
  size = config.data.image_size
  variables = models.init_variables(model, jax.random.key(0), size)
  params = traverse_util.flatten_dict(variables['params'])
  stats = traverse_util.flatten_dict(variables.get('batch_stats', {}))
  layers: dict[tuple[str, ...], list[str]] = {}
  counts: dict[tuple[str, ...], int] = {}
  for path, value in params.items():
    layers.setdefault(path[:-1], []).append(f'{path[-1]}{tuple(value.shape)}')
    counts[path[:-1]] = counts.get(path[:-1], 0) + int(np.prod(value.shape))
  stateful = {path[:-1] for path in stats}
  cfg = config.model
  lines = [
      f'Model {cfg.name!r}: base width {cfg.base_width}, depth {cfg.depth}, '
      f'{cfg.num_classes} classes, input {size}x{size}x1, dtype {cfg.dtype}'
      + (f', IBN mode {cfg.ibn_mode!r} (ratio {cfg.ibn_ratio})' if cfg.name == 'ibu' else '')
      + (f', norm {cfg.norm!r}' if cfg.name == 'unet' else ''),
      '',
      f'| {"layer":<32} | {"parameters":<44} | {"count":>9} | running stats |',
      f'|{"-" * 34}|{"-" * 46}|{"-" * 11}|---------------|',
  ]
  for path in sorted(layers, key=lambda p: list(params).index(next(
      k for k in params if k[:-1] == p))):
    has_stats = 'yes' if path in stateful else ''
    lines.append(f'| {"/".join(path):<32} | {", ".join(layers[path]):<44} | '
                 f'{counts[path]:>9,} | {has_stats:<13} |')
  total = models.count_params(variables['params'])
  n_stats = models.count_params(variables.get('batch_stats', {}))
  lines += ['', f'Total parameters: {total:,}   running-statistics entries: {n_stats:,}']
  return '\n'.join(lines)
