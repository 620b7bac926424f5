"""Augmentation against NumPy/SciPy oracles and analytic cases."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.ndimage as ndi

from configs import default
from lvseg_jax import augment

# JAX's boundary modes as SciPy implements them (JAX 'constant' is SciPy 'grid-constant').
SCIPY_MODE = {'constant': 'grid-constant', 'nearest': 'nearest', 'wrap': 'grid-wrap',
              'mirror': 'mirror', 'reflect': 'reflect'}


def _fast_key(seed: int) -> jax.Array:
  """RBG key: programs compile ~3x faster than with threefry, which keeps this file quick.

  Tests of key semantics (determinism, vmap == per-sample, sharding) use threefry, JAX's default
  and what the train step passes; RBG draws are not vmap-invariant.
  """
  return jax.random.key(seed, impl='rbg')


def _config(**overrides) -> ml_collections.ConfigDict:
  config = default.get_config().augment
  for name, value in overrides.items():
    config[name] = value
  return config


def _identity_config(**overrides) -> ml_collections.ConfigDict:
  base = dict(rotation_deg=0.0, scale=(1.0, 1.0), aspect=(1.0, 1.0), translation_frac=0.0,
              flip_lr=False, flip_ud=False, elastic=False, intensity=False)
  base.update(overrides)
  return _config(**base)


def _strong_config(**overrides) -> ml_collections.ConfigDict:
  base = dict(rotation_deg=30.0, scale=(0.8, 1.25), aspect=(0.8, 1.25), translation_frac=0.1,
              flip_lr=True, flip_ud=True, elastic=True, elastic_alpha=2000.0,
              elastic_sigma=16.0, elastic_prob=1.0)
  base.update(overrides)
  return _config(**base)


def _image(shape, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(0.0, 1.0, shape).astype(np.float32)


def _blobs(shape, labels=(0, 1, 2, 3), seed=0) -> np.ndarray:
  """Label map of smooth random regions (large connected areas per label)."""
  noise = ndi.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 4.0)
  edges = np.quantile(noise, np.linspace(0, 1, len(labels) + 1)[1:-1])
  return np.asarray(labels, np.int32)[np.digitize(noise, edges)]


@functools.lru_cache(maxsize=None)
def _jitted(config_items: tuple):
  config = ml_collections.ConfigDict(dict(config_items))
  return jax.jit(functools.partial(augment.augment, config=config))


def _run(key, images, masks, config):
  """Jitted augment; configs are cached by value so each compiles once."""
  items = tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v)
                       for k, v in config.to_dict().items()))
  return _jitted(items)(key, jnp.asarray(images), jnp.asarray(masks))


@functools.lru_cache(maxsize=None)
def _random_params(seed: int, shape: tuple[int, int]) -> augment.AugmentParams:
  """Strong-config parameters, jitted once per shape (eager dispatch is slow)."""
  config = _strong_config()
  return jax.jit(lambda key: augment.sample_params(key, shape + (1,), config))(
      _fast_key(seed))


def _numpy_grid(matrix, displacement, shape) -> np.ndarray:
  """Independent float64 grid: matrix @ [row, col, 1] + displacement."""
  rows, cols = np.mgrid[:shape[0], :shape[1]].astype(np.float64)
  homogeneous = np.stack([rows, cols, np.ones_like(rows)])
  grid = np.einsum('ij,jhw->ihw', np.asarray(matrix, np.float64)[:2], homogeneous)
  return grid if displacement is None else grid + np.asarray(displacement, np.float64)


# ------------------------------------------------------------------------------- exact identities


@pytest.mark.parametrize('mode', augment.MODES)
def test_identity_grid_returns_input_exactly(mode):
  image, mask = _image((31, 40, 2)), _blobs((31, 40))
  matrix = augment.affine_matrix((31, 40))
  np.testing.assert_array_equal(np.asarray(matrix), np.eye(3, dtype=np.float32))
  out_image, out_mask = augment.warp(jnp.asarray(image), jnp.asarray(mask),
                                     augment.build_grid(matrix, (31, 40)), mode)
  np.testing.assert_array_equal(np.asarray(out_image), image)
  np.testing.assert_array_equal(np.asarray(out_mask), mask)


def test_identity_config_returns_input_exactly():
  images, masks = _image((4, 32, 32, 1)), _blobs((4, 32, 32))
  out_images, out_masks = _run(_fast_key(0), images, masks, _identity_config())
  np.testing.assert_array_equal(np.asarray(out_images), images)
  np.testing.assert_array_equal(np.asarray(out_masks), masks)


def test_disabled_returns_inputs_unchanged():
  images, masks = jnp.asarray(_image((2, 16, 16, 1))), jnp.asarray(_blobs((2, 16, 16)))
  out_images, out_masks = augment.augment(jax.random.key(0), images, masks,
                                          _strong_config(enabled=False, intensity=True))
  assert out_images is images and out_masks is masks


# ------------------------------------------------------------------------------- analytic affines


@pytest.mark.parametrize('shift', [(3, -5), (-7, 2)])
def test_integer_translation_is_roll(shift):
  image, mask = _image((32, 40, 1)), _blobs((32, 40))
  grid = augment.build_grid(augment.affine_matrix((32, 40), translation=shift), (32, 40))
  out_image, out_mask = augment.warp(jnp.asarray(image), jnp.asarray(mask), grid)
  interior = (slice(8, -8), slice(8, -8))
  np.testing.assert_array_equal(np.asarray(out_image)[interior],
                                np.roll(image, shift, axis=(0, 1))[interior])
  np.testing.assert_array_equal(np.asarray(out_mask)[interior],
                                np.roll(mask, shift, axis=(0, 1))[interior])


@pytest.mark.parametrize('size', [32, 33])
@pytest.mark.parametrize('angle,k', [(90.0, 1), (180.0, 2), (-90.0, 3)])
def test_right_angle_rotation_is_rot90(size, angle, k):
  image, mask = _image((size, size, 1)), _blobs((size, size))
  grid = augment.build_grid(augment.affine_matrix((size, size), angle_deg=angle), (size, size))
  out_image, out_mask = augment.warp(jnp.asarray(image), jnp.asarray(mask), grid)
  interior = (slice(1, -1), slice(1, -1))
  # float32 cos(90 deg) is ~4e-8, so coordinates are off by ~1e-5 px at most.
  np.testing.assert_allclose(np.asarray(out_image)[interior],
                             np.rot90(image, k)[interior], atol=1e-4)
  np.testing.assert_array_equal(np.asarray(out_mask)[interior], np.rot90(mask, k)[interior])


def test_scale_moves_a_point_away_from_the_centre():
  image = np.zeros((41, 41, 1), np.float32)
  image[26, 16] = 1.0  # centre (20, 20) + (6, -4)
  grid = augment.build_grid(augment.affine_matrix((41, 41), scale=(2.0, 1.5)), (41, 41))
  out, _ = augment.warp(jnp.asarray(image), None, grid)
  # Forward map c + S (x - c): (6, -4) -> (12, -6).
  assert np.unravel_index(np.argmax(np.asarray(out)[..., 0]), (41, 41)) == (32, 14)
  assert float(out[32, 14, 0]) == 1.0


def _numpy_sampling_matrix(shape, angle_deg, scale, translation, flip):
  """Independent float64 construction: inverse of T(c + t) R S F T(-c)."""
  c = np.array([(shape[0] - 1) / 2, (shape[1] - 1) / 2])

  def shift(v):
    m = np.eye(3)
    m[:2, 2] = v
    return m

  a = math.radians(angle_deg)
  rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
  forward = (shift(c + np.asarray(translation)) @ rot @ np.diag([scale[0], scale[1], 1.0])
             @ np.diag([-1.0 if flip[0] else 1.0, -1.0 if flip[1] else 1.0, 1.0]) @ shift(-c))
  return np.linalg.inv(forward)


@pytest.mark.parametrize('angle,scale,translation,flip', [
    (17.0, (1.1, 0.9), (2.5, -3.25), (False, True)),
    (-33.0, (0.8, 1.3), (-4.0, 1.5), (True, False)),
    (120.0, (1.0, 1.0), (0.0, 0.0), (True, True)),
])
def test_affine_matrix_matches_numpy_composition(angle, scale, translation, flip):
  got = augment.affine_matrix((30, 44), angle, scale, translation, flip)
  want = _numpy_sampling_matrix((30, 44), angle, scale, translation, flip)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


def test_affine_warp_matches_scipy_affine_transform():
  image, mask = _image((30, 44, 1)), _blobs((30, 44))
  matrix = _numpy_sampling_matrix((30, 44), 23.0, (1.2, 0.85), (1.5, -2.0), (False, True))
  out, _ = augment.warp(jnp.asarray(image), jnp.asarray(mask),
                        augment.build_grid(jnp.asarray(matrix, jnp.float32), (30, 44)))
  want = ndi.affine_transform(image[..., 0].astype(np.float64), matrix, order=1,
                              mode='grid-constant')
  np.testing.assert_allclose(np.asarray(out)[..., 0], want, atol=1e-5)


# ------------------------------------------------------------------ random grids vs SciPy oracle


def test_build_grid_matches_numpy():
  shape = (48, 56)
  params = _random_params(3, shape)
  grid = augment.build_grid(params.matrix, shape, params.displacement)
  np.testing.assert_allclose(np.asarray(grid),
                             _numpy_grid(params.matrix, params.displacement, shape), atol=1e-4)


@pytest.mark.parametrize('mode', augment.MODES)
def test_random_grid_matches_scipy_map_coordinates(mode):
  shape = (48, 56)
  image, mask = _image(shape + (1,), seed=1), _blobs(shape, seed=1)
  params = _random_params(3, shape)
  assert np.abs(np.asarray(params.displacement)).max() > 2.0  # the elastic part bends the grid
  out_image, out_mask = augment.apply_params(params, jnp.asarray(image), jnp.asarray(mask),
                                             _strong_config(mode=mode))
  grid = _numpy_grid(params.matrix, params.displacement, shape)
  inside = ((grid[0] >= 0) & (grid[0] <= shape[0] - 1) & (grid[1] >= 0)
            & (grid[1] <= shape[1] - 1))
  assert 0.3 < inside.mean() < 1.0
  want = ndi.map_coordinates(image[..., 0].astype(np.float64), grid, order=1,
                             mode=SCIPY_MODE[mode])
  # float32 coordinates are off by <~1e-5 px, so values agree to ~1e-5 (float32 precision).
  np.testing.assert_allclose(np.asarray(out_image)[..., 0][inside], want[inside], atol=3e-5)
  # Nearest neighbour: compare where rounding is unambiguous (the float32 grid may fall on the
  # other side of a .5 tie).
  frac = np.abs(grid - np.floor(grid) - 0.5)
  clear = inside & (frac.min(axis=0) > 1e-3)
  want_mask = ndi.map_coordinates(mask, grid, order=0, mode=SCIPY_MODE[mode])
  np.testing.assert_array_equal(np.asarray(out_mask)[clear], want_mask[clear])


def test_masks_only_contain_input_labels():
  shape = (48, 56)
  params = _random_params(3, shape)
  grid = augment.build_grid(params.matrix, shape, params.displacement)
  image = jnp.asarray(_image(shape + (1,)))
  for labels, dtype in [((0, 1), np.int32), ((0, 2, 5, 9), np.int32), ((0, 1, 3), np.uint8)]:
    mask = _blobs(shape, labels).astype(dtype)
    for mode in augment.MODES:
      _, out = augment.warp(image, jnp.asarray(mask), grid, mode)
      out = np.asarray(out)
      assert out.dtype == dtype and out.shape == mask.shape
      assert set(np.unique(out)) <= set(labels), (labels, mode)
      assert not np.array_equal(out, mask)


def test_image_and_mask_move_together():
  """Warp a labelled pattern: every label keeps its intensity after augmentation."""
  intensity = np.array([0.0, 1.0, 10.0, 100.0], np.float32)
  masks = np.stack([_blobs((64, 64), seed=s) for s in range(8)])
  images = intensity[masks][..., None]
  config = _strong_config(mode='nearest')
  out_images, out_masks = _run(_fast_key(11), images, masks, config)
  out_images, out_masks = np.asarray(out_images)[..., 0], np.asarray(out_masks)

  def check(img, msk):
    # Bilinear weight of the nearest corner (whose label the mask takes) is at least 1/4.
    lower_bound_ok = np.all(img >= 0.25 * intensity[msk] - 1e-4)
    exact = np.isclose(img, intensity[msk], atol=1e-4)
    per_label = [np.median(img[msk == label]) for label in range(4)]
    return lower_bound_ok, exact.mean(), per_label

  ok, exact_fraction, per_label = check(out_images, out_masks)
  assert ok
  assert exact_fraction > 0.6
  np.testing.assert_allclose(per_label, intensity, atol=1e-4)
  # Control: masks from another key must fail the same check (the test can fail).
  _, other_masks = _run(_fast_key(12), images, masks, config)
  ok, exact_fraction, _ = check(out_images, np.asarray(other_masks))
  assert not ok and exact_fraction < 0.6


# -------------------------------------------------------------------- batching and determinism


def _batch(n=8, size=40):
  images = np.stack([_image((size, size, 1), seed=s) for s in range(n)])
  masks = np.stack([_blobs((size, size), seed=s) for s in range(n)])
  return images, masks


def test_vmapped_batch_equals_per_sample_calls():
  images, masks = _batch()
  config = _strong_config(intensity=True)
  key = jax.random.key(7)
  out_images, out_masks = _run(key, images, masks, config)
  sample = jax.jit(functools.partial(augment.augment_sample, config=config))
  for i, k in enumerate(jax.random.split(key, 8)):
    image, mask = sample(k, jnp.asarray(images[i]), jnp.asarray(masks[i]))
    np.testing.assert_allclose(np.asarray(out_images[i]), np.asarray(image), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out_masks[i]), np.asarray(mask))


def test_same_key_same_output_different_key_different_output():
  images, masks = _batch()
  config = _strong_config(intensity=True)
  a = _run(jax.random.key(1), images, masks, config)
  b = _run(jax.random.key(1), images, masks, config)
  c = _run(jax.random.key(2), images, masks, config)
  for x, y, z in zip(a, b, c):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(x), np.asarray(z))
  # Samples within a batch get their own draws (same input, different output).
  same, _ = _run(jax.random.key(1), np.repeat(images[:1], 8, 0), np.repeat(masks[:1], 8, 0),
                 config)
  assert not np.array_equal(np.asarray(same[0]), np.asarray(same[1]))


def test_batch_sharded_over_devices_matches_and_needs_no_communication():
  """The train step shards the batch over a mesh: augmentation must stay per device."""
  devices = np.array(jax.devices())
  mesh = jax.sharding.Mesh(devices, ('batch',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('batch'))
  # 8 samples (shared compile with the tests above) whenever they divide over the devices.
  images, masks = _batch(8 if 8 % devices.size == 0 else devices.size)
  config = _strong_config(intensity=True)
  want = _run(jax.random.key(9), images, masks, config)
  fn = jax.jit(functools.partial(augment.augment, config=config))
  args = (jax.random.key(9), jax.device_put(images, sharding), jax.device_put(masks, sharding))
  got = fn(*args)
  np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
  hlo = fn.lower(*args).compile().as_text()
  assert not any(op in hlo for op in ('all-gather', 'all-reduce', 'all-to-all',
                                      'collective-permute'))


# ------------------------------------------------------------------------- component switches


def test_flips_only_give_exact_flips():
  image = _image((32, 36, 1))
  images = np.repeat(image[None], 16, axis=0)
  masks = np.repeat(_blobs((32, 36))[None], 16, axis=0)
  out, out_masks = _run(_fast_key(4), images, masks,
                        _identity_config(flip_lr=True, flip_ud=True))
  candidates = {(ud, lr): image[::(-1 if ud else 1), ::(-1 if lr else 1)]
                for ud in (False, True) for lr in (False, True)}
  seen = set()
  for i in range(16):
    match = [k for k, v in candidates.items() if np.array_equal(np.asarray(out[i]), v)]
    assert len(match) == 1
    seen.add(match[0])
    ud, lr = match[0]
    np.testing.assert_array_equal(np.asarray(out_masks[i]),
                                  masks[i][::(-1 if ud else 1), ::(-1 if lr else 1)])
  assert seen == set(candidates)


def test_elastic_prob_leaves_some_samples_untouched():
  images = np.repeat(_image((32, 32, 1))[None], 16, axis=0)
  masks = np.repeat(_blobs((32, 32))[None], 16, axis=0)
  out, _ = _run(_fast_key(8), images, masks,
                _identity_config(elastic=True, elastic_prob=0.5, elastic_alpha=2000.0,
                                 elastic_sigma=16.0))
  same = [np.array_equal(np.asarray(out[i]), images[i]) for i in range(16)]
  assert 0 < sum(same) < 16


def test_unknown_mode_or_method_raises():
  images, masks = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1, 8, 8), jnp.int32)
  with pytest.raises(ValueError, match='mode'):
    augment.augment(jax.random.key(0), images, masks, _config(mode='grid-constant'))
  with pytest.raises(ValueError, match='elastic_method'):
    augment.augment(jax.random.key(0), images, masks, _config(elastic_method='bspline'))


# ---------------------------------------------------------------------------------- elastic field


@pytest.mark.parametrize('sigma', [1.5, 4.0])
def test_gaussian_smooth_matches_scipy(sigma):
  x = np.random.default_rng(0).normal(size=(2, 37, 50)).astype(np.float32)
  got = augment.gaussian_smooth(jnp.asarray(x), sigma)
  np.testing.assert_allclose(np.asarray(got), ndi.gaussian_filter(x, (0, sigma, sigma)),
                             atol=1e-6)


def test_elastic_std_matches_simard_recipe_and_scales_with_size():
  # Simard's field at the reference size, drawn by SciPy: alpha * gaussian_filter(U(-1, 1), s).
  rng = np.random.default_rng(0)
  alpha, sigma, ref = 60.0, 8.0, 128
  fields = [alpha * ndi.gaussian_filter(rng.uniform(-1, 1, (ref, ref)), sigma) for _ in range(8)]
  empirical = np.std([f[32:-32, 32:-32] for f in fields])
  assert augment.elastic_std(alpha, sigma, ref, ref) == pytest.approx(empirical, rel=0.06)
  assert augment.elastic_std(alpha, sigma, ref / 2, ref) == pytest.approx(
      augment.elastic_std(alpha, sigma, ref, ref) / 2)


def _threefry2x32_numpy(key: tuple[int, int], x0: np.ndarray, x1: np.ndarray):
  """Threefry-2x32, 20 rounds (Salmon et al. 2011, Random123), written out in NumPy."""
  rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
  ks = (np.uint32(key[0]), np.uint32(key[1]),
        np.uint32(key[0]) ^ np.uint32(key[1]) ^ np.uint32(0x1BD11BDA))
  x0 = x0.astype(np.uint32) + ks[0]
  x1 = x1.astype(np.uint32) + ks[1]
  for block in range(5):
    for r in rotations[block % 2]:
      x0 = x0 + x1
      x1 = ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))) ^ x0
    x0 = x0 + ks[(block + 1) % 3]
    x1 = x1 + ks[(block + 2) % 3] + np.uint32(block + 1)
  return x0, x1


def test_random_words_keep_both_threefry_outputs():
  """Threefry keys: word i and word i + n/2 are the two outputs of one hash of (i, i + n/2)."""
  # Known-answer vector of the Threefry paper (also in JAX's own tests) checks the oracle.
  y0, y1 = _threefry2x32_numpy((0x13198A2E, 0x03707344), np.array([0x243F6A88], np.uint32),
                               np.array([0x85A308D3], np.uint32))
  assert (int(y0[0]), int(y1[0])) == (0xC4923A9C, 0x483DF7A0)
  key = jax.random.key(7)
  k0, k1 = (int(v) for v in np.asarray(jax.random.key_data(key)))
  words = np.asarray(augment._random_words(key, (6, 10)))
  count = np.arange(60, dtype=np.uint32)
  y0, y1 = _threefry2x32_numpy((k0, k1), count[:30], count[30:])
  np.testing.assert_array_equal(words.ravel(), np.concatenate([y0, y1]))
  # A raw uint32[2] key (jax.random.PRNGKey) is the same threefry key.
  np.testing.assert_array_equal(
      np.asarray(augment._random_words(jax.random.key_data(key), (6, 10))), words)


@pytest.mark.parametrize('impl', ['threefry2x32', 'rbg'])
def test_coarse_nodes_are_independent_unit_uniforms(impl):
  """The 16-bit node pair: zero mean, unit variance, uniform on [-sqrt 3, sqrt 3], uncorrelated."""
  nodes = np.asarray(augment._uniform_node_pair(jax.random.key(0, impl=impl), (512, 512)),
                     np.float64)
  assert nodes.shape == (2, 512, 512)
  limit = math.sqrt(3.0)
  assert np.mean(nodes) == pytest.approx(0.0, abs=0.01)
  assert np.var(nodes) == pytest.approx(1.0, rel=0.01)
  assert -limit <= nodes.min() < -limit + 1e-3 and limit - 1e-3 < nodes.max() <= limit
  # Uniform: each tenth of the range holds a tenth of the values.
  counts, _ = np.histogram(nodes, bins=10, range=(-limit, limit))
  np.testing.assert_allclose(counts / nodes.size, 0.1, atol=0.003)
  # The two components (two halves of one random word) and neighbouring nodes are uncorrelated.
  for a, b in [(nodes[0], nodes[1]), (nodes[0, :, 1:], nodes[0, :, :-1]),
               (nodes[1, 1:], nodes[1, :-1])]:
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.01


@pytest.mark.parametrize('method,size', [('coarse', 64), ('coarse', 32), ('conv', 64)])
def test_elastic_field_statistics(method, size):
  """Both methods give Simard's std and Gaussian covariance, scaled with the image size."""
  alpha, sigma, ref = 30.0, 2.0, 64
  sigma_px = sigma * size / ref
  fields = jax.jit(jax.vmap(functools.partial(
      augment.elastic_field, shape=(size, size), alpha=alpha, sigma=sigma, method=method,
      reference_size=ref)))(jax.random.split(_fast_key(0), 128))
  fields = np.asarray(fields)
  assert fields.shape == (128, 2, size, size)
  border = int(4 * sigma_px)  # 'conv' reflects at the border, which raises the std there
  inner = fields[..., border:-border, border:-border]
  std = augment.elastic_std(alpha, sigma, size, ref)
  assert np.std(inner) == pytest.approx(std, rel=0.06)
  assert np.mean(inner) == pytest.approx(0.0, abs=0.08 * std)
  # Smoothed white noise has covariance exp(-d^2 / (4 sigma^2)).
  lag = int(sigma_px)
  corr = np.mean(inner[..., lag:] * inner[..., :-lag]) / np.mean(inner ** 2)
  assert corr == pytest.approx(math.exp(-lag ** 2 / (4 * sigma_px ** 2)), abs=0.03)


# ------------------------------------------------------------------------------------- intensity


def test_adjust_intensity_matches_numpy():
  image = _image((20, 24, 1)) * 3.0 - 1.0
  noise = np.random.default_rng(1).normal(0, 0.1, image.shape).astype(np.float32)
  got = augment.adjust_intensity(jnp.asarray(image), jnp.float32(1.3), jnp.float32(0.9),
                                 jnp.asarray(noise))
  lo, hi = image.min(), image.max()
  want = lo + (hi - lo) * ((image - lo) / (hi - lo)) ** 1.3
  want = want.mean() + 0.9 * (want - want.mean()) + noise
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_intensity_noise_has_configured_std():
  images = np.zeros((8, 32, 32, 1), np.float32)
  masks = np.zeros((8, 32, 32), np.int32)
  out, out_masks = _run(_fast_key(0), images, masks,
                        _identity_config(intensity=True, gamma=(1.0, 1.0),
                                         contrast=(1.0, 1.0), noise_std=0.05))
  assert np.std(np.asarray(out)) == pytest.approx(0.05, rel=0.05)
  np.testing.assert_array_equal(np.asarray(out_masks), masks)
