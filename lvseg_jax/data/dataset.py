"""`Dataset` (preprocessed arrays + original frames, batches), its npz cache, and the
train / eval datasets of a config."""

import collections
import dataclasses
import hashlib
import json
import os
import tempfile
from typing import Any, Callable, Iterator, Sequence

from absl import logging
import jax
import numpy as np

from lvseg_jax.data import preprocess
from lvseg_jax.data import sources
from lvseg_jax.data import splits
from lvseg_jax.data.records import Frame, LoadReport, normalize_case_id, root_dir

# Bump when the cached arrays or Frame fields change meaning, so old caches are not reused.
CACHE_VERSION = 3
# config.data fields that change what is loaded or how it is preprocessed (the cache key).
_CACHE_CONFIG_KEYS = ('source', 'png_dir', 'contour', 'image_size', 'resize_mode',
                      'clip_percentiles', 'nominal_spacing_mm', 'spacing_table', 'on_error',
                      'dicom_glob', 'contours_dir', 'patient_sheet', 'myocardium', 'labels',
                      'nifti_images', 'nifti_labels', 'case_regex', 'roi_mm')
_ARRAY_FIELDS = ('image', 'mask', 'contour', 'epi_mask', 'epi_contour')
_TUPLE_FIELDS = ('pixel_spacing', 'image_position', 'image_orientation')


class Dataset:
  """Preprocessed arrays for a list of frames, plus the originals for metrics.

  Attributes:
    images: (N, S, S, 1) float32, normalized.
    masks: (N, S, S) int32 class maps (`preprocess.class_map`; zeros where `has_mask` is
      False).
    has_mask: (N,) bool, whether the frame has an expert mask.
    frames: the original `Frame`s (original resolution, spacing, DICOM geometry).
    geometries: per-frame `preprocess.Geometry` (network grid <-> original grid).
    name: e.g. 'train', 'eval'.
    skipped: (path, problem) items skipped while loading (on_error='skip').
  """

  def __init__(self, images: np.ndarray, masks: np.ndarray, frames: Sequence[Frame],
               geometries: Sequence[preprocess.Geometry], *, has_mask: np.ndarray | None = None,
               name: str = '', skipped: Sequence[tuple[str, str]] = ()):
    if not len(images) == len(masks) == len(frames) == len(geometries):
      raise ValueError(f'length mismatch: {len(images)} images, {len(masks)} masks, '
                       f'{len(frames)} frames, {len(geometries)} geometries')
    self.images = images
    self.masks = masks
    self.frames = list(frames)
    self.geometries = list(geometries)
    self.has_mask = (np.asarray(has_mask, bool) if has_mask is not None
                     else np.array([f.mask is not None for f in self.frames], bool))
    self.name = name
    self.skipped = list(skipped)

  def __len__(self) -> int:
    return len(self.frames)

  def __repr__(self) -> str:
    return (f'Dataset({self.name!r}, {len(self)} frames, {len(self.cases)} cases, '
            f'images {self.images.shape})')

  @property
  def cases(self) -> list[str]:
    return sorted({f.case for f in self.frames})

  def frames_per_case(self) -> dict[str, int]:
    return dict(sorted(collections.Counter(f.case for f in self.frames).items()))

  def subset(self, indices: Sequence[int], name: str | None = None) -> 'Dataset':
    indices = np.asarray(indices, dtype=np.int64)
    return Dataset(self.images[indices], self.masks[indices],
                   [self.frames[i] for i in indices], [self.geometries[i] for i in indices],
                   has_mask=self.has_mask[indices], name=self.name if name is None else name,
                   skipped=self.skipped)

  def select_cases(self, cases: Sequence[str], name: str | None = None) -> 'Dataset':
    wanted = {normalize_case_id(c) for c in cases}
    return self.subset([i for i, f in enumerate(self.frames) if f.case in wanted], name)

  def to_original(self, i: int, array_s: np.ndarray) -> np.ndarray:
    """Maps an (S, S[, C]) network-grid array of frame `i` to its original (H, W[, C]) grid.

    Integer/bool arrays are class maps (resampled one-hot, argmax). Float arrays are
    resampled bilinearly per channel: pass probabilities and take the argmax afterwards.
    """
    return self.geometries[i].invert(array_s)

  def num_batches(self, batch_size: int, drop_remainder: bool = True) -> int:
    return len(self) // batch_size if drop_remainder else -(-len(self) // batch_size)

  def batches(self, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
              drop_remainder: bool = True, process_index: int | None = None,
              process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Host-side NumPy batches for one epoch.

    The order is a permutation drawn from `np.random.default_rng([seed, epoch])`, so it is the
    same on every process and for every rerun. Each process gets rows
    [p * B/P, (p + 1) * B/P) of every global batch of `batch_size` rows.

    Args:
      batch_size: the global batch size B (divisible by the process count).
      seed, epoch: determine the shuffle.
      shuffle: False keeps the dataset order (evaluation).
      drop_remainder: drop the last partial global batch; False pads it to B rows with
        zero images/masks, `valid=False` and `index=-1`.
      process_index, process_count: default `jax.process_index()` / `jax.process_count()`.

    Yields:
      {'image': (B/P, S, S, 1) float32, 'mask': (B/P, S, S) int32, 'valid': (B/P,) bool,
       'index': (B/P,) int32 row into this dataset (-1 for padding)}.

    Raises:
      ValueError: bad sizes, or fewer frames than one batch with drop_remainder=True.
    """
    if process_index is None:
      process_index = jax.process_index()
    if process_count is None:
      process_count = jax.process_count()
    if batch_size <= 0 or batch_size % process_count:
      raise ValueError(f'batch_size {batch_size} must be positive and divisible by the '
                       f'process count {process_count}')
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} not in [0, {process_count})')
    if seed < 0 or epoch < 0:
      raise ValueError(f'seed and epoch must be >= 0, got {seed}, {epoch}')
    num_batches = self.num_batches(batch_size, drop_remainder)
    if num_batches == 0:
      raise ValueError(f'dataset {self.name!r} has {len(self)} frames, fewer than one batch of '
                       f'{batch_size} (drop_remainder={drop_remainder})')
    return self._batches(batch_size, seed, epoch, shuffle, num_batches, process_index,
                         process_count)

  def _batches(self, batch_size, seed, epoch, shuffle, num_batches, process_index,
               process_count):
    n = len(self)
    order = (np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n))
    local = batch_size // process_count
    start = process_index * local
    for b in range(num_batches):
      index = np.full(batch_size, -1, dtype=np.int64)
      chunk = order[b * batch_size:(b + 1) * batch_size]
      index[:len(chunk)] = chunk
      index = index[start:start + local]
      valid = index >= 0
      rows = np.where(valid, index, 0)
      image = self.images[rows]
      mask = self.masks[rows]
      image[~valid] = 0.0
      mask[~valid] = 0
      yield {'image': image.astype(np.float32, copy=False),
             'mask': mask.astype(np.int32, copy=False), 'valid': valid,
             'index': index.astype(np.int32)}


def expert_centre(frame: Frame) -> tuple[float, float]:
  """Where a resize_mode 'roi' window is centred in training: the expert's LV (the
  epicardium's bounding box, else the endocardium's; the frame centre when neither exists)."""
  centre = preprocess.mask_centre(frame.epi_mask if frame.epi_mask is not None else frame.mask)
  return centre or preprocess.frame_centre(frame.shape)


def build_dataset(frames: Sequence[Frame], data_config: Any, name: str = '',
                  skipped: Sequence[tuple[str, str]] = (),
                  centres: Sequence[tuple[float, float]] | None = None) -> Dataset:
  """Preprocesses frames (`preprocess_image`, `preprocess_mask`) into a `Dataset`.

  With resize_mode 'roi' each window is centred on `centres` (row, col per frame; default:
  `expert_centre`, which only training may use: evaluation takes a localizer's).
  """
  size = int(data_config.image_size)
  images = np.zeros((len(frames), size, size, 1), np.float32)
  masks = np.zeros((len(frames), size, size), np.int32)
  geometries = []
  roi = data_config.resize_mode == preprocess.ROI_MODE
  if roi and centres is None:
    centres = [expert_centre(f) for f in frames]
  for i, frame in enumerate(frames):
    images[i], geometry = preprocess.preprocess_image(
        frame.image, data_config, centres[i] if roi else None, frame.pixel_spacing)
    if frame.mask is not None:
      masks[i] = preprocess.preprocess_mask(
          preprocess.class_map(frame.mask, frame.epi_mask, bool(data_config.myocardium)),
          geometry)
    geometries.append(geometry)
  return Dataset(images, masks, frames, geometries, name=name, skipped=skipped)


def cache_key(data_config: Any, cases: Sequence[str] | None = None,
              contoured_only: bool = True) -> str:
  """Hex key over the source files (path, size, mtime) and the loading/preprocessing config."""
  root = sources.check_root(data_config)
  files = []
  for path in sources.get_source(data_config.source).files(data_config):
    try:
      stat = os.stat(path)
      files.append((os.path.relpath(path, root), stat.st_size, stat.st_mtime_ns))
    except OSError:
      files.append((os.path.relpath(path, root), -1, -1))
  settings = {}
  for key in _CACHE_CONFIG_KEYS:
    value = data_config[key]
    if hasattr(value, 'to_dict'):
      value = value.to_dict()
    settings[key] = list(value) if isinstance(value, (tuple, list)) else value
  payload = {'version': CACHE_VERSION, 'root': os.path.realpath(root), 'files': files,
             'config': settings, 'contoured_only': bool(contoured_only),
             'cases': None if cases is None else sorted({normalize_case_id(c) for c in cases})}
  return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _compact(arrays: list[np.ndarray]) -> np.ndarray:
  """Concatenates flattened arrays in the smallest dtype that stores them exactly."""
  flat = np.concatenate([a.ravel() for a in arrays]) if arrays else np.zeros(0, np.float32)
  for dtype in (np.uint8, np.int16, np.int32):
    info = np.iinfo(dtype)
    if (flat.size == 0 or (flat.min() >= info.min and flat.max() <= info.max and
                           np.array_equal(flat, np.round(flat)))):
      return flat.astype(dtype)
  return flat.astype(np.float32)


def _frame_meta(frame: Frame) -> dict[str, Any]:
  meta = {}
  for field in dataclasses.fields(Frame):
    if field.name not in _ARRAY_FIELDS:
      value = getattr(frame, field.name)
      meta[field.name] = list(value) if isinstance(value, tuple) else value
  return meta


def _pack_masks(frames: Sequence[Frame], field: str) -> tuple[np.ndarray, np.ndarray]:
  """The frames' `field` masks ({0, 1}, zeros where None) bit-packed, and which exist."""
  masks = [getattr(f, field) for f in frames]
  bits = np.concatenate([(m if m is not None else np.zeros(f.shape, np.uint8)).ravel()
                         .astype(bool) for f, m in zip(frames, masks)]) if frames else []
  return np.packbits(np.asarray(bits, bool)), np.array([m is not None for m in masks], bool)


def _pack_contours(frames: Sequence[Frame], field: str) -> tuple[np.ndarray, np.ndarray]:
  """The frames' `field` polygons concatenated, and each frame's point count (0 for None)."""
  polygons = [getattr(f, field) for f in frames]
  counts = np.array([0 if p is None else len(p) for p in polygons], np.int64)
  kept = [p for p in polygons if p is not None]
  return (np.concatenate(kept) if kept else np.zeros((0, 2))).astype(np.float64), counts


def save_cache(path: str, dataset: Dataset) -> None:
  """Writes a dataset (preprocessed and original arrays, frame records) as one .npz."""
  frames = dataset.frames
  shapes = np.array([f.shape for f in frames], np.int64).reshape(-1, 2)
  meta = {'frames': [_frame_meta(f) for f in frames], 'name': dataset.name,
          'skipped': [list(s) for s in dataset.skipped], 'version': CACHE_VERSION}
  arrays = {
      'images': dataset.images,
      # Masks are {0, 1}: bit-packing makes them 8x smaller, losslessly.
      'masks': np.packbits(dataset.masks.astype(bool).ravel()),
      'mask_shape': np.array(dataset.masks.shape, np.int64),
      'mask_max': np.array(int(dataset.masks.max()) if dataset.masks.size else 0),
      'has_mask': dataset.has_mask,
      'orig_images': _compact([f.image for f in frames]),
      'orig_shapes': shapes,
      # Geometries, as 'roi' windows depend on each frame's centre, not on the config alone.
      'scaled_shapes': np.array([g.scaled_shape for g in dataset.geometries],
                                np.int64).reshape(-1, 2),
      'offsets': np.array([g.offset for g in dataset.geometries], np.int64).reshape(-1, 2),
      'meta': np.array(json.dumps(meta)),
  }
  for prefix in ('', 'epi_'):
    arrays[f'orig_{prefix}masks'], arrays[f'has_orig_{prefix}mask'] = _pack_masks(
        frames, f'{prefix}mask')
    arrays[f'{prefix}contours'], arrays[f'{prefix}contour_counts'] = _pack_contours(
        frames, f'{prefix}contour')
  if arrays['mask_max'] > 1:
    arrays['masks'] = dataset.masks.astype(np.int32)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  # Write then rename, so a concurrent or interrupted run never sees a half-written cache.
  fd, tmp = tempfile.mkstemp(dir=folder, suffix='.npz.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def load_cache(path: str, data_config: Any) -> Dataset:
  """Reads a dataset written by `save_cache`."""
  with np.load(path, allow_pickle=False) as z:
    meta = json.loads(str(z['meta']))
    if meta.get('version') != CACHE_VERSION:
      raise ValueError(f'cache version {meta.get("version")} != {CACHE_VERSION}')
    images = z['images']
    mask_shape = tuple(z['mask_shape'])
    if int(z['mask_max']) > 1:
      masks = z['masks'].astype(np.int32)
    else:
      count = int(np.prod(mask_shape))
      masks = np.unpackbits(z['masks'], count=count).reshape(mask_shape).astype(np.int32)
    has_mask = z['has_mask']
    shapes = z['orig_shapes']
    scaled_shapes, offsets = z['scaled_shapes'], z['offsets']
    orig_images = z['orig_images']
    sizes = shapes[:, 0] * shapes[:, 1]
    originals = {prefix: (np.unpackbits(z[f'orig_{prefix}masks'], count=int(sizes.sum())),
                          z[f'has_orig_{prefix}mask'], z[f'{prefix}contours'],
                          np.concatenate([[0], np.cumsum(z[f'{prefix}contour_counts'])]))
                 for prefix in ('', 'epi_')}
  frames, geometries = [], []
  size = int(data_config.image_size)
  pixel_start = np.concatenate([[0], np.cumsum(sizes)])
  for i, record in enumerate(meta['frames']):
    shape = (int(shapes[i, 0]), int(shapes[i, 1]))
    pixels = slice(pixel_start[i], pixel_start[i + 1])
    for name in _TUPLE_FIELDS:
      if record.get(name) is not None:
        record[name] = tuple(record[name])
    for prefix, (bits, has, polygons, start) in originals.items():
      record[f'{prefix}mask'] = (bits[pixels].reshape(shape).astype(np.uint8) if has[i]
                                 else None)
      record[f'{prefix}contour'] = (polygons[start[i]:start[i + 1]].copy()
                                    if start[i + 1] > start[i] else None)
    frames.append(Frame(image=orig_images[pixels].reshape(shape).astype(np.float32), **record))
    geometries.append(preprocess.Geometry(shape, size, tuple(map(int, scaled_shapes[i])),
                                          tuple(map(int, offsets[i]))))
  return Dataset(images, masks, frames, geometries, has_mask=has_mask, name=meta['name'],
                 skipped=[tuple(s) for s in meta['skipped']])


def load_dataset(data_config: Any, cases: Sequence[str] | None = None,
                 contoured_only: bool = True, name: str = 'all',
                 centres: Callable[[Sequence[Frame]], Sequence[tuple[float, float]]] | None = None,
                 ) -> Dataset:
  """Loads and preprocesses frames, through the cache in `config.data.cache_dir` if set.

  The cache file is `<cache_dir>/<source>-<key>.npz`, `key` = `cache_key(...)`: any change of
  a source file (path, size, mtime) or of the loading/preprocessing config makes a new entry.
  Items skipped when the cache was written are logged again on a hit.

  `centres` (frames -> one window centre per frame, e.g. `roi.Localizer.centres`) places the
  windows of resize_mode 'roi' instead of the expert's LV; such a dataset bypasses the cache,
  whose windows are the expert-centred ones.
  """
  cache_dir = data_config.cache_dir if centres is None else ''
  path = None
  if cache_dir:
    key = cache_key(data_config, cases, contoured_only)
    path = os.path.join(os.path.expanduser(cache_dir),
                        f'{data_config.source}-{key[:24]}.npz')
    if os.path.isfile(path):
      try:
        dataset = load_cache(path, data_config)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Ignoring unreadable cache %s (%s); rebuilding', path, e)
      else:
        logging.info('Data cache hit: %s (%d frames)', path, len(dataset))
        for item_path, problem in dataset.skipped:
          logging.warning('Skipped (cached): %s: %s', item_path, problem)
        if dataset.skipped:
          logging.warning('Skipped %d item(s) while loading (on_error=skip, cached)',
                          len(dataset.skipped))
        dataset.name = name
        return dataset
  report = LoadReport(data_config.on_error)
  frames = sources.load_frames(data_config, cases, contoured_only, report)
  dataset = build_dataset(frames, data_config, name=name, skipped=report.skipped,
                          centres=centres(frames) if centres else None)
  if path is not None:
    save_cache(path, dataset)
    logging.info('Data cache written: %s', path)
  return dataset


def _spacing_counts(dataset: Dataset) -> dict[str, int]:
  return dict(collections.Counter(f.spacing_source for f in dataset.frames))


def load_datasets(config: Any, workdir: str | None = None) -> tuple[Dataset, Dataset]:
  """Train and eval datasets for `config.data` (source, split, preprocessing, cache).

  Only contoured frames are used (for the DICOM source most frames have no contour). Writes
  `workdir/split.json` (the split, its case lists, frame counts, missing cases, skipped
  items) when `workdir` is given.

  Returns:
    (train Dataset, eval Dataset).
  """
  data_config = config.data
  full = load_dataset(data_config, contoured_only=True, name='all')
  split = splits.case_splits(data_config, available=full.cases)
  train = full.select_cases(split['train'], name='train')
  evaluate = full.select_cases(split['eval'], name='eval')
  for dataset in (train, evaluate):
    logging.info('%s: %d frames from %d cases (spacing sources %s)', dataset.name, len(dataset),
                 len(dataset.cases), _spacing_counts(dataset))
  if data_config.resize_mode == preprocess.ROI_MODE:
    logging.info("resize_mode='roi': evaluation during training centres each window on the "
                 "expert's LV, so it is optimistic; --mode=evaluate and agreement.py find the "
                 'LV with data.roi_localizer, as predict does.')
  for key, cases in split.items():
    if key.startswith('missing:') and cases:
      logging.info('Official set %r: %d case(s) not in the data: %s', key.split(':', 1)[1],
                   len(cases), cases)
  if split['excluded']:
    logging.info('Cases kept out of training (data.train_exclude): %s', split['excluded'])
  if split['unassigned']:
    logging.info('Cases in the data used by neither train nor eval: %s', split['unassigned'])
  if workdir is not None:
    write_split(workdir, data_config, split, train, evaluate)
  return train, evaluate


def write_split(workdir: str, data_config: Any, split: dict[str, list[str]], train: Dataset,
                evaluate: Dataset) -> str:
  """Writes `workdir/split.json` describing the split a run used; returns its path."""
  def plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value

  record = {
      'split': data_config.split, 'source': data_config.source,
      'root': root_dir(data_config), 'contour': data_config.contour,
      'train_sets': plain(data_config.train_sets),
      'eval_sets': plain(data_config.eval_sets),
      'train_cases': split['train'], 'eval_cases': split['eval'],
      'train_frames': len(train), 'eval_frames': len(evaluate),
      'frames_per_case': {**train.frames_per_case(), **evaluate.frames_per_case()},
      'spacing_sources': {'train': _spacing_counts(train), 'eval': _spacing_counts(evaluate)},
      'missing': {k.split(':', 1)[1]: v for k, v in split.items() if k.startswith('missing:')},
      'unassigned': split['unassigned'], 'train_excluded': split['excluded'],
      'skipped': [list(s) for s in train.skipped],
  }
  if data_config.split == 'kfold':
    record.update({
        'kfold_sets': plain(data_config.kfold_sets),
        'num_folds': int(data_config.num_folds), 'fold': int(data_config.fold),
        'kfold_seed': int(data_config.kfold_seed),
        'folds': {k.split(':', 1)[1]: v for k, v in split.items() if k.startswith('fold:')}})
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'split.json')
  with open(path, 'w') as f:
    json.dump(record, f, indent=2)
  return path
