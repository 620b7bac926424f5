"""`predict`: checkpoint -> find the inputs -> load frames -> forward pass -> post-process ->
measure -> write, each stage once per series."""

import os
import time
from typing import Any, Callable, Iterator, Sequence

from absl import logging
import ml_collections

from lvseg_jax import checkpointing
from lvseg_jax import config_check
from lvseg_jax import data as data_lib
from lvseg_jax import models
from lvseg_jax.predict import inference
from lvseg_jax.predict import inputs
from lvseg_jax.predict import measure
from lvseg_jax.predict import outputs
from lvseg_jax.predict import roi


def inference_config(run_config: ml_collections.ConfigDict,
                     trained_config: ml_collections.ConfigDict,
                     overridden: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config a prediction runs with: the trained model and preprocessing, everything else
  from the command line (`checkpointing.config_for_run`), and the model in `predict.dtype` when
  that is set (e.g. bfloat16 activations on a GPU; '' keeps the trained `model.dtype`).
  """
  config = checkpointing.config_for_run(run_config, trained_config, overridden)
  config_check.check(config)
  dtype = config.predict.dtype
  if dtype:
    if dtype not in models.DTYPES:
      raise config_check.ConfigError(f'predict.dtype={dtype!r}: choose from '
                                     f"{sorted(models.DTYPES)} or '' (as trained).")
    config.model.dtype = dtype   # activations only: the parameters are the same either way
  unseen = inference.unseen_tta(trained_config.augment, inference.tta_mode(config.predict))
  if unseen:
    # Measured: a CPU U-Net trained without flips drops from Dice 0.93 to 0.59 on SC-HF-I-05
    # with d4 TTA (mirrored or rotated hearts are unseen inputs); see docs/RESULTS.md.
    logging.warning('predict.tta_transforms=%s, but %s: those copies are unseen inputs, which '
                    'usually segment worse and drag the TTA average down.',
                    config.predict.tta_transforms, unseen)
  return config


def predict(config: ml_collections.ConfigDict, workdir: str, input_path: str,
            output: str, overridden: Sequence[str] = ()) -> list[dict[str, Any]]:
  """Predicts on every series under `input_path` and writes the outputs to `output`.

  Args:
    config: this run's config; `config.predict` drives prediction. The model and the
      preprocessing come from the config saved in `workdir`.
    workdir: a training workdir (its `config.predict.checkpoint` = best | latest checkpoint).
    input_path: DICOM series folder, tree of series, or PNG folder.
    output: output folder.
    overridden: the dotted fields set on the command line.

  Returns:
    The per-series summaries (also in `output/summary.json`).
  """
  if not input_path or not output:
    raise inputs.PredictError('predict needs an input and an output folder (--input, --output)')
  trained_config, variables = checkpointing.load_for_inference(workdir, config.predict.checkpoint)
  config = inference_config(config, trained_config, overridden)
  report = data_lib.LoadReport(config.predict.on_error)
  series = inputs.find_series(input_path, config, report)
  logging.info('Predicting on %d series from %s', len(series), input_path)
  localizer = roi.Localizer.for_config(config)
  return run_series(models.get_model(config.model), variables, series, config, output,
                    meta=dict(workdir=os.path.abspath(workdir),
                              checkpoint=config.predict.checkpoint,
                              input=os.path.abspath(input_path),
                              localizer=localizer and os.path.abspath(localizer.workdir)),
                    skipped=report.skipped, localizer=localizer)


def segment_series(model, variables: dict[str, Any], series: Sequence[inputs.Series],
                   config: ml_collections.ConfigDict, forward_fn: Callable | None = None,
                   localizer: roi.Localizer | None = None
                   ) -> Iterator[tuple[inputs.Series, list[inference.Prediction], dict[str, Any],
                                       float]]:
  """(series, its predictions, `measure.summarize_series`, start time) for each series, with
  one compiled forward pass for all of them (`forward_fn`, or one made here); a 'roi' model's
  windows are centred where `localizer` finds the LV."""
  forward = forward_fn or inference.make_forward_fn(model, inference.tta_mode(config.predict))
  for s in series:
    start = time.time()
    predictions = inference.predict_frames(
        model, variables, s.frames, config, forward_fn=forward, desc=s.name,
        centres=localizer.centres(s.frames) if localizer else None)
    yield s, predictions, measure.summarize_series(s, predictions, config), start


def run_series(model, variables: dict[str, Any], series: Sequence[inputs.Series],
               config: ml_collections.ConfigDict, output: str,
               meta: dict[str, Any] | None = None,
               skipped: Sequence[tuple[str, str]] = (), collect: list | None = None,
               forward_fn: Callable | None = None,
               localizer: roi.Localizer | None = None) -> list[dict[str, Any]]:
  """Predicts, measures and writes every series, then the top-level summary files (which
  list the `skipped` input files); appends (series, predictions, summary) to `collect`."""
  os.makedirs(output, exist_ok=True)
  summaries = []
  for s, predictions, summary, start in segment_series(model, variables, series, config,
                                                       forward_fn, localizer):
    outputs.write_series_outputs(s, predictions, summary, output, config)
    summary['seconds'] = round(time.time() - start, 2)
    if collect is not None:
      collect.append((s, predictions, summary))
    volumes = summary.get('volumes')
    if volumes:
      mass = summary.get('lv_mass_g')
      logging.info('%s: %d frames in %.1f s; EDV %s mL, ESV %s mL, EF %s %%%s; %d slice/phase '
                   'cell(s) left out (summary.json "excluded")', s.name, len(s.frames),
                   summary['seconds'], outputs.one_decimal(volumes['edv_ml'], 'n/a'),
                   outputs.one_decimal(volumes['esv_ml'], 'n/a'),
                   outputs.one_decimal(volumes['ef_pct'], 'n/a'),
                   f", LV mass {outputs.one_decimal(mass, 'n/a')} g" if mass is not None else '',
                   len(summary.get('excluded') or []))
    else:
      logging.info('%s: %d frames in %.1f s; no volumes: %s', s.name, len(s.frames),
                   summary['seconds'], summary['volumes_missing'])
    summaries.append(summary)
  outputs.write_index(output, summaries, dict(meta or {}, predict=config.predict.to_dict()),
                      skipped)
  for path, problem in skipped:
    logging.warning('Skipped %s: %s (listed in %s)', path, problem,
                    os.path.join(output, 'summary.json'))
  return summaries
