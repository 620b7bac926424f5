"""Figures for people: training curves and grids of image / expert / predicted contour overlays.

Figures are built as `matplotlib.figure.Figure` objects (no pyplot): no global backend or
figure state is touched.
"""

import json
import os
from typing import Any, Sequence

from matplotlib.figure import Figure
import numpy as np

from lvseg_jax import data as data_lib
from lvseg_jax import export
from lvseg_jax import metrics


def training_curves(metrics_jsonl: str, out_png: str) -> None:
  """Loss, training Dice and validation Dice against step, from `metrics.jsonl`."""
  train, evals = [], []
  with open(metrics_jsonl) as f:
    for line in f:
      record = json.loads(line)
      (evals if record.get('split') == 'eval' else train).append(record)
  fig = Figure(figsize=(13, 3.6))
  axes = fig.subplots(1, 3)
  if train:
    steps = [r['step'] for r in train]
    axes[0].plot(steps, [r['loss'] for r in train], label='loss (Dice + CE)')
    axes[0].plot(steps, [r['ce'] for r in train], label='cross-entropy', alpha=0.7)
    axes[0].set_yscale('log')
    axes[1].plot(steps, [r['dice'] for r in train], label='train Dice (augmented batches)')
    axes[2].plot(steps, [r['learning_rate'] for r in train])
  if evals:
    axes[1].plot([r['step'] for r in evals], [r['dice'] for r in evals], 'o-',
                 label='validation Dice (per image)')
  axes[0].set_title('loss')
  axes[1].set_title('Dice')
  axes[1].set_ylim(0, 1)
  axes[2].set_title('learning rate')
  for ax in axes:
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
  axes[0].legend()
  axes[1].legend(loc='lower right')
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)


def overlays(frames: Sequence, predictions: Sequence[np.ndarray], max_items: int = 12
             ) -> list[tuple[Any, np.ndarray]]:
  """(frame, (H, W, 3) uint8 image) for up to `max_items` frames spread evenly over the set (so
  several cases appear), with the expert (dashed) and predicted contours of the label maps:
  endocardium green / red, and with a myocardium class, epicardium cyan / orange. Drawn by
  `export.OverlayWriter`, the renderer of the per-frame overlays of `--mode=predict`."""
  n = min(max_items, len(frames))
  if n == 0:
    return []
  writer = export.OverlayWriter()
  out = []
  for i in np.linspace(0, len(frames) - 1, n).round().astype(int):
    frame, labels = frames[i], np.asarray(predictions[i])
    three_classes = bool(np.any(labels == data_lib.MYOCARDIUM)) or frame.epi_mask is not None
    out.append((frame, writer.render(
        frame.image, metrics.mask_to_contour(labels == data_lib.CAVITY),
        export.expert_outline(frame),
        pred_epi=(metrics.mask_to_contour(np.isin(labels, (data_lib.CAVITY, data_lib.MYOCARDIUM)))
                  if three_classes else None),
        expert_epi=export.expert_outline(frame, epicardium=True))))
  return out


def overlay_grid(frames: Sequence, predictions: Sequence[np.ndarray], out_png: str,
                 max_items: int = 12, columns: int = 4) -> None:
  """A grid of `overlays` in one PNG."""
  panels = overlays(frames, predictions, max_items)
  if not panels:
    return
  rows = int(np.ceil(len(panels) / columns))
  fig = Figure(figsize=(3 * columns, 3 * rows + 0.4))
  axes = fig.subplots(rows, columns, squeeze=False)
  for ax in axes.ravel():
    ax.axis('off')
  for ax, (frame, image) in zip(axes.ravel(), panels):
    ax.imshow(image)
    ax.set_title(f'{frame.case} {frame.frame_id}', fontsize=8)
  fig.suptitle('expert (dashed) vs predicted: endocardium green / red, epicardium cyan / orange',
               fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  fig.savefig(out_png, dpi=100)
