"""What `main.py` runs for each mode, and how outcomes become exit codes.

Exit codes: 0 finished; 2 a user error (bad config, data, input or checkpoint), printed as one
message; 130 / 143 stopped by SIGINT / SIGTERM after saving a checkpoint (rerun to resume);
1 anything else (a bug: the traceback is printed).
"""

import sys
from typing import Sequence

from absl import logging
import ml_collections

from lvseg_jax import checkpointing
from lvseg_jax import config_check
from lvseg_jax import contours
from lvseg_jax import data
from lvseg_jax import evaluate
from lvseg_jax import predict
from lvseg_jax import train

MODES = ('train', 'evaluate', 'predict', 'summary')
EXIT_USER_ERROR = 2
# Errors that describe the user's input, not a bug: one message, no traceback.
USER_ERRORS = (config_check.ConfigError, data.DataError, predict.PredictError,
               contours.ContourError, checkpointing.CheckpointError, FileNotFoundError)


def run(mode: str, config: ml_collections.ConfigDict, workdir: str | None,
        input_path: str | None = None, output: str | None = None,
        overridden: Sequence[str] = ()) -> None:
  """Trains, evaluates, predicts or prints the model summary (each checks the config first).

  Raises:
    ConfigError: a config field out of range, or a missing --workdir / --input / --output.
  """
  if mode not in MODES:
    raise config_check.ConfigError(f'--mode={mode!r}: choose one of {MODES}.')
  if mode == 'summary':
    from lvseg_jax import summary  # pylint: disable=g-import-not-at-top
    print(summary.model_summary(config))
    return
  if not workdir:
    raise config_check.ConfigError(f'--workdir is required for --mode={mode}.')
  if mode == 'predict' and not (input_path and output):
    raise config_check.ConfigError('--mode=predict needs --input and --output.')
  if config.train.distributed:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize()
  logging.info('mode=%s workdir=%s', mode, workdir)
  if mode == 'train':
    train.train_and_evaluate(config, workdir)
  elif mode == 'evaluate':
    evaluate.evaluate_checkpoint(config, workdir, overridden)
  else:
    predict.predict(config, workdir, input_path, output, overridden)


def exit_code(error: BaseException, show_traceback: bool) -> int:
  """Prints a user error as one line (or re-raises it with `show_traceback`) and returns the
  process exit code for `error`; anything that is not a user error is re-raised."""
  if isinstance(error, train.Stopped):
    logging.warning('%s', error)
    return 128 + error.signum
  if isinstance(error, USER_ERRORS) and not show_traceback:
    print(f'error: {error}', file=sys.stderr)
    return EXIT_USER_ERROR
  raise error
