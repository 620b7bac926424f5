"""Checks every size, count and range field of a config up front, in one place.

`check(config)` runs before any data is loaded or model built, so a mistyped value stops the run
with a message naming the field instead of a crash deep in training.
"""

from typing import Any

import ml_collections


class ConfigError(ValueError):
  """A config field with a value the run cannot use; the message names the field."""


# Dotted fields, by the rule each follows.
_POSITIVE_INTS = (
    'model.base_width', 'model.depth', 'data.image_size', 'data.num_folds',
    'train.batch_size', 'train.log_every', 'train.eval_every_epochs',
    'train.checkpoint_every_steps', 'train.keep_checkpoints', 'eval.batch_size',
    'predict.batch_size',
)
_NON_NEGATIVE_INTS = ('train.num_epochs', 'train.warmup_steps', 'train.num_devices',
                      'train.num_overlays', 'predict.write_workers', 'train.tensorboard_images',
                      'data.fold', 'data.kfold_seed', 'seed', 'model.deep_supervision')
_POSITIVE_FLOATS = ('train.learning_rate', 'model.norm_epsilon', 'data.nominal_spacing_mm',
                    'eval.good_apd_mm', 'data.roi_mm')
_NON_NEGATIVE_FLOATS = ('train.weight_decay', 'train.grad_clip_norm', 'train.end_lr_factor',
                        'train.dice_weight', 'train.ce_weight', 'predict.slice_spacing_mm',
                        'data.mask_outset_px', 'predict.min_apical_cavity_mm2')
_FRACTIONS = ('model.bn_momentum', 'model.ibn_ratio', 'augment.elastic_prob',
              'predict.min_myocardial_coverage')
AREA_METHODS = ('contour', 'pixels')


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split('.'):
    node = node[part]
  return node


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def check(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first field whose value is out of range.

  Besides single fields: `train.num_steps` is -1 or positive, `data.fold` is below
  `data.num_folds`, `data.image_size` is divisible by 2**model.depth, `model.deep_supervision` is
  below `model.depth`, `predict.areas` is a known method, and `model.num_classes` matches
  `data.myocardium` (2 or 3).
  """
  def fail(key: str, rule: str) -> None:
    raise ConfigError(f'config.{key}={_get(config, key)!r}: {rule}.')

  for key in _POSITIVE_INTS:
    if not _is_int(_get(config, key)) or _get(config, key) < 1:
      fail(key, 'must be a positive integer')
  for key in _NON_NEGATIVE_INTS:
    if not _is_int(_get(config, key)) or _get(config, key) < 0:
      fail(key, 'must be an integer >= 0')
  for key in _POSITIVE_FLOATS:
    if not isinstance(_get(config, key), (int, float)) or not _get(config, key) > 0:
      fail(key, 'must be a positive number')
  for key in _NON_NEGATIVE_FLOATS:
    if not isinstance(_get(config, key), (int, float)) or not _get(config, key) >= 0:
      fail(key, 'must be a number >= 0')
  for key in _FRACTIONS:
    if not isinstance(_get(config, key), (int, float)) or not 0 <= _get(config, key) <= 1:
      fail(key, 'must be between 0 and 1')
  if not _is_int(config.train.num_steps) or not (config.train.num_steps == -1
                                                 or config.train.num_steps > 0):
    fail('train.num_steps', 'must be -1 (use train.num_epochs) or a positive integer')
  if config.train.num_steps == -1 and config.train.num_epochs < 1:
    fail('train.num_epochs', 'must be positive when train.num_steps is -1')
  if config.predict.areas not in AREA_METHODS:
    fail('predict.areas', f'must be one of {list(AREA_METHODS)}')
  if config.data.myocardium:
    if config.model.num_classes != 3:
      fail('model.num_classes', 'must be 3 (background, cavity, myocardium) with '
           'data.myocardium=True')
    if config.data.contour != 'i':
      fail('data.contour', "must be 'i' with data.myocardium=True (the cavity is inside the "
           'endocardium)')
  elif config.model.num_classes != 2:
    fail('model.num_classes', 'must be 2 (background, LV cavity), or 3 with data.myocardium=True')
  if config.data.num_folds < 2:
    fail('data.num_folds', 'must be >= 2')
  if config.data.fold >= config.data.num_folds:
    fail('data.fold', f'must be below data.num_folds={config.data.num_folds}')
  if config.model.deep_supervision >= config.model.depth:
    fail('model.deep_supervision', f'must be below model.depth={config.model.depth} (the '
         'decoder levels under the output)')
  if config.data.image_size % 2**config.model.depth:
    fail('data.image_size', f'must be divisible by 2**model.depth = {2**config.model.depth} '
         '(each level halves it)')
