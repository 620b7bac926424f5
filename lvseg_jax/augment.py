"""On-device affine + elastic (+ intensity) augmentation for NHWC images and NHW masks.

Everything here is a pure, jit-compilable JAX function of an explicit PRNG key. The train step
calls `augment(jax.random.fold_in(key, step), batch['image'], batch['mask'], config.augment)`;
the config is read at trace time, so switching a component off removes its code from the graph.

Geometry. Coordinates are `(row, col)` pixel indices. A transform is described by its *sampling*
map (output pixel -> input coordinate), the convention of `scipy.ndimage.affine_transform`:
`src = A @ [row, col, 1] + d(row, col)`, where `A` is a 3x3 homogeneous matrix and `d` an
optional elastic displacement field in input pixels. Affine and elastic parts are composed into
this one grid, and each channel is resampled by a single `jax.scipy.ndimage.map_coordinates` call:
linear (order=1) for images, nearest (order=0) for masks, so masks only ever hold input labels
(plus `0`, the background, where `mode='constant'` samples outside the image).

Forward (content) motion of the random affine, about the image centre `c`:
`x -> c + t + R(angle) S F (x - c)`: flip `F` first, then scale `S = diag(s_row, s_col)`, rotate
(positive angles turn the content counter-clockwise as displayed, like `np.rot90`), translate by
`t`. A scale above 1 zooms in.

Elastic deformation (Simard et al. 2003): a white-noise displacement field smoothed by a Gaussian
of width `sigma` and scaled by `alpha`. `elastic_alpha` / `elastic_sigma` are given in pixels at
`reference_size` (256); at size `S` the field is the 256 one resampled, i.e. correlation length
`sigma * S / 256` and displacement std `std_256 * S / 256`, so 128x128 images see the same
physical deformation. Two ways to draw it, with identical statistics (std and covariance):
  * `'conv'`: Simard's recipe at full resolution, uniform(-1, 1) noise and a separable Gaussian
    (equals `alpha * scipy.ndimage.gaussian_filter(noise, sigma, mode='reflect')` at 256).
  * `'coarse'` (default, faster, see docs/BENCHMARKS.md): white noise on a coarse grid with one
    node per `g = floor(sigma)` pixels, smoothed and upsampled in one step by a separable Gaussian
    basis (`field = B_row @ noise @ B_col^T`, applied as a K-tap polyphase filter). With nodes at
    most `sigma` apart the pointwise variance is stationary to ~1e-4, and the covariance is the
    same Gaussian of width `sigma * sqrt(2)` as Simard's.
"""

import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.extend.random  # threefry_2x32; `import jax` alone does not load jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np

Array = jax.Array

MODES = ('constant', 'nearest', 'wrap', 'mirror', 'reflect')
ELASTIC_METHODS = ('coarse', 'conv')
_TRUNCATE = 4.0  # Gaussian kernels are cut at 4 sigma, as in scipy.ndimage.gaussian_filter
# The coarse basis is cut at 3 sigma: the squared tail beyond it holds erfc(3) ~ 2e-5 of the
# variance, and 7 taps instead of 9 make the full-resolution pass ~20% cheaper.
_BASIS_TRUNCATE = 3.0


class AugmentParams(NamedTuple):
  """Explicit per-sample augmentation parameters (see `sample_params`).

  Attributes:
    matrix: (3, 3) sampling matrix, output (row, col, 1) -> input (row, col, 1).
    displacement: (2, H, W) elastic displacement in input pixels, or None.
    gamma: scalar gamma exponent, or None for no gamma change.
    contrast: scalar contrast factor about the image mean, or None.
    noise: (H, W, C) additive noise, or None.
  """
  matrix: Array
  displacement: Array | None = None
  gamma: Array | None = None
  contrast: Array | None = None
  noise: Array | None = None


# ------------------------------------------------------------------------------------------ affine


def affine_matrix(shape: Sequence[int], angle_deg: float | Array = 0.0,
                  scale: Sequence[float | Array] = (1.0, 1.0),
                  translation: Sequence[float | Array] = (0.0, 0.0),
                  flip: Sequence[bool | Array] = (False, False)) -> Array:
  """Sampling matrix of the forward transform `x -> c + t + R S F (x - c)`.

  Args:
    shape: (H, W) of the image; the centre is `((H - 1) / 2, (W - 1) / 2)`.
    angle_deg: counter-clockwise rotation of the content (as displayed), in degrees.
    scale: (row, col) zoom factors; above 1 enlarges the content.
    translation: (row, col) shift of the content in pixels.
    flip: (up-down, left-right) mirror flags, applied first.

  Returns:
    (3, 3) float32 matrix `A` with input = `A @ [row, col, 1]` (scipy affine_transform style).
  """
  angle = jnp.deg2rad(jnp.asarray(angle_deg, jnp.float32))
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  f_row = jnp.where(jnp.asarray(flip[0]), -1.0, 1.0)
  f_col = jnp.where(jnp.asarray(flip[1]), -1.0, 1.0)
  s_row = jnp.asarray(scale[0], jnp.float32)
  s_col = jnp.asarray(scale[1], jnp.float32)
  # Inverse of R S F is F S^-1 R^T; written out so identity parameters give an exact identity.
  lin = jnp.stack([
      jnp.stack([f_row * cos / s_row, f_row * sin / s_row]),
      jnp.stack([-f_col * sin / s_col, f_col * cos / s_col]),
  ]).astype(jnp.float32)
  centre = jnp.asarray([(shape[0] - 1) / 2.0, (shape[1] - 1) / 2.0], jnp.float32)
  shift = jnp.stack([jnp.asarray(translation[0], jnp.float32),
                     jnp.asarray(translation[1], jnp.float32)])
  offset = centre - lin @ (centre + shift)
  top = jnp.concatenate([lin, offset[:, None]], axis=1)
  return jnp.concatenate([top, jnp.asarray([[0.0, 0.0, 1.0]], jnp.float32)], axis=0)


def _coordinates(matrix: Array, shape: Sequence[int], displacement: Array | None = None,
                 ) -> tuple[Array, Array]:
  """(rows, cols) input coordinates as two arrays (see `build_grid`)."""
  h, w = int(shape[0]), int(shape[1])
  m = jnp.asarray(matrix, jnp.float32)
  rows = jnp.arange(h, dtype=jnp.float32)[:, None]
  cols = jnp.arange(w, dtype=jnp.float32)[None, :]
  # Kept as two arrays, never stacked: XLA:CPU fuses the coordinate maths into each gather of
  # map_coordinates, and a stacked (concatenated) grid made every gather ~2x slower.
  src_rows = m[0, 0] * rows + m[0, 1] * cols + m[0, 2]
  src_cols = m[1, 0] * rows + m[1, 1] * cols + m[1, 2]
  if displacement is not None:
    src_rows = src_rows + displacement[0].astype(jnp.float32)
    src_cols = src_cols + displacement[1].astype(jnp.float32)
  return src_rows, src_cols


def build_grid(matrix: Array, shape: Sequence[int], displacement: Array | None = None) -> Array:
  """Input coordinates sampled by every output pixel.

  Args:
    matrix: (3, 3) or (2, 3) sampling matrix (see `affine_matrix`).
    shape: (H, W) of the output.
    displacement: optional (2, H, W) elastic displacement added in input pixels.

  Returns:
    (2, H, W) float32 (row, col) coordinates for `map_coordinates`.
  """
  return jnp.stack(_coordinates(matrix, shape, displacement))


def warp(image: Array, mask: Array | None, grid: Array | tuple[Array, Array],
         mode: str = 'constant', cval: float = 0.0) -> tuple[Array, Array | None]:
  """Resamples one (H, W, C) image (linear) and its (H, W) mask (nearest) at `grid`.

  Args:
    image: (H, W, C) image.
    mask: (H, W) integer label map, or None.
    grid: (2, H', W') input coordinates from `build_grid`, or a (rows, cols) pair.
    mode: boundary mode of `jax.scipy.ndimage.map_coordinates` (JAX's 'constant' is SciPy's
      'grid-constant').
    cval: image fill value for `mode='constant'`; masks are always filled with 0 (background).

  Returns:
    The warped image (H', W', C) and mask (H', W'), in the input dtypes.
  """
  if mode not in MODES:
    raise ValueError(f'Unknown augment mode {mode!r}; choose one of {MODES}.')
  coords = (grid[0], grid[1])
  channels = [jax.scipy.ndimage.map_coordinates(image[..., i], coords, order=1, mode=mode,
                                                cval=cval)
              for i in range(image.shape[-1])]
  out_image = jnp.stack(channels, axis=-1).astype(image.dtype)
  out_mask = None
  if mask is not None:
    out_mask = jax.scipy.ndimage.map_coordinates(mask, coords, order=0, mode=mode, cval=0)
  return out_image, out_mask


# ----------------------------------------------------------------------------------------- elastic


def gaussian_kernel1d(sigma: float, truncate: float = _TRUNCATE) -> np.ndarray:
  """Normalized 1-D Gaussian taps, the same as `scipy.ndimage.gaussian_filter1d` uses."""
  radius = int(truncate * sigma + 0.5)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  kernel = np.exp(-0.5 * (x / sigma) ** 2)
  return kernel / kernel.sum()


def gaussian_smooth(x: Array, sigma: float, truncate: float = _TRUNCATE) -> Array:
  """Separable Gaussian filter over the last two axes, boundary 'reflect' (scipy's default).

  Args:
    x: (..., H, W) array.
    sigma: standard deviation in pixels (static).
    truncate: kernel radius in units of sigma.

  Returns:
    Array like `x`, equal to `scipy.ndimage.gaussian_filter(x, (0,..., sigma, sigma))`.
  """
  kernel = gaussian_kernel1d(sigma, truncate)
  radius = (kernel.size - 1) // 2
  h, w = x.shape[-2:]
  y = x.astype(jnp.float32)
  lead_pad = [(0, 0)] * (y.ndim - 2)
  # Shift-and-add beats lax.conv_general_dilated (~30x) and a banded matmul (~2x) on XLA:CPU
  # (bench/augment.py). numpy's 'symmetric' padding is scipy's 'reflect' boundary.
  y = jnp.pad(y, lead_pad + [(radius, radius), (0, 0)], mode='symmetric')
  y = sum(float(kernel[i]) * y[..., i:i + h, :] for i in range(kernel.size))
  y = jnp.pad(y, lead_pad + [(0, 0), (radius, radius)], mode='symmetric')
  return sum(float(kernel[i]) * y[..., :, i:i + w] for i in range(kernel.size))


@functools.lru_cache(maxsize=64)
def _polyphase_weights(sigma: float, truncate: float = _BASIS_TRUNCATE) -> np.ndarray:
  """(g, K) Gaussian weights from coarse nodes every `g <= sigma` pixels to each fine pixel.

  Fine pixel `p = g * i + phase` is `sum_k w[phase, k] * node[i + k]`, node `j` sitting at
  `(j - P) * g`, so every pixel sees all nodes within `truncate * sigma`. Spacing `g <= sigma`
  keeps the variance stationary: by Poisson summation the ripple is ~2 exp(-pi^2 sigma^2 / g^2)
  <= 1e-4. Rows are scaled to unit mean sum of squares (unit variance for unit-variance nodes).
  """
  g = max(1, int(sigma))
  p = int(math.ceil(truncate * sigma / g))
  d = np.arange(g)[:, None] + (p - np.arange(2 * p + 1)[None, :]) * g
  weights = np.exp(-0.5 * (d / sigma) ** 2)
  return weights / math.sqrt(np.mean(np.sum(weights ** 2, axis=1)))


def _random_words(key: Array, shape: Sequence[int]) -> Array:
  """Uniform uint32 words; from a threefry key, both halves of every 64-bit hash are used.

  `jax.random.bits` (partitionable threefry, JAX's default) spends one threefry hash on each
  32-bit word and XORs the hash's two output words together. `threefry_2x32` over a counter
  keeps both, so the same number of words costs half the hashing: 0.84 -> 0.48 ms for the 32
  node grids of a 128x128 batch (docs/BENCHMARKS.md). Other key types go through
  `jax.random.bits`.
  """
  shape = tuple(int(s) for s in shape)
  if str(jax.random.key_impl(key)) != 'threefry2x32':
    return jax.random.bits(key, shape, jnp.uint32)
  counter = jax.lax.iota(jnp.uint32, math.prod(shape))
  return jax.extend.random.threefry_2x32(jax.random.key_data(key), counter).reshape(shape)


def _uniform_node_pair(key: Array, shape: Sequence[int]) -> Array:
  """(2, *shape) zero-mean, unit-variance uniform node values, 16 random bits each.

  Unit-variance uniform nodes, as in Simard's recipe: each field pixel sums ~K^2 (49) weighted
  nodes, so the field is Gaussian to a good approximation and uniform draws are cheaper than
  normal ones. The two displacement components take the two 16-bit halves of one 32-bit draw:
  half the threefry work, ~45% less CPU time for the whole field (docs/BENCHMARKS.md), with the
  same mean, variance and covariance (65536 levels are as good as continuous here). The
  halves are split elementwise, without a reshape, so XLA can fuse the split into the filter.
  """
  words = _random_words(key, shape)
  scale = math.sqrt(12.0 / (65536 ** 2 - 1))  # 1 / std of a uniform on {0, ..., 65535}
  low = (words & np.uint32(0xFFFF)).astype(jnp.float32)
  high = (words >> np.uint32(16)).astype(jnp.float32)
  return (jnp.stack([low, high]) - 32767.5) * scale


def _upsample_axis(nodes: Array, weights: np.ndarray, size: int, axis: int) -> Array:
  """Gaussian-basis upsampling of `nodes` along `axis` to `size` pixels (polyphase)."""
  g, taps = weights.shape
  m = -(-size // g)
  shifted = [jax.lax.slice_in_dim(nodes, k, k + m, axis=axis) for k in range(taps)]
  # Each phase is a K-tap filter over the coarse nodes: K multiply-adds per fine pixel, where a
  # dense basis matmul would spend ~size / g (bench/augment.py has both).
  phases = [sum(float(weights[ph, k]) * shifted[k] for k in range(taps)) for ph in range(g)]
  out = jnp.stack(phases, axis=axis + 1)
  shape = list(nodes.shape)
  shape[axis] = m * g
  return jax.lax.slice_in_dim(out.reshape(shape), 0, size, axis=axis)


def elastic_std(alpha: float, sigma: float, size: float, reference_size: int) -> float:
  """Pointwise std (pixels, per axis) of the elastic displacement at image size `size`.

  Simard's field `alpha * gaussian_filter(U(-1, 1), sigma)` at `reference_size` has std
  `alpha / sqrt(3) * ||k||^2` (k the 1-D kernel); at other sizes it scales with the image.
  """
  if alpha <= 0 or sigma <= 0:
    return 0.0
  k = gaussian_kernel1d(sigma)
  return float(alpha / math.sqrt(3.0) * np.sum(k ** 2) * size / reference_size)


def elastic_field(key: Array, shape: Sequence[int], alpha: float, sigma: float,
                  method: str, reference_size: int) -> Array:
  """Random smooth displacement field (Simard et al. 2003), resolution-independent.

  Args:
    key: PRNG key.
    shape: (H, W) of the image.
    alpha: displacement scale, in pixels at `reference_size` (static).
    sigma: smoothing width, in pixels at `reference_size` (static).
    method: 'coarse' (Gaussian basis on a coarse grid) or 'conv' (full-resolution noise and a
      separable Gaussian); same statistics, see the module docstring.
    reference_size: image size at which alpha and sigma are given.

  Returns:
    (2, H, W) float32 (row, col) displacement in pixels.
  """
  h, w = int(shape[0]), int(shape[1])
  size = math.sqrt(h * w)  # == S for the square images the pipeline produces
  factor = size / reference_size
  sigma_px = sigma * factor
  std = elastic_std(alpha, sigma, size, reference_size)
  if method == 'conv':
    noise = jax.random.uniform(key, (2, h, w), jnp.float32, -1.0, 1.0)
    k = gaussian_kernel1d(sigma_px)
    alpha_px = std * math.sqrt(3.0) / np.sum(k ** 2)  # == alpha at reference_size
    return alpha_px * gaussian_smooth(noise, sigma_px)
  if method == 'coarse':
    weights = _polyphase_weights(sigma_px) * math.sqrt(std)  # row and column share the scale
    g, taps = weights.shape
    noise = _uniform_node_pair(key, (-(-h // g) + taps - 1, -(-w // g) + taps - 1))
    # Columns first (on the few coarse rows), rows last: the full-size pass then interleaves
    # whole rows, which XLA:CPU vectorizes; interleaving along the minor axis was ~2x slower.
    return _upsample_axis(_upsample_axis(noise, weights, w, 2), weights, h, 1)
  raise ValueError(f'Unknown elastic_method {method!r}; choose one of {ELASTIC_METHODS}.')


# --------------------------------------------------------------------------------------- intensity


def adjust_intensity(image: Array, gamma: Array | None = None, contrast: Array | None = None,
                     noise: Array | None = None) -> Array:
  """Gamma (on the image's own min-max range), contrast about the mean, additive noise.

  Args:
    image: (H, W, C) image.
    gamma: exponent applied to `(x - min) / (max - min)`, mapped back to [min, max].
    contrast: factor on `x - mean(x)`.
    noise: (H, W, C) array added last.

  Returns:
    The adjusted image, same dtype.
  """
  dtype = image.dtype
  x = image.astype(jnp.float32)
  if gamma is not None:
    lo, hi = jnp.min(x), jnp.max(x)
    span = hi - lo
    unit = jnp.clip((x - lo) / jnp.where(span > 0, span, 1.0), 0.0, 1.0)
    x = lo + span * unit ** gamma
  if contrast is not None:
    mean = jnp.mean(x)
    x = mean + contrast * (x - mean)
  if noise is not None:
    x = x + noise
  return x.astype(dtype)


# ------------------------------------------------------------------------------- config -> params


def _pair(value) -> tuple[float, float]:
  lo, hi = value
  return float(lo), float(hi)


def _check(config: ml_collections.ConfigDict) -> None:
  mode = config.mode
  if mode not in MODES:
    raise ValueError(f'Unknown augment mode {mode!r}; choose one of {MODES}.')
  method = config.elastic_method
  if method not in ELASTIC_METHODS:
    raise ValueError(f'Unknown elastic_method {method!r}; choose one of {ELASTIC_METHODS}.')


def _between(u: Array, lo: float, hi: float) -> Array:
  return lo + (hi - lo) * u


def sample_params(key: Array, shape: Sequence[int],
                  config: ml_collections.ConfigDict) -> AugmentParams:
  """Draws one sample's augmentation parameters.

  Args:
    key: PRNG key for this sample.
    shape: (H, W, C) of the image.
    config: the `config.augment` section (static).

  Returns:
    AugmentParams; disabled components are None (or an identity matrix).
  """
  _check(config)
  h, w, c = (int(s) for s in shape)
  key_scalars, key_elastic, key_noise = jax.random.split(key, 3)
  # All scalar draws come from one uniform vector: one PRNG call instead of ten keeps the
  # compiled graph (and compile time) small.
  u = jax.random.uniform(key_scalars, (10,), jnp.float32)
  matrix = jnp.eye(3, dtype=jnp.float32)
  if config.affine:
    rot = float(config.rotation_deg)
    angle = _between(u[0], -rot, rot)
    iso = _between(u[1], *_pair(config.scale))
    # sqrt split keeps the aspect factor symmetric between the axes (area set by `iso` alone).
    aspect = jnp.sqrt(_between(u[2], *_pair(config.aspect)))
    frac = float(config.translation_frac)
    shift = (_between(u[3], -frac, frac) * h, _between(u[4], -frac, frac) * w)
    flip_ud = (u[5] < 0.5) if config.flip_ud else False
    flip_lr = (u[6] < 0.5) if config.flip_lr else False
    matrix = affine_matrix((h, w), angle, (iso * aspect, iso / aspect), shift,
                           (flip_ud, flip_lr))
  displacement = None
  if _elastic_enabled(config):
    displacement = elastic_field(key_elastic, (h, w), float(config.elastic_alpha),
                                 float(config.elastic_sigma),
                                 config.elastic_method,
                                 int(config.reference_size))
    prob = float(config.elastic_prob)
    if prob < 1:
      displacement = displacement * (u[7] < prob).astype(jnp.float32)
  gamma = contrast = noise = None
  if config.intensity:
    g_lo, g_hi = _pair(config.gamma)
    if (g_lo, g_hi) != (1.0, 1.0):
      # Log-uniform, so (0.8, 1.25) brightens as often as it darkens.
      gamma = jnp.exp(_between(u[8], math.log(g_lo), math.log(g_hi)))
    c_lo, c_hi = _pair(config.contrast)
    if (c_lo, c_hi) != (1.0, 1.0):
      contrast = _between(u[9], c_lo, c_hi)
    noise_std = float(config.noise_std)
    if noise_std > 0:
      noise = noise_std * jax.random.normal(key_noise, (h, w, c), jnp.float32)
  return AugmentParams(matrix, displacement, gamma, contrast, noise)


def _elastic_enabled(config: ml_collections.ConfigDict) -> bool:
  return bool(config.elastic and float(config.elastic_alpha) > 0
              and float(config.elastic_sigma) > 0
              and float(config.elastic_prob) > 0)


def _spatial_enabled(config: ml_collections.ConfigDict) -> bool:
  return bool(config.affine) or _elastic_enabled(config)


def apply_params(params: AugmentParams, image: Array, mask: Array,
                 config: ml_collections.ConfigDict) -> tuple[Array, Array]:
  """Applies explicit parameters to one (H, W, C) image and its (H, W) mask."""
  if _spatial_enabled(config):
    coords = _coordinates(params.matrix, image.shape[:2], params.displacement)
    image, mask = warp(image, mask, coords, config.mode,
                       float(config.cval))
  if any(p is not None for p in (params.gamma, params.contrast, params.noise)):
    image = adjust_intensity(image, params.gamma, params.contrast, params.noise)
  return image, mask


def augment_sample(key: Array, image: Array, mask: Array,
                   config: ml_collections.ConfigDict) -> tuple[Array, Array]:
  """Augments one (H, W, C) image and its (H, W) mask; `augment` vmaps this."""
  if not config.enabled:
    return image, mask
  return apply_params(sample_params(key, image.shape, config), image, mask, config)


def augment(key: Array, images: Array, masks: Array,
            config: ml_collections.ConfigDict) -> tuple[Array, Array]:
  """Random affine + elastic (+ intensity) augmentation of a batch, one draw per sample.

  Args:
    key: PRNG key; sample i uses `jax.random.split(key, N)[i]`, so with threefry keys (JAX's
      default) the batch equals per-sample `augment_sample` calls (RBG keys' draws differ
      under vmap).
    images: (N, H, W, C) float images.
    masks: (N, H, W) integer label maps.
    config: the `config.augment` section, read at trace time.

  Returns:
    (images, masks) with the input shapes and dtypes; the inputs themselves if
    `config.enabled` is False.
  """
  if not config.enabled:
    return images, masks
  _check(config)
  keys = jax.random.split(key, images.shape[0])
  fn = functools.partial(augment_sample, config=config)
  return jax.vmap(fn)(keys, images, masks)
