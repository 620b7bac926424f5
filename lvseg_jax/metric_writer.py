"""A run's metrics: `metrics.jsonl` (the record curves and reports are made from) and, to watch
a run live, TensorBoard event files in `<workdir>/tb/`.

TensorBoard files are written with tensorboardX: the event format without TensorFlow (it
needs only numpy and protobuf), so `tensorboard --logdir=runs` shows scalars and overlays.
"""

import json
import math
import os
from typing import Any, Sequence

from absl import logging
import numpy as np


class MetricWriter:
  """Appends records to `metrics.jsonl` and mirrors them to TensorBoard.

  Resuming at `start_step` first drops the records of later steps (a run killed after its last
  checkpoint logged steps the resumed run logs again), in both.
  """

  def __init__(self, workdir: str, tensorboard: bool, start_step: int = 0):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    _drop_records_after(self.path, start_step)
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      # purge_step hides the events of steps >= start_step that an earlier process wrote.
      self._tb = SummaryWriter(os.path.join(workdir, 'tb'),
                               purge_step=start_step or None, flush_secs=30)

  def write(self, step: int, split: str, values: dict[str, Any]) -> None:
    """One record {'step', 'split', **values}; finite numbers also as TensorBoard
    `split/key`."""
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, 'split': split, **values}) + '\n')
    if self._tb is not None:
      for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
          self._tb.add_scalar(f'{split}/{key}', value, step)

  def images(self, step: int, tag: str, images: Sequence[np.ndarray]) -> None:
    """(H, W, 3) uint8 images as TensorBoard `tag/i` (sizes may differ)."""
    if self._tb is not None:
      for i, image in enumerate(images):
        self._tb.add_image(f'{tag}/{i}', np.asarray(image), step, dataformats='HWC')

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _drop_records_after(path: str, step: int) -> None:
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = [line for line in lines if line.strip() and json.loads(line)['step'] <= step]
  if len(kept) != len(lines):
    logging.info('%s: dropping %d record(s) after step %d, the step resumed from.', path,
                 len(lines) - len(kept), step)
    with open(path, 'w') as f:
      f.writelines(kept)
