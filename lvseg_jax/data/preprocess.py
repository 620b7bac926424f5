"""Preprocessing shared by train, evaluate and predict: intensities and the `Geometry`
that maps a frame to the network grid and back."""

import dataclasses
import functools
from typing import Any, Callable, Sequence

import numpy as np
from scipy import sparse


def _resize_scale(shape: tuple[int, int], size: int) -> float:
  return size / max(shape)   # longer side to `size`, aspect kept, shorter side padded


def _crop_scale(shape: tuple[int, int], size: int) -> float:
  del shape, size
  return 1.0                 # native resolution, centre crop / pad


RESIZE_MODES = {'resize': _resize_scale, 'crop': _crop_scale}
# A `data.roi_mm` square around the LV, resampled to the grid: the window follows each frame's
# LV centre (`roi_geometry`), so it is not a scale of the frame alone.
ROI_MODE = 'roi'


def get_resize_mode(name: str) -> Callable[[tuple[int, int], int], float]:
  if name == ROI_MODE:
    raise ValueError(f"resize_mode={ROI_MODE!r} needs each frame's LV centre and pixel spacing "
                     '(preprocess_image(..., centre=, pixel_spacing=))')
  if name not in RESIZE_MODES:
    raise ValueError(f'Unknown resize_mode {name!r}; choices: '
                     f'{sorted([*RESIZE_MODES, ROI_MODE])}')
  return RESIZE_MODES[name]


@functools.lru_cache(maxsize=64)
def _linear_weights(n_in: int, n_out: int) -> sparse.csr_matrix:
  """(n_out, n_in) linear-interpolation matrix, half-pixel centres, antialiased when shrinking.

  The triangle kernel is widened by the shrink factor (area-like averaging, no aliasing) and
  each row is normalized over the input pixels it reaches, which clamps at the borders. This is
  the convention of `jax.image.resize(method='linear', antialias=True)`. Sparse because it is
  banded: products cost O(pixels) and, unlike BLAS, spawn no threads (10x faster on a busy
  machine). Memoized: a pure function of two sizes.
  """
  scale = n_out / n_in
  width = max(1.0, 1.0 / scale)
  centres = (np.arange(n_out) + 0.5) / scale - 0.5
  weights = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in)[None, :] - centres[:, None]) / width)
  return sparse.csr_matrix(weights / weights.sum(axis=1, keepdims=True))


def _separable(rows: sparse.csr_matrix, array: np.ndarray, cols: sparse.csr_matrix
               ) -> np.ndarray:
  """rows @ array @ cols.T over the first two axes of (H, W[, C]), channel by channel."""
  flat = array.reshape(array.shape[:2] + (-1,))
  out = np.stack([(cols @ (rows @ flat[..., c]).T).T for c in range(flat.shape[-1])], axis=-1)
  return out.reshape(out.shape[:2] + array.shape[2:])


def _resample(array: np.ndarray, shape: tuple[int, int], labels: bool) -> np.ndarray:
  """Separable linear resampling of (H, W[, C]); labels via one-hot, resample, argmax."""
  shape = (int(shape[0]), int(shape[1]))
  if tuple(array.shape[:2]) == shape:
    return array.copy()
  rows = _linear_weights(array.shape[0], shape[0])
  cols = _linear_weights(array.shape[1], shape[1])
  if labels:
    num_classes = int(array.max()) + 1 if array.size else 1
    if num_classes <= 2:
      # Binary: the class-1 fraction decides; a tie (exactly 0.5) goes to background.
      fraction = _separable(rows, (array == 1).astype(np.float64), cols)
      return (fraction > 0.5).astype(array.dtype)
    one_hot = (array[..., None] == np.arange(num_classes)).astype(np.float64)
    # argmax picks the lowest class on ties, consistent with the binary rule.
    return np.argmax(_separable(rows, one_hot, cols), axis=-1).astype(array.dtype)
  return _separable(rows, array.astype(np.float64), cols).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Maps an (H, W) frame to the (S, S) network grid and back.

  The frame is first resampled to `scaled_shape` (identity in 'crop' mode), then the S x S
  window starting at `offset` (row, col) in the scaled frame is taken; negative offsets mean
  padding. Both steps are inverted by `invert`.
  """
  original_shape: tuple[int, int]
  size: int
  scaled_shape: tuple[int, int]
  offset: tuple[int, int]

  @classmethod
  def create(cls, shape: tuple[int, int], size: int, mode: str = 'resize') -> 'Geometry':
    scale = get_resize_mode(mode)(tuple(shape[:2]), size)
    shape = (int(shape[0]), int(shape[1]))
    scaled = shape if scale == 1.0 else tuple(max(1, int(round(n * scale))) for n in shape)
    offset = tuple((n - size) // 2 for n in scaled)
    return cls(shape, int(size), scaled, offset)

  @classmethod
  def around(cls, shape: tuple[int, int], size: int, centre: Sequence[float],
             scale: Sequence[float]) -> 'Geometry':
    """The S x S window centred on `centre` ((row, col) in original pixels) of the frame
    resampled by `scale` (rows, columns)."""
    shape = (int(shape[0]), int(shape[1]))
    scaled = tuple(max(1, int(round(n * f))) for n, f in zip(shape, scale))
    # Pixel i spans [i, i + 1), so its centre is at i + 0.5 on both grids.
    offset = tuple(int(round((c + 0.5) * m / n - size / 2))
                   for c, n, m in zip(centre, shape, scaled))
    return cls(shape, int(size), scaled, offset)

  def _windows(self) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """(slices in the scaled frame, slices in the S x S grid) of the overlapping region."""
    src, dst = [], []
    for n, o in zip(self.scaled_shape, self.offset):
      lo, hi = max(o, 0), min(o + self.size, n)
      src.append(slice(lo, hi))
      dst.append(slice(lo - o, hi - o))
    return tuple(src), tuple(dst)

  def apply(self, array: np.ndarray, labels: bool = False, fill: float = 0.0) -> np.ndarray:
    """(H, W[, C]) -> (S, S[, C]); labels are resampled as class maps."""
    scaled = _resample(np.asarray(array), self.scaled_shape, labels)
    out = np.full((self.size, self.size) + scaled.shape[2:], fill, dtype=scaled.dtype)
    src, dst = self._windows()
    out[dst] = scaled[src]
    return out

  def invert(self, array_s: np.ndarray, labels: bool | None = None,
             fill: float = 0.0) -> np.ndarray:
    """(S, S[, C]) -> (H, W[, C]) on the original grid.

    Integer/bool maps are treated as class labels (one-hot, bilinear, argmax); float maps
    (probabilities, logits) are resampled bilinearly per channel; take the argmax afterwards.
    Pixels outside the S x S window (crop mode) get `fill` (0 = background).
    """
    array_s = np.asarray(array_s)
    if array_s.shape[:2] != (self.size, self.size):
      raise ValueError(f'expected a ({self.size}, {self.size}[, C]) array, got {array_s.shape}')
    if labels is None:
      labels = not np.issubdtype(array_s.dtype, np.floating)
    if array_s.dtype == bool:
      array_s = array_s.astype(np.uint8)
    canvas = np.full(self.scaled_shape + array_s.shape[2:], fill, dtype=array_s.dtype)
    src, dst = self._windows()
    canvas[src] = array_s[dst]
    return _resample(canvas, self.original_shape, labels)


def roi_geometry(shape: tuple[int, int], size: int, centre: Sequence[float],
                 pixel_spacing: Sequence[float], roi_mm: float) -> Geometry:
  """The `size` grid over the `roi_mm` x `roi_mm` square centred on `centre` (row, col)."""
  return Geometry.around(shape, size, centre,
                         [size * float(d) / float(roi_mm) for d in pixel_spacing])


def frame_centre(shape: Sequence[int]) -> tuple[float, float]:
  """The centre (row, col) of an image of `shape`: where a 'roi' window goes when nothing
  locates the LV."""
  return (shape[0] - 1) / 2.0, (shape[1] - 1) / 2.0


def mask_centre(mask: np.ndarray | None) -> tuple[float, float] | None:
  """The centre (row, col) of the bounding box of a mask's nonzero pixels; None if empty."""
  if mask is None:
    return None
  mask = np.asarray(mask) != 0
  rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
  if rows.size == 0:
    return None
  return (rows[0] + rows[-1]) / 2.0, (cols[0] + cols[-1]) / 2.0


def normalize_intensity(image: np.ndarray,
                        clip_percentiles: Sequence[float] | None = (1.0, 99.0)) -> np.ndarray:
  """Clips to the image's own percentiles, then zero mean and unit variance (float32).

  A constant image maps to zeros.
  """
  image = np.asarray(image, dtype=np.float64)
  if not np.isfinite(image).all():
    raise ValueError('image has non-finite values')
  if clip_percentiles:
    low, high = (float(p) for p in clip_percentiles)
    if not 0.0 <= low < high <= 100.0:
      raise ValueError(f'clip_percentiles must satisfy 0 <= low < high <= 100, got '
                       f'{tuple(clip_percentiles)}')
    image = np.clip(image, *np.percentile(image, [low, high]))
  std = image.std()
  if std < 1e-8:
    return np.zeros(image.shape, np.float32)
  return ((image - image.mean()) / std).astype(np.float32)


def preprocess_image(image: np.ndarray, data_config: Any,
                     centre: Sequence[float] | None = None,
                     pixel_spacing: Sequence[float] | None = None
                     ) -> tuple[np.ndarray, Geometry]:
  """The one preprocessing path for train, evaluate and predict.

  Normalizes intensities on the original grid (`normalize_intensity` with
  `clip_percentiles`), then maps to the `image_size` grid (`resize_mode`); padding gets the
  darkest normalized value.

  Args:
    image: (H, W) or (H, W, 1) raw intensities.
    data_config: `config.data`.
    centre: resize_mode 'roi' only: the LV centre (row, col) the window is centred on.
    pixel_spacing: resize_mode 'roi' only: (row, col) mm, for the `roi_mm` square.

  Returns:
    ((S, S, 1) float32 image, Geometry to map predictions back with `Geometry.invert`).
  """
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim != 2:
    raise ValueError(f'expected a 2D image, got shape {image.shape}')
  size = int(data_config.image_size)
  if data_config.resize_mode == ROI_MODE and centre is not None and pixel_spacing is not None:
    geometry = roi_geometry(image.shape, size, centre, pixel_spacing, data_config.roi_mm)
  else:
    geometry = Geometry.create(image.shape, size, data_config.resize_mode)
  normalized = normalize_intensity(image, data_config.clip_percentiles)
  out = geometry.apply(normalized, labels=False, fill=float(normalized.min()))
  return out[..., None].astype(np.float32), geometry


# Class maps: 0 background, 1 LV cavity, 2 LV myocardium. A frame without an epicardial contour
# labels its non-cavity pixels BACKGROUND_OR_MYOCARDIUM: the loss then only asks "not cavity".
BACKGROUND, CAVITY, MYOCARDIUM, BACKGROUND_OR_MYOCARDIUM = 0, 1, 2, 3


def class_map(mask: np.ndarray, epi_mask: np.ndarray | None, myocardium: bool) -> np.ndarray:
  """(H, W) int32 training labels of a frame from its endocardial and epicardial masks.

  Without `myocardium`: {0, 1}, the cavity. With it: {0, 1, 2} where the epicardium is known
  (myocardium = inside the epicardium, outside the cavity), else {1, 3}.
  """
  cavity = np.asarray(mask).astype(bool)
  if not myocardium:
    return cavity.astype(np.int32)
  if epi_mask is None:
    return np.where(cavity, CAVITY, BACKGROUND_OR_MYOCARDIUM).astype(np.int32)
  epi = np.asarray(epi_mask).astype(bool)
  return np.where(cavity, CAVITY, np.where(epi, MYOCARDIUM, BACKGROUND)).astype(np.int32)


def preprocess_mask(mask: np.ndarray, geometry: Geometry) -> np.ndarray:
  """(H, W) class map -> (S, S) int32 on the network grid."""
  return geometry.apply(np.asarray(mask).astype(np.int32), labels=True, fill=0).astype(np.int32)