"""Figures for people: training curves and image / expert / predicted contour overlays."""

import json
import os
from typing import Sequence

import matplotlib

matplotlib.use('Agg')  # headless: files only
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

EXPERT_COLOR = 'lime'
PREDICTED_COLOR = 'red'


def training_curves(metrics_jsonl: str, out_png: str) -> None:
  """Loss, training Dice and validation Dice against step, from `metrics.jsonl`."""
  train, evals = [], []
  with open(metrics_jsonl) as f:
    for line in f:
      record = json.loads(line)
      (evals if record.get('split') == 'eval' else train).append(record)
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
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
  plt.close(fig)


def draw_overlay(ax, image: np.ndarray, pred_mask: np.ndarray | None = None,
                 expert_mask: np.ndarray | None = None, title: str = '') -> None:
  """Image in grey with the expert (green) and predicted (red) mask outlines."""
  ax.imshow(image, cmap='gray', interpolation='nearest')
  if expert_mask is not None and np.any(expert_mask):
    ax.contour(expert_mask > 0, levels=[0.5], colors=EXPERT_COLOR, linewidths=1.0)
  if pred_mask is not None and np.any(pred_mask):
    ax.contour(pred_mask > 0, levels=[0.5], colors=PREDICTED_COLOR, linewidths=1.0)
  ax.set_title(title, fontsize=8)
  ax.axis('off')


def overlay_grid(frames: Sequence, predictions: Sequence[np.ndarray], out_png: str,
                 max_items: int = 12, columns: int = 4) -> None:
  """A grid of frames with expert (green) and predicted (red) contours.

  Frames are spread evenly over the set so several cases appear.
  """
  n = min(max_items, len(frames))
  if n == 0:
    return
  picks = np.linspace(0, len(frames) - 1, n).round().astype(int)
  rows = int(np.ceil(n / columns))
  fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows + 0.4), squeeze=False)
  for ax in axes.ravel():
    ax.axis('off')
  for ax, i in zip(axes.ravel(), picks):
    frame = frames[i]
    draw_overlay(ax, frame.image, predictions[i], frame.mask, f'{frame.case} {frame.frame_id}')
  fig.suptitle('expert (green) vs predicted (red)', fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  fig.savefig(out_png, dpi=100)
  plt.close(fig)
