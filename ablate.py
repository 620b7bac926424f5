"""lvseg-jax ablations: train and evaluate a grid of configs, then the comparison table.

  python ablate.py --config=configs/cpu.py --workdir=runs/ablate --grid=models
  python ablate.py --config=configs/cpu.py --workdir=runs/ablate_ibn --grid=ibn_modes \
      --seeds=0,1,2
  python ablate.py --config=configs/cpu.py --workdir=runs/ablate_aug --grid=augment
  python ablate.py --config=configs/cpu.py --workdir=runs/cv --grid=models --folds=0,1,2,3,4
  python ablate.py --config=configs/smoke.py --workdir=runs/x \
      --grid='{"model.name": ["unet", "ibu"], "augment.elastic": [true, false]}'

--grid is a preset (lvseg_jax.experiments.PRESETS: models, ibn_modes, augment, models_bn) or a
JSON object of dotted config key -> list of values. Base config fields are overridden as in
main.py (`--config.train.num_epochs=10`). Each cell trains in `<workdir>/<cell>/`; rerunning the
same command skips finished cells and resumes an interrupted one. Writes
`<workdir>/results.md`, `results.json` and `boxplot.png`.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags


FLAGS = flags.FLAGS

config_flags.DEFINE_config_file('config', None, 'Base configuration file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Folder of the grid: one subfolder per cell + the report.')
flags.DEFINE_string('grid', 'models', 'A preset name or a JSON object {"key": [values]}.')
flags.DEFINE_list('seeds', None, 'Seeds to repeat every cell with (adds "seed" to the grid).')
flags.DEFINE_list('folds', None, 'K-fold eval folds to run (adds "data.fold" to the grid and '
                  'sets data.split=kfold).')
flags.DEFINE_list('group_by', None, 'Override keys that make a table row; default: every grid '
                  'key except seed and fold.')
flags.DEFINE_bool('dry_run', False, 'Only list the cells: which would train, which are done.')
flags.DEFINE_bool('keep_going', False, 'Record a failing cell and go on with the next.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from lvseg_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from lvseg_jax import experiments  # pylint: disable=g-import-not-at-top
  checkpointing.quiet_orbax_logging()
  config = FLAGS.config
  try:
    grid = experiments.parse_grid(FLAGS.grid)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  for flag, key, cast in (('seeds', 'seed', int), ('folds', 'data.fold', int)):
    values = getattr(FLAGS, flag)
    if values:
      if key in grid:
        raise app.UsageError(f'--{flag} and a grid that sets {key!r}: give one of them.')
      grid[key] = [cast(v) for v in values]
  if FLAGS.folds:
    config.data.split = 'kfold'
  try:  # configuration mistakes are usage errors, found before anything trains
    experiments.check_grid(config, grid)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if config.train.distributed:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize()
  cells = experiments.run_grid(config, grid, FLAGS.workdir, dry_run=FLAGS.dry_run,
                               keep_going=FLAGS.keep_going)
  if FLAGS.dry_run:
    for cell in cells:
      print(f'{cell.status:9s} {cell.name}  ->  {cell.workdir}')
    return
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:  # one report per grid, not one per host
    paths = experiments.write_report(cells, FLAGS.workdir, config, FLAGS.group_by)
    with open(paths['markdown']) as f:
      print(f.read())
    logging.info('Wrote %s', ', '.join(paths.values()))
  signums = [c.signum for c in cells if c.signum is not None]
  if signums:  # as main.py exits when a signal stops training: the report above is partial
    sys.exit(128 + signums[0])


if __name__ == '__main__':
  app.run(main)
