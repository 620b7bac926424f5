"""lvseg-jax command line: train, evaluate, predict or summarize a model.

  python main.py --config=configs/ibu.py --workdir=runs/ibu                  # train + evaluate
  python main.py --config=configs/ibu.py --workdir=runs/ibu --mode=evaluate
  python main.py --config=configs/ibu.py --workdir=runs/ibu --mode=predict \
      --input=path/to/dicom_series --output=out/
  python main.py --config=configs/ibu.py --mode=summary

Config fields are overridden with `--config.section.field=value`, e.g.
`--config.data.root=/data/scd --config.model.base_width=16`.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags


FLAGS = flags.FLAGS

config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
flags.DEFINE_enum('mode', 'train', ['train', 'evaluate', 'predict', 'summary'],
                  'What to do.')
flags.DEFINE_string('input', None, 'predict: a DICOM series folder, a tree of series, '
                    'or a folder of PNG images.')
flags.DEFINE_string('output', None, 'predict: output folder.')
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  from lvseg_jax import checkpointing  # pylint: disable=g-import-not-at-top
  checkpointing.quiet_orbax_logging()
  if FLAGS.mode == 'summary':
    from lvseg_jax import summary  # pylint: disable=g-import-not-at-top
    print(summary.model_summary(config))
    return
  if not FLAGS.workdir:
    raise app.UsageError(f'--workdir is required for --mode={FLAGS.mode}.')
  if config.train.distributed:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize()
  logging.info('mode=%s workdir=%s', FLAGS.mode, FLAGS.workdir)
  if FLAGS.mode == 'train':
    from lvseg_jax import train  # pylint: disable=g-import-not-at-top
    train.train_and_evaluate(config, FLAGS.workdir)
  elif FLAGS.mode == 'evaluate':
    from lvseg_jax import train  # pylint: disable=g-import-not-at-top
    train.evaluate_checkpoint(config, FLAGS.workdir)
  elif FLAGS.mode == 'predict':
    if not FLAGS.input or not FLAGS.output:
      raise app.UsageError('--mode=predict needs --input and --output.')
    from lvseg_jax import predict  # pylint: disable=g-import-not-at-top
    predict.predict(config, FLAGS.workdir, FLAGS.input, FLAGS.output)


if __name__ == '__main__':
  app.run(main)
