"""`--mode=summary`: the per-layer table against the model's own parameter tree."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from configs import smoke
from lvseg_jax import cli
from lvseg_jax import config_check
from lvseg_jax import models


@pytest.mark.parametrize('name', ['unet', 'ibu'])
def test_summary_lists_every_layer_and_the_totals(name, capsys):
  config = smoke.get_config()
  config.model.name, config.model.base_width, config.model.depth = name, 4, 2
  config.data.image_size = 32
  cli.run('summary', config, workdir=None)
  text = capsys.readouterr().out
  variables = models.init_variables(models.get_model(config.model), jax.random.key(0), 32)
  params = traverse_util.flatten_dict(variables['params'])
  for layer in {'/'.join(path[:-1]) for path in params}:
    assert f'| {layer} ' in text, layer
  stats = sum(int(np.size(v)) for v in jax.tree_util.tree_leaves(variables.get('batch_stats',
                                                                             {})))
  assert (f'Total parameters: {models.count_params(variables["params"]):,}   '
          f'running-statistics entries: {stats:,}') in text
  assert (stats > 0) == (name == 'ibu')


def test_summary_checks_the_config_first():
  config = smoke.get_config()
  config.data.image_size = 36   # not divisible by 2**3
  with pytest.raises(config_check.ConfigError, match='data.image_size=36'):
    cli.run('summary', config, workdir=None)
