"""The command line (`main.py`, and the `lvseg` command of an installed package): its flags,
what each mode runs, and how outcomes become exit codes.

  lvseg predict --input=<DICOM series | tree | PNG folder> --output=<dir>   # shipped model
  lvseg train --config=<config file> --workdir=<dir>      # = python main.py --mode=train ...

Exit codes: 0 finished; 2 a user error (bad config, data, input or checkpoint), printed as one
message; 130 / 143 stopped by SIGINT / SIGTERM after saving a checkpoint (rerun to resume);
1 anything else (a bug: the traceback is printed).
"""

import os
import sys
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from lvseg_jax import checkpointing
from lvseg_jax import config_check
from lvseg_jax import contours
from lvseg_jax import data
from lvseg_jax import predict
from lvseg_jax import pretrained

MODES = ('train', 'evaluate', 'predict', 'summary')
EXIT_USER_ERROR = 2
# Errors that describe the user's input, not a bug: one message, no traceback.
USER_ERRORS = (config_check.ConfigError, data.DataError, predict.PredictError,
               contours.ContourError, checkpointing.CheckpointError, FileNotFoundError)


def run(mode: str, config: ml_collections.ConfigDict, workdir: str | None,
        input_path: str | None = None, output: str | None = None,
        overridden: Sequence[str] = (), model: str = pretrained.DEFAULT) -> None:
  """Trains, evaluates, predicts or prints the model summary (each checks the config first).

  Predict without a `workdir` uses the shipped model `model` (`lvseg_jax.pretrained`).

  Raises:
    ConfigError: a config field out of range, or a missing --workdir / --input / --output.
  """
  if mode not in MODES:
    raise config_check.ConfigError(f'--mode={mode!r}: choose one of {MODES}.')
  if mode == 'summary':
    from lvseg_jax import summary  # pylint: disable=g-import-not-at-top
    print(summary.model_summary(config))
    return
  if not workdir and mode == 'predict':
    try:
      workdir = pretrained.path(model)
    except ValueError as e:
      raise config_check.ConfigError(f'--model={model}: {e}') from None
    logging.info('No --workdir: predicting with the shipped model %r (%s)', model, workdir)
  if not workdir:
    raise config_check.ConfigError(f'--workdir is required for --mode={mode}.')
  if mode == 'predict' and not (input_path and output):
    raise config_check.ConfigError('--mode=predict needs --input and --output.')
  if config.train.distributed:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize()
  logging.info('mode=%s workdir=%s', mode, workdir)
  if mode in ('evaluate', 'predict') and config.compilation_cache_dir:
    use_compilation_cache(config.compilation_cache_dir)
  # train and evaluate (optax, matplotlib, the TensorBoard writer) load only when their mode
  # runs: predict starts about 0.4 s sooner without them (docs/BENCHMARKS.md).
  # pylint: disable=g-import-not-at-top
  if mode == 'train':
    from lvseg_jax import train
    train.train_and_evaluate(config, workdir)
  elif mode == 'evaluate':
    from lvseg_jax import evaluate
    evaluate.evaluate_checkpoint(config, workdir, overridden)
  else:
    predict.predict(config, workdir, input_path, output, overridden)


def use_compilation_cache(folder: str) -> None:
  """Turns on JAX's persistent compilation cache in `folder`, for every compiled function
  (the default thresholds skip the sub-second CPU compilations that dominate a short predict).
  Process-wide, so only the command line calls it."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_compilation_cache_dir', os.path.expanduser(folder))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def exit_code(error: BaseException, show_traceback: bool) -> int:
  """Prints a user error as one line (or re-raises it with `show_traceback`) and returns the
  process exit code for `error`; anything that is not a user error is re-raised."""
  if isinstance(error, USER_ERRORS) and not show_traceback:
    print(f'error: {error}', file=sys.stderr)
    return EXIT_USER_ERROR
  # Only a loaded train module raises Stopped; a predict bug need not load it to be re-raised.
  train = sys.modules.get('lvseg_jax.train')
  if train is not None and isinstance(error, train.Stopped):
    logging.warning('%s', error)
    return 128 + error.signum
  raise error


def define_flags() -> None:
  """Defines the command line's flags (once per process; `main.py` and `console` call it)."""
  from configs import default  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file(
      'config', default.__file__, 'Configuration file (default: configs/default.py; predict '
      'and evaluate take the model and preprocessing from the trained run).', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results (predict: '
                      'a trained run; without it, the shipped model --model).')
  flags.DEFINE_enum('mode', 'train', list(MODES), 'What to do.')
  flags.DEFINE_string('model', pretrained.DEFAULT, 'predict without --workdir: the shipped '
                      f'model ({", ".join(pretrained.names()) or "none shipped"}).')
  flags.DEFINE_string('input', None, 'predict: a DICOM series folder, a tree of series, '
                      'or a folder of PNG images.')
  flags.DEFINE_string('output', None, 'predict: output folder.')


def main(argv: Sequence[str]) -> None:
  """Runs the mode the flags ask for; user errors exit with 2 (`exit_code`)."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  checkpointing.quiet_orbax_logging()
  config = flags.FLAGS['config']
  overridden = sorted(config_flags.get_override_values(config))
  try:
    run(flags.FLAGS.mode, flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.input,
        flags.FLAGS.output, overridden, flags.FLAGS.model)
  except Exception as e:  # pylint: disable=broad-except  # exit_code re-raises bugs
    sys.exit(exit_code(e, show_traceback=flags.FLAGS.verbosity > 0))


def console() -> None:
  """The `lvseg` command: `lvseg <mode> [flags]`, the flags of `main.py`."""
  argv = list(sys.argv)
  argv[0] = os.path.basename(argv[0])
  if len(argv) > 1 and argv[1] in MODES:
    argv[1:2] = [f'--mode={argv[1]}']
  define_flags()
  for name in ('config', 'workdir', 'mode', 'model', 'input', 'output'):   # for --helpshort
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
  app.run(main, argv=argv)
