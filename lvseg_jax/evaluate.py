"""Evaluation: the jitted forward pass, challenge metrics of a model on a dataset, and
`--mode=evaluate` on a workdir's checkpoint."""

import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from lvseg_jax import checkpointing
from lvseg_jax import config_check
from lvseg_jax import data as data_lib
from lvseg_jax import models
from lvseg_jax import plots
from lvseg_jax import results as results_lib
from lvseg_jax.predict import roi


def make_predict_fn(model) -> Callable:
  """Jitted forward pass with running averages: (variables, images) -> label maps."""

  @jax.jit
  def predict(variables, images):
    logits = model.apply(variables, images, train=False)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  return predict


def predict_dataset(predict_fn: Callable, variables: dict[str, Any],
                    dataset: 'data_lib.Dataset', batch_size: int) -> list[np.ndarray]:
  """Label maps for every frame of `dataset`, at each frame's original resolution."""
  outputs: list[np.ndarray | None] = [None] * len(dataset.frames)
  for batch in dataset.batches(batch_size, seed=0, epoch=0, shuffle=False,
                               drop_remainder=False, process_index=0, process_count=1):
    labels = np.asarray(predict_fn(variables, batch['image']))
    for row, index in enumerate(batch['index']):
      if batch['valid'][row]:
        outputs[int(index)] = dataset.to_original(int(index), labels[row])
  missing = [i for i, o in enumerate(outputs) if o is None]
  if missing:
    raise RuntimeError(f'{len(missing)} frames got no prediction (indices {missing[:5]}...).')
  return outputs  # type: ignore[return-value]


def evaluate_dataset(predict_fn: Callable, variables: dict[str, Any],
                     dataset: 'data_lib.Dataset', config: ml_collections.ConfigDict,
                     ) -> tuple[dict[str, Any], list[np.ndarray]]:
  """Challenge-protocol metrics of a model on a dataset, at the original resolution.

  The endocardium is the predicted cavity; with `data.myocardium` the epicardium (the outline
  of cavity and myocardium) is scored too, on the frames with an expert epicardial contour,
  under `results['epicardium']`.
  """
  predictions = predict_dataset(predict_fn, variables, dataset, config.eval.batch_size)
  endo, epi = [], []
  for frame, pred in zip(dataset.frames, predictions):
    common = dict(case=frame.case, frame_id=frame.frame_id, pixel_spacing=frame.pixel_spacing,
                  spacing_source=frame.spacing_source)
    endo.append(dict(common, pred_mask=pred == data_lib.CAVITY, expert_mask=frame.mask,
                     expert_contour=frame.contour))
    if config.data.myocardium and frame.epi_mask is not None:
      epi.append(dict(common, pred_mask=np.isin(pred, (data_lib.CAVITY, data_lib.MYOCARDIUM)),
                      expert_mask=frame.epi_mask, expert_contour=frame.epi_contour))
  results = results_lib.evaluate(endo, good_apd_mm=config.eval.good_apd_mm)
  if epi:
    results['epicardium'] = results_lib.evaluate(epi, good_apd_mm=config.eval.good_apd_mm)
  return results, predictions


def headline(results: dict[str, Any]) -> dict[str, float]:
  """The few numbers logged during training, from `results.evaluate` results.

  dice: per-image mean over all frames (what most papers report; picks the best checkpoint).
  apd_mm, good_pct, dice_good: challenge style, mean over cases (APD and Dice over good
  contours).
  """
  over_cases = results['per_set']['mean_std_over_cases']
  per_image = results['per_set']['per_image']
  head = {'dice': float(per_image['dice_all']['mean']),
          'dice_good': float(over_cases['dice_good']['mean']),
          'apd_mm': float(over_cases['apd_good_mm']['mean']),
          'good_pct': float(over_cases['good_pct']['mean'])}
  if 'epicardium' in results:   # the same numbers for the epicardium, prefixed
    head.update({f'epi_{k}': v for k, v in headline(results['epicardium']).items()})
  return head


def summary_line(results: dict[str, Any]) -> str:
  h = headline(results)
  line = (f"Dice {h['dice']:.4f} (per image, all frames); over cases: good contours "
          f"{h['good_pct']:.1f}%, APD {h['apd_mm']:.2f} mm and Dice {h['dice_good']:.4f} "
          f"over good contours")
  if 'epi_dice' in h:
    line += (f"; epicardium: Dice {h['epi_dice']:.4f}, good {h['epi_good_pct']:.1f}%, "
             f"APD {h['epi_apd_mm']:.2f} mm")
  return line


def eval_name(config: ml_collections.ConfigDict) -> str:
  """What `evaluate_checkpoint` evaluated, as a file name: checkpoint, sets, data source, and
  the spacing table and contour kind where they are not the defaults."""
  parts = [config.eval.checkpoint, '+'.join(_eval_sets(config)), config.data.source]
  if config.data.spacing_table:
    parts.append('spacing-' + os.path.splitext(os.path.basename(config.data.spacing_table))[0])
  if config.data.contour != 'i':
    parts.append(f'contour-{config.data.contour}')
  return 'eval_' + '_'.join(parts)


def _eval_sets(config: ml_collections.ConfigDict) -> list[str]:
  return [s.strip() for s in config.eval.split.split(',') if s.strip()]


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        overridden: Sequence[str] = ()) -> dict[str, Any]:
  """Evaluates the workdir's best (or latest) checkpoint on `config.eval.split`.

  The model and its preprocessing come from the workdir, the data and evaluation settings from
  `config` (`checkpointing.config_for_run`); only the scored cases are loaded.

  Args:
    config: the command line's config.
    workdir: a training workdir.
    overridden: the dotted fields set on the command line.
  """
  config = checkpointing.config_for_run(config, checkpointing.load_config(workdir), overridden)
  config_check.check(config)
  _, variables = checkpointing.load_for_inference(workdir, config.eval.checkpoint)
  wanted = []
  for name in _eval_sets(config):
    wanted += (data_lib.available_cases(config.data) if name == data_lib.ALL_CASES
               else data_lib.get_official_set(name))
  localizer = roi.Localizer.for_config(config)   # both stages, as predict runs them
  eval_ds = data_lib.load_dataset(config.data, cases=wanted, name=config.eval.split,
                                  centres=localizer.centres if localizer else None)
  predict_fn = make_predict_fn(models.get_model(config.model))
  results, predictions = evaluate_dataset(predict_fn, variables, eval_ds, config)
  name = eval_name(config)
  results['evaluated'] = {'checkpoint': config.eval.checkpoint, 'sets': _eval_sets(config),
                          **{k: config.data[k] for k in ('root', 'source', 'contour',
                                                         'spacing_table', 'on_error')},
                          'localizer': localizer and os.path.abspath(localizer.workdir)}
  results_lib.write_results(results, workdir, name)
  plots.overlay_grid(eval_ds.frames, predictions, os.path.join(workdir, f'{name}_overlays.png'),
                     max_items=config.train.num_overlays)
  logging.info('%s: %s. Results: %s/%s.md', name, summary_line(results), workdir, name)
  return results
