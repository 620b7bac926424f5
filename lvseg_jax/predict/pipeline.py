"""`predict`: checkpoint -> find the inputs -> load frames -> forward pass -> post-process ->
measure -> write, each stage once per series."""

import os
import time
from typing import Any, Sequence

from absl import logging
import ml_collections

from lvseg_jax import checkpointing
from lvseg_jax import export
from lvseg_jax import models
from lvseg_jax.predict import inference
from lvseg_jax.predict import inputs
from lvseg_jax.predict import measure
from lvseg_jax.predict import outputs


def inference_config(run_config: ml_collections.ConfigDict,
                     trained_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The trained run's model and data (preprocessing must match training) + this run's predict.

  Also takes `data.nominal_spacing_mm` / `spacing_table` / `contour` from the command line, which
  describe the new input rather than the training data, and runs the model in `predict.dtype`
  when that is set (e.g. bfloat16 activations on a GPU; '' keeps the trained `model.dtype`).
  """
  config = ml_collections.ConfigDict(trained_config.to_dict())
  config.predict = ml_collections.ConfigDict(run_config.predict.to_dict())
  for key in ('nominal_spacing_mm', 'spacing_table', 'contour'):
    if key in run_config.data:
      config.data[key] = run_config.data[key]
  dtype = config.predict.dtype
  if dtype:
    if dtype not in models.DTYPES:
      raise ValueError(f'predict.dtype={dtype!r}: choose from {sorted(models.DTYPES)} '
                       "or '' (as trained).")
    config.model.dtype = dtype   # activations only: the parameters are the same either way
  augment = trained_config.get('augment', None) or {}
  if (config.predict.tta and config.predict.tta_transforms != 'none'
      and not (augment.get('flip_lr', False) or augment.get('flip_ud', False))):
    # Measured: a CPU U-Net trained without flips drops from Dice 0.93 to 0.59 on SC-HF-I-05
    # with d4 TTA (mirrored or rotated hearts are unseen inputs); see docs/RESULTS.md.
    logging.warning('predict.tta=%s, but the model was trained without flip augmentation '
                    '(augment.flip_lr/flip_ud are off): flipped or rotated inputs are unseen '
                    'and usually segment worse, which drags the TTA average down.',
                    config.predict.tta_transforms)
  run_model = run_config.get('model')
  if run_model is not None:
    differing = sorted(k for k in ('name', 'base_width', 'depth', 'norm')
                       if k in run_model and k in config.model
                       and run_model[k] != config.model[k])
    if differing:
      logging.warning('Ignoring --config model fields %s: the checkpoint was trained with %s',
                      differing, {k: config.model[k] for k in differing})
  return config


def predict(config: ml_collections.ConfigDict, workdir: str, input_path: str,
            output: str) -> list[dict[str, Any]]:
  """Predicts on every series under `input_path` and writes the outputs to `output`.

  Args:
    config: this run's config; `config.predict` drives prediction. The model and the
      preprocessing come from the config saved in `workdir`.
    workdir: a training workdir (its `config.predict.checkpoint` = best | latest checkpoint).
    input_path: DICOM series folder, tree of series, or PNG folder.
    output: output folder.

  Returns:
    The per-series summaries (also in `output/summary.json`).
  """
  if not input_path or not output:
    raise inputs.PredictError('predict needs an input and an output folder (--input, --output)')
  trained_config, variables = checkpointing.load_for_inference(workdir, config.predict.checkpoint)
  config = inference_config(config, trained_config)
  series = inputs.find_series(input_path, config)
  logging.info('Predicting on %d series from %s', len(series), input_path)
  return run_series(models.get_model(config.model), variables, series, config, output,
                    meta=dict(workdir=os.path.abspath(workdir),
                              checkpoint=config.predict.checkpoint,
                              input=os.path.abspath(input_path)))


def run_series(model, variables: dict[str, Any], series: Sequence[inputs.Series],
               config: ml_collections.ConfigDict, output: str,
               meta: dict[str, Any] | None = None) -> list[dict[str, Any]]:
  """Predicts, measures and writes every series, then the top-level summary files."""
  os.makedirs(output, exist_ok=True)
  tta_mode = config.predict.tta_transforms if config.predict.tta else 'none'
  forward = inference.make_forward_fn(model, tta_mode)   # one compilation for every series
  overlay_writer = export.OverlayWriter()
  summaries = []
  for s in series:
    start = time.time()
    predictions = inference.predict_frames(model, variables, s.frames, config,
                                           forward_fn=forward, desc=s.name)
    summary = measure.summarize_series(s, predictions, config)
    outputs.write_series_outputs(s, predictions, summary, output, config, overlay_writer)
    summary['seconds'] = round(time.time() - start, 2)
    volumes = summary.get('volumes') or {}
    logging.info('%s: %d frames in %.1f s; EDV %s mL, ESV %s mL, EF %s %%', s.name,
                 len(s.frames), summary['seconds'], outputs.fmt(volumes.get('edv_ml')),
                 outputs.fmt(volumes.get('esv_ml')), outputs.fmt(volumes.get('ef_pct')))
    summaries.append(summary)
  outputs.write_index(output, summaries, dict(meta or {}, predict=config.predict.to_dict()))
  return summaries
