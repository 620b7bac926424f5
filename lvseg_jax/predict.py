"""Inference on new scans: masks, contours, overlays, NIfTI volumes, LV volumes and EF.

  python main.py --mode=predict --config=configs/default.py --workdir=<trained run> \
      --input=<DICOM series | tree of series | PNG folder> --output=<dir>

Layers:
  * `predict_frames(model, variables, frames, config)`: the core, independent of checkpoints and
    files. Preprocesses with `data.preprocess_image` (the training path), runs a jitted forward
    pass in fixed-size batches (optionally test-time augmented: flips and 90-degree rotations,
    softmax averaged, per-pixel variance as the uncertainty; only for models trained with flip
    augmentation, see docs/RESULTS.md), maps probabilities back to each
    frame's original grid, thresholds and post-processes (largest connected component, hole
    filling) and extracts the automatic contour.
  * `find_series(input, config)`: the input folder -> `Series` (DICOM series via
    `data.load_dicom_series`, PNG folders via `data.load_png_folder` or plain PNG files).
  * `summarize_series` / `write_series_outputs`: areas per slice and phase, ED/ES, EDV/ESV/SV/EF
    (`clinical`), and every file (`export`).
  * `predict(config, workdir, input, output)`: loads the checkpoint and does all of the above.

Output folder (one subfolder per series, named `<case>_<series folder>`):
  masks/IM-0001-NNNN.png               predicted mask, 0/255
  overlays/IM-0001-NNNN.png            image + predicted contour (+ expert contour if known)
  uncertainty/IM-0001-NNNN.png         TTA variance, 0..255 = 0..0.25 (only with predict.tta)
  contours/IM-0001-NNNN-icontour-auto.txt   the challenge evaluator's format, one `x y` per line
  <series>_mask.nii.gz, <series>_image.nii.gz   [column, row, slice, phase] volumes (DICOM only
                                       geometry; see export.py for the affine)
  frames.csv                           one row per frame: slice, phase, area, expert area, Dice
  volumes.csv, volume_curve.png        total LV volume per phase (predicted, expert), ED / ES
  summary.json                         everything above plus EDV/ESV/SV/EF, ED/ES, warnings
and at the top level `summary.csv` / `summary.json` with one entry per series.

Volumes: area of a predicted mask = pixel count x row spacing x col spacing; volume = sum over
slices of area x spacing between slices; ED / ES = phases with the largest / smallest total
volume (`clinical.lv_volumes`). With expert contours the summary also holds the expert volumes
by the data README's per-slice definition (shoelace areas, per-slice max / min), by the phase
definition on the same polygons, and by the phase definition on the rasterized expert masks (the
same area definition as the predictions; 5-7% larger than shoelace areas on the SCD because
the rasterized masks include the boundary pixels).

Bad input and fallbacks (all logged, and listed under `warnings` in summary.json):
  * no DICOM or PNG files under the input, a missing input, a single file: `PredictError`.
  * a folder whose DICOMs belong to several SeriesInstanceUIDs: `PredictError` naming them (put
    each series in its own folder; a tree of folders is fine).
  * unreadable files, frames of another size within a series: `data.DataError`, or skipped and
    counted with `--config.predict.on_error=skip`.
  * missing PixelSpacing: the nominal `config.data.nominal_spacing_mm` (spacing_source
    'nominal'); PNG input has no spacing unless `config.data.spacing_table` names it.
  * spacing between slices: DICOM SpacingBetweenSlices, else the distance between slice
    positions, else SliceThickness, else `config.predict.slice_spacing_mm`; without any, volumes
    are not computed (areas still are).
  * any image size: frames are resized to the network size (`config.data.resize_mode`) and the
    prediction is mapped back to the original grid; a series whose frames have different sizes
    gets no NIfTI (warned).
  * frames without slice / phase information (plain PNG folders): masks, contours and areas per
    frame only; no volumes and a NIfTI that is a plain frame stack.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import math
import os
import re
import sys
import time
import warnings
from typing import Any, Callable, Iterable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy import ndimage

from lvseg_jax import clinical
from lvseg_jax import contours as contours_lib
from lvseg_jax import data as data_lib
from lvseg_jax import export
from lvseg_jax import metrics
from lvseg_jax import models

# config.predict defaults, so configs saved before a field existed keep working.
PREDICT_DEFAULTS = {
    'checkpoint': 'best', 'batch_size': 16, 'largest_component': True, 'fill_holes': True,
    'tta': False, 'tta_transforms': 'd4', 'save_masks': True, 'save_overlays': True,
    'save_contours': True, 'save_nifti': True, 'nifti_image': True, 'contour_dir': '',
    'patient_sheet': '', 'slice_spacing_mm': 0.0, 'on_error': 'raise', 'progress': True,
    'lv_class': 1, 'dtype': '',
}

# Test-time augmentation: (number of 90-degree rotations, left-right flip) pairs.
TTA_TRANSFORMS = {
    'none': ((0, False),),
    'lr': ((0, False), (0, True)),                             # identity, left-right flip
    'flips': ((0, False), (0, True), (2, False), (2, True)),  # id, lr, lr+ud (= rot180), ud
    'd4': tuple((k, flip) for flip in (False, True) for k in range(4)),  # all 8 symmetries
}

LV_CONTOUR_KIND = 'i'
_SERIES_UID_TAG = 0x0020000E


class PredictError(ValueError):
  """Input that cannot be predicted on; the message says what is wrong and where."""


def _pr(config: ml_collections.ConfigDict, key: str) -> Any:
  """config.predict[key], falling back to `PREDICT_DEFAULTS`."""
  section = config.get('predict', None) if hasattr(config, 'get') else None
  value = section.get(key, None) if section is not None else None
  return PREDICT_DEFAULTS[key] if value is None else value


# ---------------------------------------------------------------------------- inference core


@dataclasses.dataclass
class Prediction:
  """The model's output for one frame, on the frame's original grid."""
  frame: data_lib.Frame
  probability: np.ndarray          # (H, W) float32 LV probability (TTA mean)
  mask: np.ndarray                 # (H, W) uint8 {0, 1}, after post-processing
  contour: np.ndarray              # (P, 2) automatic (x, y) contour; (0, 2) if mask is empty
  uncertainty: np.ndarray | None   # (H, W) float32 variance of the LV probability across TTA


def _transform(x: jax.Array, k: int, flip: bool) -> jax.Array:
  """Flip left-right (optional), then rotate by k x 90 degrees; NHWC, square images."""
  if flip:
    x = jnp.flip(x, axis=2)
  return jnp.rot90(x, k, axes=(1, 2))


def _untransform(x: jax.Array, k: int, flip: bool) -> jax.Array:
  x = jnp.rot90(x, -k, axes=(1, 2))
  if flip:
    x = jnp.flip(x, axis=2)
  return x


def make_forward_fn(model, tta_transforms: str = 'none', lv_class: int = 1) -> Callable:
  """Jitted `(variables, images (B,S,S,C)) -> (probs (B,S,S,K), lv_variance (B,S,S))`.

  With TTA the transformed copies of the batch go through the network as one larger batch;
  softmax outputs are mapped back and averaged, and the variance of the LV probability across
  the copies is the uncertainty (0 without TTA).
  """
  if tta_transforms not in TTA_TRANSFORMS:
    raise ValueError(f'Unknown predict.tta_transforms {tta_transforms!r}; choices: '
                     f'{sorted(TTA_TRANSFORMS)}')
  transforms = TTA_TRANSFORMS[tta_transforms]

  @jax.jit
  def forward(variables, images):
    if len(transforms) > 1 and images.shape[1] != images.shape[2]:
      raise ValueError(f'TTA rotations need square inputs, got {images.shape[1:3]}')
    batch = images.shape[0]
    stacked = jnp.concatenate([_transform(images, k, f) for k, f in transforms], axis=0)
    probs = jax.nn.softmax(model.apply(variables, stacked, train=False), axis=-1)
    probs = jnp.stack([_untransform(probs[i * batch:(i + 1) * batch], k, f)
                       for i, (k, f) in enumerate(transforms)])
    return probs.mean(axis=0), probs[..., lv_class].var(axis=0)

  return forward


def postprocess_mask(mask: np.ndarray, largest_component: bool = True,
                     fill_holes: bool = True) -> np.ndarray:
  """Keeps the largest 4-connected component and/or fills holes; returns uint8 {0, 1}.

  Largest component first: a stray blob elsewhere in the image (e.g. the right ventricle) must
  not count towards the LV volume. Holes come from papillary muscles and trabeculae, which the
  SCD endocardial contours include in the cavity.
  """
  mask = np.asarray(mask) != 0
  if largest_component:
    mask = metrics.largest_component(mask)
  if fill_holes:
    mask = ndimage.binary_fill_holes(mask)
  return mask.astype(np.uint8)


class _Progress:
  """tqdm when installed, else a log line every 10% (long series take minutes on CPU)."""

  def __init__(self, total: int, desc: str, enabled: bool):
    self.total, self.done, self.desc, self._last = total, 0, desc, -1
    self._bar = None
    if enabled:
      try:
        import tqdm  # pylint: disable=g-import-not-at-top
        self._bar = tqdm.tqdm(total=total, desc=desc, unit='frame', file=sys.stderr,
                              leave=False)
      except ImportError:
        pass
    self.enabled = enabled

  def update(self, n: int) -> None:
    self.done += n
    if self._bar is not None:
      self._bar.update(n)
    elif self.enabled and self.total:
      decile = 10 * self.done // self.total
      if decile != self._last:
        self._last = decile
        logging.info('%s: %d/%d frames', self.desc, self.done, self.total)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def predict_frames(model, variables: dict[str, Any], frames: Sequence[data_lib.Frame],
                   config: ml_collections.ConfigDict, *, forward_fn: Callable | None = None,
                   desc: str = 'predict') -> list[Prediction]:
  """Segments frames with a model; the core of prediction, independent of checkpoints and I/O.

  Args:
    model: the Flax module (`models.get_model(config.model)`).
    variables: {'params'[, 'batch_stats']}.
    frames: frames at their original resolution (any size; each is preprocessed on its own).
    config: uses `config.data` (preprocessing, as in training) and `config.predict`
      (batch_size, tta, tta_transforms, largest_component, fill_holes, progress).
    forward_fn: a `make_forward_fn` result, to reuse one compiled function across series.
    desc: progress bar label.

  Returns:
    One `Prediction` per frame, in order.
  """
  batch_size = int(_pr(config, 'batch_size'))
  if batch_size < 1:
    raise ValueError(f'predict.batch_size must be >= 1, got {batch_size}')
  tta_mode = _pr(config, 'tta_transforms') if _pr(config, 'tta') else 'none'
  lv_class = int(_pr(config, 'lv_class'))
  if forward_fn is None:
    forward_fn = make_forward_fn(model, tta_mode, lv_class)
  variables = jax.device_put(variables)
  progress = _Progress(len(frames), desc, bool(_pr(config, 'progress')) and len(frames) > 0)
  results: list[Prediction] = []
  try:
    for start in range(0, len(frames), batch_size):
      chunk = frames[start:start + batch_size]
      prepared = [data_lib.preprocess_image(f.image, config.data) for f in chunk]
      images = np.stack([image for image, _ in prepared])
      # Pad to a full batch so every call has one shape and compiles once.
      pad = batch_size - len(chunk)
      if pad:
        images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
      probs, variance = jax.device_get(forward_fn(variables, images))
      for i, (frame, (_, geometry)) in enumerate(zip(chunk, prepared)):
        probs_o = geometry.invert(np.asarray(probs[i], np.float32), labels=False)
        probs_o = probs_o.reshape(frame.shape + (-1,))
        # Outside the network window (crop mode) the inverse fills 0 for every class: background.
        probs_o[..., 0] = np.where(probs_o.sum(-1) == 0, 1.0, probs_o[..., 0])
        raw = np.argmax(probs_o, axis=-1) == lv_class
        mask = postprocess_mask(raw, bool(_pr(config, 'largest_component')),
                                bool(_pr(config, 'fill_holes')))
        uncertainty = None
        if tta_mode != 'none':
          uncertainty = np.clip(geometry.invert(np.asarray(variance[i], np.float32),
                                                labels=False), 0.0, None)
        results.append(Prediction(frame=frame, probability=probs_o[..., lv_class],
                                  mask=mask, contour=metrics.mask_to_contour(mask),
                                  uncertainty=uncertainty))
      progress.update(len(chunk))
  finally:
    progress.close()
  return results


# ---------------------------------------------------------------------------- input discovery


@dataclasses.dataclass
class Series:
  """One cine series (or one PNG folder / case) to predict on."""
  name: str                        # output subfolder name
  kind: str                        # 'dicom' | 'png'
  folder: str
  frames: list[data_lib.Frame]
  case: str
  expert_dir: str | None = None
  warnings: list[str] = dataclasses.field(default_factory=list)


def _warn(series_warnings: list[str], message: str, *args) -> None:
  text = message % args if args else message
  logging.warning('%s', text)
  series_warnings.append(text)


def _has_dicom_magic(path: str) -> bool:
  try:
    with open(path, 'rb') as f:
      head = f.read(132)
  except OSError:
    return False
  return head[128:132] == b'DICM'


def _is_dicom_folder(folder: str, names: Sequence[str]) -> bool:
  """Holds `.dcm` files, or extension-less files that start like DICOM (scanner exports)."""
  if any(n.lower().endswith('.dcm') for n in names):
    return True
  bare = [n for n in names if '.' not in n and n.upper() != 'DICOMDIR']
  return any(_has_dicom_magic(os.path.join(folder, n)) for n in bare[:3])


def _is_png(name: str) -> bool:
  return name.lower().endswith('.png') and not name.startswith('.')


def _series_uids(paths: Sequence[str]) -> collections.Counter:
  """SeriesInstanceUID of each DICOM file (header only), to refuse mixed folders."""
  import pydicom  # pylint: disable=g-import-not-at-top
  uids: collections.Counter = collections.Counter()
  for path in paths:
    try:
      with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the SCD UIDs have leading zeros; pydicom warns
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=['SeriesInstanceUID'])
      # The raw bytes: converting the value would validate the UID, and the SCD UIDs (leading
      # zeros) make pydicom log a warning per file.
      item = ds.get_item(_SERIES_UID_TAG)
      value = getattr(item, 'value', b'') if item is not None else b''
      if isinstance(value, bytes):
        value = value.decode('ascii', errors='replace')
      uids[str(value or '').strip('\x00 ')] += 1
    except Exception:  # pylint: disable=broad-except
      continue  # unreadable files are reported by the loader itself
  uids.pop('', None)
  return uids


def check_single_series(folder: str) -> None:
  """Raises PredictError if the DICOM files of `folder` belong to more than one series."""
  paths = data_lib.list_dicom_files(folder)
  uids = _series_uids(paths)
  if len(uids) > 1:
    listing = ', '.join(f'{uid} ({n} files)' for uid, n in uids.most_common())
    raise PredictError(f'{folder}: DICOM files of {len(uids)} different series are mixed in '
                       f'one folder ({listing}); put each series in its own folder')


def _read_sheet(path: str) -> dict[str, str]:
  try:
    return data_lib.read_patient_sheet(path)
  except data_lib.DataError as e:
    logging.warning('%s', e)
    return {}


def _contour_source(config: ml_collections.ConfigDict) -> tuple[str, dict[str, str]]:
  """(contour_dir, SCD id -> case) from config.predict.contour_dir / patient_sheet."""
  contour_dir = str(_pr(config, 'contour_dir') or '')
  if not contour_dir:
    return '', {}
  contour_dir = os.path.abspath(os.path.expanduser(contour_dir))
  if not os.path.isdir(contour_dir):
    raise PredictError(f'{contour_dir}: predict.contour_dir does not exist')
  sheet_path = str(_pr(config, 'patient_sheet') or '')
  if not sheet_path:
    sheet_path = os.path.join(os.path.dirname(contour_dir), 'scd_patientdata.csv')
    if not os.path.isfile(sheet_path):
      return contour_dir, {}
  return contour_dir, _read_sheet(sheet_path)


def _expert_dir_for(case: str, contour_dir: str) -> str | None:
  """The expert folder of a case: `contour_dir` itself if it holds contour files, else the
  case's folder in a CAP `SCD_ManualContours` tree."""
  if not contour_dir:
    return None
  if any(contours_lib.parse_contour_filename(n) for n in os.listdir(contour_dir)):
    return contour_dir
  return data_lib.expert_contour_dir(contour_dir, case)


def attach_expert_contours(frames: Sequence[data_lib.Frame], expert_dir: str,
                           kind: str = LV_CONTOUR_KIND) -> int:
  """Sets `contour` / `mask` of the frames whose InstanceNumber has an expert contour file.

  Returns the number of frames that got one. Contour files without a frame are logged (expert
  folders often hold contours of frames not in the input).
  """
  files = contours_lib.find_contour_files(expert_dir, kind)
  by_instance = {f.instance: f for f in frames}
  attached = 0
  for instance, path in sorted(files.items()):
    frame = by_instance.get(instance)
    if frame is None:
      logging.info('%s: no frame with InstanceNumber %d in the input', path, instance)
      continue
    frame.contour = contours_lib.read_contour_file(path, image_shape=frame.shape)
    frame.mask = contours_lib.polygon_to_mask(frame.contour, frame.shape)
    attached += 1
  return attached


def _load_dicom(folder: str, config: ml_collections.ConfigDict,
                report: data_lib.LoadReport, contour_dir: str,
                sheet: dict[str, str]) -> Series | None:
  check_single_series(folder)
  nominal = float(config.data.get('nominal_spacing_mm', data_lib.NOMINAL_SPACING_MM))
  frames = data_lib.load_dicom_series(folder, nominal_spacing_mm=nominal, report=report)
  if not frames:
    return None
  scd_id = frames[0].case
  case = sheet.get(scd_id, scd_id)
  series_warnings: list[str] = []
  for frame in frames:
    frame.case = case
  expert_dir = _expert_dir_for(case, contour_dir) if contour_dir else None
  if contour_dir and expert_dir is None:
    _warn(series_warnings, '%s: no expert contour folder for case %s under %s', folder, case,
          contour_dir)
  if expert_dir:
    count = attach_expert_contours(frames, expert_dir, str(config.data.get('contour', 'i')))
    logging.info('%s: %d frames with expert contours from %s', folder, count, expert_dir)
  nominal_frames = sum(f.spacing_source == 'nominal' for f in frames)
  if nominal_frames:
    _warn(series_warnings, '%s: %d frame(s) without PixelSpacing; areas and volumes use the '
          'nominal %.4f mm (config.data.nominal_spacing_mm)', folder, nominal_frames, nominal)
  return Series(name='', kind='dicom', folder=folder, frames=frames, case=case,
                expert_dir=expert_dir, warnings=series_warnings)


def _natural_key(name: str) -> list:
  return [int(t) if t.isdigit() else t.lower() for t in re.split(r'(\d+)', name)]


def _load_plain_pngs(folder: str, names: Sequence[str], config: ml_collections.ConfigDict,
                     report: data_lib.LoadReport) -> list[data_lib.Frame]:
  """PNG files of any name; frames numbered in natural name order when names carry no NNNN."""
  nominal = float(config.data.get('nominal_spacing_mm', data_lib.NOMINAL_SPACING_MM))
  table = {}
  if config.data.get('spacing_table', ''):
    table = data_lib.read_spacing_table(config.data.spacing_table)
  frames = []
  for ordinal, name in enumerate(sorted(names, key=_natural_key), start=1):
    path = os.path.join(folder, name)
    parsed = data_lib.parse_png_name(name)
    case, frame_id, instance = parsed if parsed else (
        os.path.basename(os.path.normpath(folder)), f'IM-0001-{ordinal:04d}', ordinal)
    try:
      image = data_lib.read_png(path)
    except data_lib.DataError as e:
      report.problem(e.path, e.problem)
      continue
    spacing, source = (table[case], 'table') if case in table else ((nominal, nominal),
                                                                     'nominal')
    frames.append(data_lib.Frame(
        case=case, frame_id=frame_id, instance=instance, image=image.astype(np.float32),
        mask=None, contour=None, pixel_spacing=(float(spacing[0]), float(spacing[1])),
        spacing_source=source, source_path=path))
  return frames


def _png_series(folder: str, frames: list[data_lib.Frame]) -> list[Series]:
  """Groups PNG frames by case; frames without a slice order keep the file order."""
  by_case: dict[str, list[data_lib.Frame]] = collections.defaultdict(list)
  for frame in frames:
    by_case[frame.case].append(frame)
  out = []
  for case, case_frames in sorted(by_case.items()):
    series_warnings: list[str] = []
    if any(f.spacing_source == 'nominal' for f in case_frames):
      _warn(series_warnings, '%s (%s): PNG frames have no pixel spacing; areas use the nominal '
            '%.4f mm (set config.data.spacing_table)', folder, case,
            case_frames[0].pixel_spacing[0])
    out.append(Series(name='', kind='png', folder=folder, frames=case_frames, case=case,
                      warnings=series_warnings))
  return out


def find_series(input_path: str, config: ml_collections.ConfigDict) -> list[Series]:
  """Finds and loads every series under `input_path` (see the module docstring).

  A folder with DICOM files is one series (its subfolders are searched too); a folder with an
  `images/` subfolder of PNGs is a PNG data set (masks from `<contour>_labels/` become the
  expert); any other folder with PNG files is a PNG series per case.

  Raises:
    PredictError: missing input, a file instead of a folder, nothing to predict on, mixed series.
    data.DataError: unreadable files (unless predict.on_error='skip').
  """
  if not input_path or not os.path.exists(input_path):
    raise PredictError(f'{input_path!r}: input does not exist')
  if not os.path.isdir(input_path):
    raise PredictError(f'{input_path}: input must be a folder (a DICOM series, a tree of '
                       'series, or a folder of PNG images), not a file')
  report = data_lib.LoadReport(str(_pr(config, 'on_error')))
  contour_dir, sheet = _contour_source(config)
  contour_kind = str(config.data.get('contour', 'i'))
  series: list[Series] = []
  for dirpath, dirnames, filenames in os.walk(input_path):
    dirnames.sort()
    names = sorted(filenames)
    if 'images' in dirnames and any(_is_png(n) for n in
                                    os.listdir(os.path.join(dirpath, 'images'))):
      frames = data_lib.load_png_folder(
          dirpath, contour=contour_kind, contoured_only=False, report=report,
          nominal_spacing_mm=float(config.data.get('nominal_spacing_mm',
                                                   data_lib.NOMINAL_SPACING_MM)),
          spacing_table=(data_lib.read_spacing_table(config.data.spacing_table)
                         if config.data.get('spacing_table', '') else None))
      series += _png_series(dirpath, frames)
      # Its images/ and *_labels/ folders are part of this data set, not more series.
      dirnames[:] = [d for d in dirnames if d != 'images' and not d.endswith('_labels')]
    if _is_dicom_folder(dirpath, names):
      loaded = _load_dicom(dirpath, config, report, contour_dir, sheet)
      if loaded is not None:
        series.append(loaded)
    elif any(_is_png(n) for n in names) and not os.path.basename(dirpath).endswith('_labels'):
      frames = _load_plain_pngs(dirpath, [n for n in names if _is_png(n)], config, report)
      series += _png_series(dirpath, frames)
  report.log_summary(input_path)
  series = [s for s in series if s.frames]
  if not series:
    raise PredictError(f'{input_path}: no DICOM series (*.dcm or DICOM files without an '
                       'extension) and no PNG images found' +
                       (f' ({len(report.skipped)} unreadable file(s) skipped)'
                        if report.skipped else ''))
  # Unique, readable output names: <case>_<series folder>.
  used: collections.Counter = collections.Counter()
  for s in series:
    base = os.path.basename(os.path.normpath(s.folder))
    name = s.case if base in (s.case, '') else f'{s.case}_{base}'
    name = re.sub(r'[^A-Za-z0-9._-]+', '_', name)
    used[name] += 1
    s.name = name if used[name] == 1 else f'{name}_{used[name]}'
  return series


# ---------------------------------------------------------------------------- geometry, areas


def has_grid(frames: Sequence[data_lib.Frame]) -> bool:
  """Whether every frame has a slice and a phase index (needed for volumes and 4D NIfTI)."""
  return bool(frames) and all(f.slice_index is not None and f.phase_index is not None
                              for f in frames)


def grid_shape(frames: Sequence[data_lib.Frame]) -> tuple[int, int]:
  """(slices, phases) spanned by the frames' indices."""
  return (1 + max(f.slice_index for f in frames), 1 + max(f.phase_index for f in frames))


def area_grid_from(frames: Sequence[data_lib.Frame], areas: Sequence[float | None]) -> np.ndarray:
  """(S, T) areas from per-frame values (None -> NaN, e.g. frames without an expert contour)."""
  shape = grid_shape(frames)
  return clinical.area_grid(((f.slice_index, f.phase_index, a)
                             for f, a in zip(frames, areas) if a is not None), *shape)


def expert_areas(frames: Sequence[data_lib.Frame], source: str = 'polygon') -> list[float | None]:
  """Per-frame expert LV areas (mm²): 'polygon' = shoelace of the contour (the data README's
  definition), 'mask' = pixel count of the rasterized contour (the predictions' definition)."""
  if source not in ('polygon', 'mask'):
    raise ValueError(f"source must be 'polygon' or 'mask', got {source!r}")
  out: list[float | None] = []
  for f in frames:
    if source == 'polygon' and f.contour is not None:
      out.append(clinical.polygon_area_mm2(f.contour, f.pixel_spacing))
    elif source == 'mask' and f.mask is not None:
      out.append(clinical.mask_area_mm2(f.mask, f.pixel_spacing))
    else:
      out.append(None)
  return out


def expert_volumes(frames: Sequence[data_lib.Frame], spacing_mm: float) -> dict[str, Any]:
  """Expert EDV/ESV/SV/EF of a series by three definitions (see the module docstring).

  Returns:
    {'slice_extrema': README definition, 'phase': phase definition on the polygons,
     'phase_mask': phase definition on the rasterized masks}, each an `LVVolumes` dict;
    definitions that cannot be computed are None. Empty dict without expert contours.
  """
  if not any(f.contour is not None or f.mask is not None for f in frames):
    return {}
  out: dict[str, Any] = {}
  polygon = area_grid_from(frames, expert_areas(frames, 'polygon'))
  mask = area_grid_from(frames, expert_areas(frames, 'mask'))
  for name, grid, fn in (('slice_extrema', polygon, clinical.lv_volumes_per_slice_extrema),
                         ('phase', polygon, clinical.lv_volumes),
                         ('phase_mask', mask, clinical.lv_volumes)):
    try:
      out[name] = fn(grid, spacing_mm).to_dict()
    except ValueError as e:
      logging.info('expert volumes (%s) not computed: %s', name, e)
      out[name] = None
  return out


def slice_spacing(frames: Sequence[data_lib.Frame], fallback_mm: float = 0.0
                  ) -> tuple[float, str, list[str]]:
  """Spacing between slices for volume summation: (mm, source, warnings).

  Order of preference: DICOM SpacingBetweenSlices (what the data README uses), the distance
  between consecutive slice positions along the normal, SliceThickness (ignores gaps), then
  `fallback_mm`; (nan, 'none') without any.
  """
  notes: list[str] = []
  positions = _slice_positions(frames)
  step = None
  if positions is not None and len(positions) > 1:
    diffs = np.abs(np.diff(np.sort(positions)))
    step = float(np.median(diffs))
    if np.max(np.abs(diffs - step)) > 0.05 * step:
      notes.append(f'slice positions are not evenly spaced (gaps {np.round(diffs, 2).tolist()} '
                   'mm); volumes use one spacing')
  tagged = [f.spacing_between_slices for f in frames if f.spacing_between_slices]
  if tagged:
    value = float(np.median(tagged))
    if step is not None and abs(value - step) > 0.1 * step:
      notes.append(f'SpacingBetweenSlices {value:g} mm differs from the slice positions\' '
                   f'spacing {step:.3g} mm; using SpacingBetweenSlices')
    return value, 'dicom', notes
  if step is not None and step > 0:
    return step, 'positions', notes
  thickness = [f.slice_thickness for f in frames if f.slice_thickness]
  if thickness:
    notes.append('no SpacingBetweenSlices nor slice positions: using SliceThickness (gaps '
                 'between slices, if any, are ignored)')
    return float(np.median(thickness)), 'thickness', notes
  if fallback_mm and fallback_mm > 0:
    notes.append(f'no slice spacing in the input: using predict.slice_spacing_mm = '
                 f'{fallback_mm:g} mm')
    return float(fallback_mm), 'config', notes
  notes.append('no slice spacing (no SpacingBetweenSlices, positions or SliceThickness, and '
               'predict.slice_spacing_mm is 0): volumes not computed')
  return float('nan'), 'none', notes


def _slice_positions(frames: Sequence[data_lib.Frame]) -> np.ndarray | None:
  """(S,) position of each slice index along the slice normal (mm), None if unknown."""
  if not has_grid(frames):
    return None
  by_slice: dict[int, list[float]] = collections.defaultdict(list)
  for f in frames:
    if f.slice_position is not None:
      by_slice[f.slice_index].append(f.slice_position)
  num_slices = grid_shape(frames)[0]
  if len(by_slice) != num_slices:
    return None
  return np.array([np.median(by_slice[s]) for s in range(num_slices)])


def series_affine(frames: Sequence[data_lib.Frame], slice_spacing_mm: float
                  ) -> tuple[np.ndarray, list[int], str]:
  """(affine, slice order, kind) for a series' NIfTI volume.

  DICOM geometry gives `export.dicom_affine` with the slice step from the first and last
  slices' ImagePositionPatient; NIfTI slice k is `order[k]` of the series (slices are sorted
  along the normal when the acquisition order is not monotonic). Without geometry: spacing only.
  """
  num_slices = grid_shape(frames)[0] if has_grid(frames) else len(frames)
  order = list(range(num_slices))
  geometric = has_grid(frames) and all(
      f.image_position is not None and f.image_orientation is not None for f in frames)
  if not geometric:
    spacing = slice_spacing_mm if math.isfinite(slice_spacing_mm) else 1.0
    return export.nominal_affine(frames[0].pixel_spacing, spacing), order, 'nominal'
  first = {}
  for f in sorted(frames, key=lambda f: f.phase_index):
    first.setdefault(f.slice_index, f)
  positions = np.array([first[s].slice_position for s in order])
  steps = np.diff(positions)
  if len(steps) and not (np.all(steps > 0) or np.all(steps < 0)):
    order = [int(i) for i in np.argsort(positions)]
  ref, last = first[order[0]], first[order[-1]]
  if num_slices > 1:
    step = (np.asarray(last.image_position) - np.asarray(ref.image_position)) / (num_slices - 1)
  else:
    cosines = np.asarray(ref.image_orientation).reshape(2, 3)
    thickness = slice_spacing_mm if math.isfinite(slice_spacing_mm) else 1.0
    step = np.cross(cosines[0], cosines[1]) * thickness
  affine = export.dicom_affine(ref.image_position, ref.image_orientation, ref.pixel_spacing,
                               step)
  return affine, order, 'dicom'


# ---------------------------------------------------------------------------- summaries, files


def _finite_or_none(x: Any) -> Any:
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(float(x)) else None
  return x


def summarize_series(series: Series, predictions: Sequence[Prediction],
                     config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Areas per frame and (with slice/phase information) volumes, ED/ES, SV, EF."""
  frames = [p.frame for p in predictions]
  notes = list(series.warnings)
  pred_areas = [clinical.mask_area_mm2(p.mask, p.frame.pixel_spacing) for p in predictions]
  poly_areas = expert_areas(frames, 'polygon')
  mask_areas = expert_areas(frames, 'mask')
  rows = []
  for p, area, e_poly, e_mask in zip(predictions, pred_areas, poly_areas, mask_areas):
    f = p.frame
    rows.append(dict(
        frame_id=f.frame_id, instance=f.instance, slice_index=f.slice_index,
        phase_index=f.phase_index, slice_location=f.slice_location,
        trigger_time_ms=f.trigger_time, area_mm2=area, expert_area_mm2=e_poly,
        expert_mask_area_mm2=e_mask,
        dice=metrics.dice(p.mask, f.mask) if f.mask is not None else None,
        detected=bool(p.mask.any()), source_path=f.source_path))
  summary: dict[str, Any] = dict(
      series=series.name, case=series.case, kind=series.kind, folder=series.folder,
      expert_dir=series.expert_dir, num_frames=len(frames),
      image_shapes=sorted({f'{f.shape[0]}x{f.shape[1]}' for f in frames}),
      pixel_spacing_mm=sorted({tuple(f.pixel_spacing) for f in frames}),
      spacing_source=sorted({f.spacing_source for f in frames}),
      postprocessing=dict(largest_component=bool(_pr(config, 'largest_component')),
                          fill_holes=bool(_pr(config, 'fill_holes'))),
      tta=(_pr(config, 'tta_transforms') if _pr(config, 'tta') else 'none'),
      frames=rows)
  if not has_grid(frames):
    notes.append('frames have no slice/phase information: areas per frame only, no volumes')
    summary.update(num_slices=None, num_phases=None, volumes=None, expert=None)
    summary['warnings'] = notes
    return summary
  spacing, spacing_source, spacing_notes = slice_spacing(
      frames, float(_pr(config, 'slice_spacing_mm')))
  notes += spacing_notes
  grid = area_grid_from(frames, pred_areas)
  num_slices, num_phases = grid.shape
  missing = int(np.isnan(grid).sum())
  if missing:
    notes.append(f'{missing} of {grid.size} slice/phase cells have no frame (slices with '
                 'different phase counts?); phases missing a slice get no total volume')
  summary.update(num_slices=num_slices, num_phases=num_phases, slice_spacing_mm=spacing,
                 slice_spacing_source=spacing_source, areas_mm2=grid.tolist())
  phase_times = []
  for t in range(num_phases):
    times = [f.trigger_time for f in frames if f.phase_index == t and f.trigger_time is not None]
    phase_times.append(float(np.median(times)) if times else None)
  summary['phase_trigger_time_ms'] = phase_times
  volumes = None
  if math.isfinite(spacing):
    try:
      volumes = clinical.lv_volumes(grid, spacing).to_dict()
    except ValueError as e:
      notes.append(f'volumes not computed: {e}')
  summary['volumes'] = volumes
  expert = expert_volumes(frames, spacing) if math.isfinite(spacing) else {}
  if expert:
    expert['areas_mm2'] = area_grid_from(frames, poly_areas).tolist()
    phase = expert.get('phase') or expert.get('phase_mask')
    if volumes is not None and phase and phase.get('es_phase') is not None:
      # The prediction at the expert's ED/ES phases separates volume error from phase choice.
      ed, es = phase['ed_phase'], phase['es_phase']
      edv, esv = volumes['volumes_ml'][ed], volumes['volumes_ml'][es]
      if edv is not None and esv is not None:
        expert['predicted_at_expert_phases'] = dict(
            ed_phase=ed, es_phase=es, edv_ml=edv, esv_ml=esv, sv_ml=edv - esv,
            ef_pct=_finite_or_none(clinical.ejection_fraction(edv, esv)))
      # ... and on the expert's slices only, which also removes the effect of basal / apical
      # slices the expert left out (a prediction there adds volume the expert did not count).
      contoured = ~np.all(np.isnan(np.array(expert['areas_mm2'], dtype=np.float64)), axis=1)
      sub = clinical.volumes_per_phase_ml(grid[contoured], spacing)
      edv, esv = float(sub[ed]), float(sub[es])
      expert['predicted_on_expert_slices_and_phases'] = dict(
          ed_phase=ed, es_phase=es, num_slices=int(contoured.sum()), edv_ml=edv, esv_ml=esv,
          sv_ml=edv - esv, ef_pct=_finite_or_none(clinical.ejection_fraction(edv, esv)))
  summary['expert'] = expert or None
  summary['warnings'] = notes
  return summary


def _nifti_stack(frames: Sequence[data_lib.Frame], arrays: Sequence[np.ndarray],
                 order: Sequence[int], dtype) -> np.ndarray:
  """(S, T, H, W) stack in NIfTI slice order (missing cells zero), or (N, H, W) without grid."""
  height, width = frames[0].shape
  if not has_grid(frames):
    return np.stack([np.asarray(a, dtype) for a in arrays])
  num_slices, num_phases = grid_shape(frames)
  stack = np.zeros((num_slices, num_phases, height, width), dtype)
  position = {s: k for k, s in enumerate(order)}
  for f, a in zip(frames, arrays):
    stack[position[f.slice_index], f.phase_index] = a
  return stack


def _image_dtype(frames: Sequence[data_lib.Frame]):
  """int16 when the intensities are integers in range (MR raw data), else float32."""
  integral = all(np.array_equal(f.image, np.round(f.image)) for f in frames)
  low, high = min(f.image.min() for f in frames), max(f.image.max() for f in frames)
  return np.int16 if integral and -32768 <= low and high <= 32767 else np.float32


def write_nifti_volumes(series: Series, predictions: Sequence[Prediction], folder: str,
                        summary: dict[str, Any], with_image: bool) -> dict[str, str]:
  """`<series>_mask.nii.gz` (+ `_image.nii.gz`); returns the paths written."""
  frames = [p.frame for p in predictions]
  if len({f.shape for f in frames}) > 1:
    _warn(summary['warnings'], '%s: frames of different sizes; no NIfTI volume written',
          series.name)
    return {}
  spacing = summary.get('slice_spacing_mm', float('nan'))
  spacing = float(spacing) if spacing is not None else float('nan')
  affine, order, kind = series_affine(frames, spacing)
  if kind == 'nominal':
    _warn(summary['warnings'], '%s: no DICOM geometry; the NIfTI affine holds the pixel spacing '
          'only (axis-aligned%s)', series.name,
          '' if has_grid(frames) else ', third axis = frame number')
  times = [t for t in (summary.get('phase_trigger_time_ms') or []) if t is not None]
  time_step = float(np.median(np.diff(times))) if len(times) > 1 else None
  summary['nifti'] = dict(affine=np.round(affine, 6).tolist(), slice_order=order,
                          geometry=kind, axes='column, row, slice' +
                          (', phase' if has_grid(frames) else ''))
  paths = {}
  mask_path = os.path.join(folder, f'{series.name}_mask.nii.gz')
  export.write_nifti(mask_path, export.to_nifti_order(
      _nifti_stack(frames, [p.mask for p in predictions], order, np.uint8)), affine, time_step)
  paths['nifti_mask'] = mask_path
  if with_image:
    image_path = os.path.join(folder, f'{series.name}_image.nii.gz')
    dtype = _image_dtype(frames)
    export.write_nifti(image_path, export.to_nifti_order(
        _nifti_stack(frames, [f.image for f in frames], order, dtype)), affine, time_step)
    paths['nifti_image'] = image_path
  return paths


FRAME_COLUMNS = ('frame_id', 'instance', 'slice_index', 'phase_index', 'slice_location',
                 'trigger_time_ms', 'area_mm2', 'expert_area_mm2', 'expert_mask_area_mm2',
                 'dice', 'detected', 'is_ed', 'is_es')

SERIES_COLUMNS = ('series', 'case', 'num_frames', 'num_slices', 'num_phases',
                  'slice_spacing_mm', 'ed_phase', 'es_phase', 'edv_ml', 'esv_ml', 'sv_ml',
                  'ef_pct', 'expert_edv_ml', 'expert_esv_ml', 'expert_ef_pct',
                  'expert_phase_edv_ml', 'expert_phase_esv_ml', 'expert_phase_ef_pct',
                  'num_warnings')


def _fmt(value: Any) -> str:
  if value is None:
    return ''
  if isinstance(value, bool):
    return str(int(value))
  if isinstance(value, (float, np.floating)):
    return '' if not math.isfinite(float(value)) else f'{float(value):.4f}'.rstrip('0').rstrip('.')
  return str(value)


def _short(value: float | None) -> str:
  return '-' if value is None or not math.isfinite(value) else f'{value:.1f}'


def _write_csv(path: str, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f, lineterminator='\n')
    writer.writerow(columns)
    for row in rows:
      writer.writerow([_fmt(row.get(c)) for c in columns])


def series_row(summary: dict[str, Any]) -> dict[str, Any]:
  """One line of the top-level summary.csv."""
  volumes = summary.get('volumes') or {}
  expert = summary.get('expert') or {}
  extrema = expert.get('slice_extrema') or {}
  phase = expert.get('phase') or {}
  return dict(
      series=summary['series'], case=summary['case'], num_frames=summary['num_frames'],
      num_slices=summary.get('num_slices'), num_phases=summary.get('num_phases'),
      slice_spacing_mm=summary.get('slice_spacing_mm'), ed_phase=volumes.get('ed_phase'),
      es_phase=volumes.get('es_phase'), edv_ml=volumes.get('edv_ml'),
      esv_ml=volumes.get('esv_ml'), sv_ml=volumes.get('sv_ml'), ef_pct=volumes.get('ef_pct'),
      expert_edv_ml=extrema.get('edv_ml'), expert_esv_ml=extrema.get('esv_ml'),
      expert_ef_pct=extrema.get('ef_pct'), expert_phase_edv_ml=phase.get('edv_ml'),
      expert_phase_esv_ml=phase.get('esv_ml'), expert_phase_ef_pct=phase.get('ef_pct'),
      num_warnings=len(summary.get('warnings', [])))


def write_series_outputs(series: Series, predictions: Sequence[Prediction], output: str,
                         config: ml_collections.ConfigDict,
                         overlay_writer: export.OverlayWriter | None = None
                         ) -> dict[str, Any]:
  """Writes every output of one series under `output/<series.name>/`; returns its summary."""
  folder = os.path.join(output, series.name)
  os.makedirs(folder, exist_ok=True)
  summary = summarize_series(series, predictions, config)
  volumes = summary.get('volumes') or {}
  ed, es = volumes.get('ed_phase'), volumes.get('es_phase')
  outputs: dict[str, Any] = {}
  overlay_writer = overlay_writer or export.OverlayWriter()
  counts = collections.Counter()
  for p, row in zip(predictions, summary['frames']):
    f = p.frame
    row['is_ed'] = ed is not None and f.phase_index == ed
    row['is_es'] = es is not None and f.phase_index == es
    if _pr(config, 'save_masks'):
      export.write_mask_png(os.path.join(folder, 'masks', f'{f.frame_id}.png'), p.mask)
      counts['masks'] += 1
    if _pr(config, 'save_contours'):
      path = export.write_auto_contour(os.path.join(folder, 'contours'), f.instance, p.contour)
      row['auto_contour'] = os.path.relpath(path, folder) if path else None
      counts['contours'] += path is not None
    if _pr(config, 'save_overlays'):
      label = [f.frame_id]
      if f.slice_index is not None:
        label.append(f'slice {f.slice_index} phase {f.phase_index}')
      label.append('ED' if row['is_ed'] else 'ES' if row['is_es'] else '')
      expert = f.contour
      if expert is None and f.mask is not None and f.mask.any():
        expert = metrics.mask_to_contour(f.mask)  # PNG data sets: expert masks, no polygons
      overlay_writer.write(os.path.join(folder, 'overlays', f'{f.frame_id}.png'), f.image,
                           p.contour, expert, title='  '.join(s for s in label if s))
      counts['overlays'] += 1
    if p.uncertainty is not None:
      export.write_uncertainty_png(os.path.join(folder, 'uncertainty', f'{f.frame_id}.png'),
                                   p.uncertainty)
      counts['uncertainty'] += 1
  for kind in ('masks', 'contours', 'overlays', 'uncertainty'):
    if counts[kind] or kind in ('masks', 'contours', 'overlays') and _pr(config, f'save_{kind}'):
      outputs[kind] = dict(folder=kind, count=counts[kind])
  if _pr(config, 'save_nifti'):
    outputs.update(write_nifti_volumes(series, predictions, folder, summary,
                                       bool(_pr(config, 'nifti_image'))))
  _write_csv(os.path.join(folder, 'frames.csv'), FRAME_COLUMNS, summary['frames'])
  outputs['frames_csv'] = 'frames.csv'
  if summary.get('areas_mm2') is not None and volumes:
    expert = summary.get('expert') or {}
    expert_phase = expert.get('phase') or {}
    rows = [dict(phase_index=t, trigger_time_ms=summary['phase_trigger_time_ms'][t],
                 volume_ml=v, expert_volume_ml=(expert_phase.get('volumes_ml') or [None] *
                                                (t + 1))[t],
                 is_ed=t == ed, is_es=t == es)
            for t, v in enumerate(volumes['volumes_ml'])]
    _write_csv(os.path.join(folder, 'volumes.csv'), ('phase_index', 'trigger_time_ms',
                                                     'volume_ml', 'expert_volume_ml', 'is_ed',
                                                     'is_es'), rows)
    outputs['volumes_csv'] = 'volumes.csv'
    title = (f"{series.name}: EDV {_short(volumes['edv_ml'])} mL, ESV "
             f"{_short(volumes['esv_ml'])} mL, EF {_short(volumes['ef_pct'])} %")
    export.write_volume_curve_png(
        os.path.join(folder, 'volume_curve.png'), volumes['volumes_ml'],
        [r['expert_volume_ml'] for r in rows], ed, es, title=title)
    outputs['volume_curve'] = 'volume_curve.png'
  outputs = {k: (os.path.relpath(v, folder) if isinstance(v, str) and os.path.isabs(v) else v)
             for k, v in outputs.items()}
  summary['outputs'] = outputs
  with open(os.path.join(folder, 'summary.json'), 'w') as f:
    json.dump(metrics.to_jsonable(summary), f, indent=1)
  return summary


# ---------------------------------------------------------------------------- entry point


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
  dtype = _pr(config, 'dtype')
  if dtype:
    if dtype not in models.DTYPES:
      raise ValueError(f'predict.dtype={dtype!r}: choose from {sorted(models.DTYPES)} '
                       "or '' (as trained).")
    config.model.dtype = dtype   # activations only: the parameters are the same either way
  augment = trained_config.get('augment', None) or {}
  if (_pr(config, 'tta') and _pr(config, 'tta_transforms') != 'none'
      and not (augment.get('flip_lr', False) or augment.get('flip_ud', False))):
    # Measured: a CPU U-Net trained without flips drops from Dice 0.93 to 0.59 on SC-HF-I-05
    # with d4 TTA (mirrored or rotated hearts are unseen inputs); see docs/RESULTS.md.
    logging.warning('predict.tta=%s, but the model was trained without flip augmentation '
                    '(augment.flip_lr/flip_ud are off): flipped or rotated inputs are unseen '
                    'and usually segment worse, which drags the TTA average down.',
                    _pr(config, 'tta_transforms'))
  run_model = run_config.get('model')
  if run_model is not None:
    differing = sorted(k for k in ('name', 'base_width', 'depth', 'norm')
                       if k in run_model and k in config.model
                       and run_model[k] != config.model[k])
    if differing:
      logging.warning('Ignoring --config model fields %s: the checkpoint was trained with %s',
                      differing, {k: config.model[k] for k in differing})
  return config


def predict(config: ml_collections.ConfigDict, workdir: str, input_path: str | None = None,
            output: str | None = None) -> list[dict[str, Any]]:
  """Predicts on every series under `input_path` and writes the outputs to `output`.

  Args:
    config: this run's config; `config.predict` drives prediction. The model and the
      preprocessing come from the config saved in `workdir`.
    workdir: a training workdir (its `config.predict.checkpoint` = best | latest checkpoint).
    input_path: DICOM series folder, tree of series, or PNG folder (default predict.input).
    output: output folder (default predict.output).

  Returns:
    The per-series summaries (also in `output/summary.json`).
  """
  from lvseg_jax import checkpointing  # pylint: disable=g-import-not-at-top

  input_path = input_path or str(config.predict.get('input', '') or '')
  output = output or str(config.predict.get('output', '') or '')
  if not input_path or not output:
    raise PredictError('predict needs an input and an output folder (--input, --output)')
  trained_config, variables = checkpointing.load_for_inference(
      workdir, str(_pr(config, 'checkpoint')))
  config = inference_config(config, trained_config)
  model = models.get_model(config.model)
  series = find_series(input_path, config)
  logging.info('Predicting on %d series from %s', len(series), input_path)
  return run_series(model, variables, series, config, output,
                    meta=dict(workdir=os.path.abspath(workdir),
                              checkpoint=str(_pr(config, 'checkpoint')),
                              input=os.path.abspath(input_path)))


def run_series(model, variables: dict[str, Any], series: Sequence[Series],
               config: ml_collections.ConfigDict, output: str,
               meta: dict[str, Any] | None = None) -> list[dict[str, Any]]:
  """Predicts and writes every series, then the top-level summary.csv / summary.json."""
  os.makedirs(output, exist_ok=True)
  tta_mode = _pr(config, 'tta_transforms') if _pr(config, 'tta') else 'none'
  forward = make_forward_fn(model, tta_mode, int(_pr(config, 'lv_class')))
  overlay_writer = export.OverlayWriter()
  summaries = []
  for s in series:
    start = time.time()
    predictions = predict_frames(model, variables, s.frames, config, forward_fn=forward,
                                 desc=s.name)
    summary = write_series_outputs(s, predictions, output, config, overlay_writer)
    summary['seconds'] = round(time.time() - start, 2)
    volumes = summary.get('volumes') or {}
    logging.info('%s: %d frames in %.1f s; EDV %s mL, ESV %s mL, EF %s %%', s.name,
                 len(s.frames), summary['seconds'], _fmt(volumes.get('edv_ml')),
                 _fmt(volumes.get('esv_ml')), _fmt(volumes.get('ef_pct')))
    summaries.append(summary)
  _write_csv(os.path.join(output, 'summary.csv'), SERIES_COLUMNS,
             [series_row(s) for s in summaries])
  index = dict(meta or {}, predict=config.predict.to_dict(),
               series=[{k: v for k, v in s.items() if k not in ('frames', 'areas_mm2')}
                       for s in summaries])
  with open(os.path.join(output, 'summary.json'), 'w') as f:
    json.dump(metrics.to_jsonable(index), f, indent=1)
  return summaries
