"""lvseg-jax command line: train, evaluate, predict or summarize a model.

  python main.py --config=configs/ibu.py --workdir=runs/ibu                  # train + evaluate
  python main.py --config=configs/ibu.py --workdir=runs/ibu --mode=evaluate
  python main.py --config=configs/ibu.py --workdir=runs/ibu --mode=predict \
      --input=path/to/dicom_series --output=out/
  python main.py --config=configs/ibu.py --mode=summary

Config fields are overridden with `--config.section.field=value`, e.g.
`--config.data.root=/data/scd --config.model.base_width=16`. User errors print one line and
exit with 2 (`--verbosity=1` shows the traceback); a run stopped by SIGINT / SIGTERM exits
with 130 / 143 after saving (exit codes: lvseg_jax/cli.py).
"""

import sys

from absl import app
from absl import flags
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
  from lvseg_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from lvseg_jax import cli  # pylint: disable=g-import-not-at-top
  checkpointing.quiet_orbax_logging()
  overridden = sorted(config_flags.get_override_values(FLAGS['config']))
  try:
    cli.run(FLAGS.mode, FLAGS.config, FLAGS.workdir, FLAGS.input, FLAGS.output, overridden)
  except Exception as e:  # pylint: disable=broad-except  # cli.exit_code re-raises bugs
    sys.exit(cli.exit_code(e, show_traceback=FLAGS.verbosity > 0))


if __name__ == '__main__':
  app.run(main)
