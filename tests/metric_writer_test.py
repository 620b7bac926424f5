"""metrics.jsonl and the TensorBoard event files, read back by an independent reader."""

import glob
import json
import struct

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from lvseg_jax import metric_writer


def read_events(logdir):
  """Every Event in the logdir's files, by the TFRecord framing (length, its CRC, payload,
  its CRC), written out here rather than taken from the writer's package."""
  events = []
  for path in sorted(glob.glob(f'{logdir}/events.out.tfevents.*')):
    with open(path, 'rb') as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      payload = data[offset + 12:offset + 12 + length]
      offset += 12 + length + 4
      event = event_pb2.Event()
      event.ParseFromString(payload)
      events.append(event)
  return events


def scalars(events):
  return {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value
          if v.HasField('simple_value')}


def test_records_go_to_jsonl_and_tensorboard(tmp_path):
  writer = metric_writer.MetricWriter(str(tmp_path), tensorboard=True)
  writer.write(10, 'train', {'loss': 0.75, 'dice': 0.5, 'note': 'text is jsonl only'})
  writer.write(20, 'eval', {'dice': 0.875})
  writer.images(20, 'eval/overlays', [np.full((6, 8, 3), 200, np.uint8)])
  writer.close()
  with open(tmp_path / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  assert records == [{'step': 10, 'split': 'train', 'loss': 0.75, 'dice': 0.5,
                      'note': 'text is jsonl only'}, {'step': 20, 'split': 'eval', 'dice': 0.875}]
  events = read_events(tmp_path / 'tb')
  assert scalars(events) == {('train/loss', 10): 0.75, ('train/dice', 10): 0.5,
                             ('eval/dice', 20): 0.875}
  (image,) = [v.image for e in events for v in e.summary.value if v.HasField('image')]
  assert (image.height, image.width, image.colorspace) == (6, 8, 3)


def test_without_tensorboard_only_jsonl(tmp_path):
  writer = metric_writer.MetricWriter(str(tmp_path), tensorboard=False)
  writer.write(1, 'train', {'loss': 1.0})
  writer.close()
  assert (tmp_path / 'metrics.jsonl').exists() and not (tmp_path / 'tb').exists()


def test_training_writes_what_metrics_jsonl_holds(smoke_run):
  _, workdir, _ = smoke_run
  with open(f'{workdir}/metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  events = read_events(f'{workdir}/tb')
  got = scalars(events)
  compared = 0
  for r in records:
    for key, value in r.items():
      if key in ('step', 'split') or not np.isfinite(value):
        continue   # non-finite values (no good contour yet: APD NaN) stay in metrics.jsonl
      # TensorBoard stores float32: equal to the float64 record to float32 rounding.
      assert got[(f"{r['split']}/{key}", r['step'])] == pytest.approx(value, rel=2 ** -23)
      compared += 1
  assert compared == len(got) and {'train/loss', 'train/dice', 'eval/dice'} <= {
      tag for tag, _ in got}
  evals = {r['step'] for r in records if r['split'] == 'eval'}
  images = {(v.tag, e.step) for e in events for v in e.summary.value if v.HasField('image')}
  assert {step for _, step in images} == evals == {4, 8}
  assert len(images) == 2 * 4   # train.tensorboard_images per evaluation
