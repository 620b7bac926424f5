"""Augmentation throughput: lvseg_jax.augment vs SciPy, elasticdeform and batchgenerators.

Usage (from the repository root):
  python bench/augment.py                      # 256 and 128, batch 32, 7 rounds, >= 0.4 s each
  python bench/augment.py --sizes=128 --rounds=3 --json=/tmp/augment.json

Every method does the same work per image: a random rotation (+-15 deg) and scale, an elastic
deformation with the default config's alpha/sigma (scaled with the image size), linear
interpolation of the image and nearest-neighbour interpolation of the mask. Methods are run
interleaved, round after round, so a shared, busy machine slows all of them alike. Each round
runs every method for at least `--inner` consecutive batches and at least `--min-round-s`
seconds: a window of about the same length for all. A window of 10 batches of the ~2 ms JAX
call (~25 ms) would fall inside the 40-60 ms in which this 2-vCPU machine's second core comes
back up to speed after the single-threaded baselines (docs/BENCHMARKS.md, runs I-P). The report
gives the median time per batch, the median of the per-round ratios and the time of each
round's first call on its own.
Baselines: `pip install -r requirements-bench.txt` (missing ones are reported and skipped).
"""

import argparse
import datetime
import functools
from importlib import metadata
import json
import math
import os
import platform
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy
import scipy.ndimage as ndi

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402
from configs import default  # noqa: E402
from lvseg_jax import augment  # noqa: E402


def _data(batch: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Smooth random images and disc masks, (B, S, S, 1) float32 and (B, S, S) int32."""
  rng = np.random.default_rng(seed)
  images = ndi.gaussian_filter(rng.normal(size=(batch, size, size)), (0, 3, 3))
  yy, xx = np.mgrid[:size, :size]
  masks = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 6) ** 2).astype(np.int32)
  return images[..., None].astype(np.float32), np.repeat(masks[None], batch, axis=0)


def _bench_config(method: str = 'coarse', **overrides):
  config = default.get_config().augment
  config.elastic_prob = 1.0  # every image gets the elastic part, like the baselines
  config.elastic_method = method
  for name, value in overrides.items():
    config[name] = value
  return config


# ----------------------------------------------------------------------------------- baselines


def scipy_recipe(images: np.ndarray, masks: np.ndarray, rng: np.random.Generator, config,
                 ) -> tuple[np.ndarray, np.ndarray]:
  """The classic per-image recipe: gaussian_filter noise + affine grid + map_coordinates."""
  _, h, w, _ = images.shape
  f = h / config.reference_size
  sigma = config.elastic_sigma * f
  k = augment.gaussian_kernel1d(sigma)
  alpha = augment.elastic_std(config.elastic_alpha, config.elastic_sigma, h, config.reference_size) * math.sqrt(3) / (
      np.sum(k ** 2))
  rows, cols = np.mgrid[:h, :w].astype(np.float64)
  c = np.array([(h - 1) / 2, (w - 1) / 2])
  out_images, out_masks = np.empty_like(images), np.empty_like(masks)
  for i in range(images.shape[0]):
    a = math.radians(rng.uniform(-config.rotation_deg, config.rotation_deg))
    s = rng.uniform(*config.scale)
    lin = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]]) / s
    dy = ndi.gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma) * alpha
    dx = ndi.gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma) * alpha
    coords = np.stack([lin[0, 0] * (rows - c[0]) + lin[0, 1] * (cols - c[1]) + c[0] + dy,
                       lin[1, 0] * (rows - c[0]) + lin[1, 1] * (cols - c[1]) + c[1] + dx])
    out_images[i, ..., 0] = ndi.map_coordinates(images[i, ..., 0], coords, order=1,
                                                mode='constant')
    out_masks[i] = ndi.map_coordinates(masks[i], coords, order=0, mode='constant')
  return out_images, out_masks


def elasticdeform_recipe(images, masks, rng, config, points: int, std: float):
  """elasticdeform.deform_random_grid per image (C code): B-spline grid + rotate + zoom."""
  import elasticdeform  # pylint: disable=g-import-not-at-top
  out_images, out_masks = np.empty_like(images), np.empty_like(masks)
  for i in range(images.shape[0]):
    image, mask = elasticdeform.deform_random_grid(
        [images[i, ..., 0], masks[i]], sigma=std, points=points, order=[1, 0],
        mode='constant', rotate=rng.uniform(-config.rotation_deg, config.rotation_deg),
        zoom=rng.uniform(*config.scale), prefilter=False)
    out_images[i, ..., 0], out_masks[i] = image, mask
  return out_images, out_masks


def batchgenerators_transform(size: int, config):
  """batchgenerators SpatialTransform with the same ranges (loops over samples internally)."""
  # pylint: disable-next=g-import-not-at-top
  from batchgenerators.transforms.spatial_transforms import SpatialTransform
  sigma = config.elastic_sigma * size / config.reference_size
  k = augment.gaussian_kernel1d(sigma)
  alpha = augment.elastic_std(config.elastic_alpha, config.elastic_sigma, size, config.reference_size) * math.sqrt(
      3) / np.sum(k ** 2)
  rot = math.radians(config.rotation_deg)
  transform = SpatialTransform(
      (size, size), patch_center_dist_from_border=size // 2, do_elastic_deform=True,
      alpha=(alpha, alpha), sigma=(sigma, sigma), do_rotation=True, angle_x=(-rot, rot),
      angle_y=(0, 0), angle_z=(0, 0), do_scale=True, scale=tuple(config.scale),
      border_mode_data='constant', order_data=1, border_mode_seg='constant', order_seg=0,
      random_crop=False)

  def run(images, masks, rng):
    del rng  # batchgenerators draws from numpy's global RNG
    out = transform(data=np.transpose(images, (0, 3, 1, 2)), seg=masks[:, None])
    return out['data'], out['seg']
  return run


# ---------------------------------------------------------------- elastic-field implementations


def _smooth_lax_conv(x: jax.Array, sigma: float) -> jax.Array:
  """Separable Gaussian with lax.conv_general_dilated (one of the measured alternatives)."""
  k = jnp.asarray(augment.gaussian_kernel1d(sigma), jnp.float32)
  r = (k.size - 1) // 2
  h, w = x.shape[-2:]
  y = jnp.pad(x.reshape(-1, 1, h, w), ((0, 0), (0, 0), (r, r), (r, r)), mode='symmetric')
  dn = ('NCHW', 'OIHW', 'NCHW')
  y = jax.lax.conv_general_dilated(y, k.reshape(1, 1, -1, 1), (1, 1), 'VALID',
                                   dimension_numbers=dn)
  y = jax.lax.conv_general_dilated(y, k.reshape(1, 1, 1, -1), (1, 1), 'VALID',
                                   dimension_numbers=dn)
  return y.reshape(x.shape)


def _smooth_banded_matmul(x: jax.Array, sigma: float) -> jax.Array:
  """Separable Gaussian as two dense (S, S) operator matmuls (reflect boundary built in)."""
  h, w = x.shape[-2:]
  bh = jnp.asarray(ndi.gaussian_filter1d(np.eye(h), sigma, axis=0), jnp.float32)
  bw = jnp.asarray(ndi.gaussian_filter1d(np.eye(w), sigma, axis=0), jnp.float32)
  return jnp.einsum('hi,...ij,wj->...hw', bh, x, bw)


def _field_fns(size: int, batch: int, config) -> dict[str, Callable]:
  sigma_px = config.elastic_sigma * size / config.reference_size

  def full_res(smooth):
    def fn(key):
      noise = jax.random.uniform(key, (batch, 2, size, size), jnp.float32, -1.0, 1.0)
      return smooth(noise, sigma_px)
    return jax.jit(fn)

  def library(method):
    field = functools.partial(augment.elastic_field, shape=(size, size),
                              alpha=config.elastic_alpha, sigma=config.elastic_sigma,
                              method=method)
    return jax.jit(lambda key: jax.vmap(field)(jax.random.split(key, batch)))

  def coarse_dense(key):
    # The coarse-grid field with the basis applied as two dense matmuls (the first version).
    weights = augment._polyphase_weights(sigma_px) * math.sqrt(  # pylint: disable=protected-access
        augment.elastic_std(config.elastic_alpha, config.elastic_sigma, size, config.reference_size))
    g, taps = weights.shape
    m = -(-size // g)
    basis = np.zeros((size, m + taps - 1), np.float32)
    for p in range(size):
      basis[p, p // g:p // g + taps] = weights[p % g]
    basis = jnp.asarray(basis)
    noise = jax.random.normal(key, (batch, 2, m + taps - 1, m + taps - 1), jnp.float32)
    return jnp.einsum('hi,bcij,wj->bchw', basis, noise, basis)

  return {'coarse grid, polyphase (coarse)': library('coarse'),
          'coarse grid, dense basis matmul': jax.jit(coarse_dense),
          'full-res separable, shift-add (conv)': library('conv'),
          'full-res separable, lax.conv': full_res(_smooth_lax_conv),
          'full-res separable, dense matmul': full_res(_smooth_banded_matmul)}


# ------------------------------------------------------------------------------------- harness

# Seconds every method runs per round at least (module docstring: equal windows).
MIN_ROUND_S = 0.4


def _interleaved(fns: dict[str, Callable[[], object]], rounds: int, inner: int,
                 first_calls: dict[str, list[float]] | None = None,
                 min_seconds: float = 0.0) -> dict[str, list[float]]:
  """Seconds per call of each fn, `rounds` rounds, fns interleaved within each round.

  Each round calls each fn at least `inner` times in a row, and until at least `min_seconds`
  have passed, and records the mean: sustained throughput over a window of about the same
  length for every method. If `first_calls` is given, it also gets each round's first call
  alone.
  """
  for fn in fns.values():  # warm up / compile
    fn()
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      t1 = time.perf_counter()
      calls = 1
      while calls < inner or time.perf_counter() - t0 < min_seconds:
        fn()
        calls += 1
      times[name].append((time.perf_counter() - t0) / calls)
      if first_calls is not None:
        first_calls.setdefault(name, []).append(t1 - t0)
  return times


def _jax_call(fn, *args):
  return lambda: jax.block_until_ready(fn(*args))


def _versions() -> dict[str, str]:
  out = {'python': platform.python_version()}
  for name in ('jax', 'jaxlib', 'numpy', 'scipy', 'elasticdeform', 'batchgenerators'):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = 'not installed'
  return out


def run(sizes: list[int], batch: int, rounds: int, inner: int = 10,
        min_seconds: float = MIN_ROUND_S) -> dict:
  results = {'date': datetime.date.today().isoformat(), 'cpu': common.cpu_info()[0],
             'cores': os.cpu_count(), 'devices': [str(d) for d in jax.devices()],
             'versions': _versions(), 'batch': batch, 'rounds': rounds, 'inner': inner,
             'min_round_s': min_seconds,
             'loadavg_before': os.getloadavg(), 'sizes': {}}
  config = _bench_config()
  for size in sizes:
    images, masks = _data(batch, size)
    j_images, j_masks = jnp.asarray(images), jnp.asarray(masks)
    key = jax.random.key(0)
    rng = np.random.default_rng(0)
    ours = {m: jax.jit(functools.partial(augment.augment, config=_bench_config(m)))
            for m in augment.ELASTIC_METHODS}
    fns = {'lvseg_jax (jit, coarse elastic)': _jax_call(ours['coarse'], key, j_images, j_masks),
           'lvseg_jax (jit, conv elastic)': _jax_call(ours['conv'], key, j_images, j_masks),
           'scipy per image': lambda: scipy_recipe(images, masks, rng, config)}
    sigma_px = config.elastic_sigma * size / config.reference_size
    std = augment.elastic_std(config.elastic_alpha, config.elastic_sigma, size, config.reference_size)
    # Control points 2 sigma apart: a cubic B-spline over them has about the Gaussian's width.
    points = max(3, int(round(size / (2 * sigma_px))))
    skipped = {}
    try:
      import elasticdeform  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
      fns['elasticdeform per image'] = lambda: elasticdeform_recipe(
          images, masks, rng, config, points, std)
    except Exception as e:  # pylint: disable=broad-except
      skipped['elasticdeform per image'] = repr(e)
    try:
      bg = batchgenerators_transform(size, config)
      fns['batchgenerators SpatialTransform'] = lambda: bg(images, masks, rng)
    except Exception as e:  # pylint: disable=broad-except
      skipped['batchgenerators SpatialTransform'] = repr(e)
    first = {}
    times = _interleaved(fns, rounds, inner=inner, first_calls=first,
                         min_seconds=min_seconds)
    ref = 'lvseg_jax (jit, coarse elastic)'
    table = {}
    for name, ts in times.items():
      med = float(np.median(ts))
      table[name] = {'ms_per_batch': 1e3 * med, 'images_per_s': batch / med,
                     'best_ms': 1e3 * min(ts),
                     # The round's first call, after the other methods ran: on this VM XLA's
                     # second worker thread has gone idle by then and is slow to wake.
                     'first_call_ms': 1e3 * float(np.median(first[name])),
                     # Ratio per round (same load), then the median over rounds.
                     'speedup_of_ours': float(np.median(np.asarray(ts) / np.asarray(times[ref]))),
                     # Best against best: the least disturbed run of each.
                     'speedup_of_ours_best': min(ts) / min(times[ref])}
    # Elastic-field alternatives and batching strategy, on their own.
    field_fns = {n: _jax_call(f, key) for n, f in _field_fns(size, batch, config).items()}
    field_times = _interleaved(field_fns, rounds, inner=3)
    sample = functools.partial(augment.augment_sample, config=config)
    mapped = jax.jit(lambda k, x, m: jax.lax.map(lambda a: sample(*a),
                                                 (jax.random.split(k, batch), x, m)))
    batching = _interleaved({'vmap (augment)': _jax_call(ours['coarse'], key, j_images, j_masks),
                             'lax.map over samples': _jax_call(mapped, key, j_images, j_masks)},
                            rounds, inner=3)
    results['sizes'][size] = {
        'methods': table, 'skipped': skipped, 'elasticdeform_points': points,
        'elastic_std_px': std, 'elastic_sigma_px': sigma_px,
        'elastic_field_ms_per_batch': {n: 1e3 * float(np.median(t))
                                       for n, t in field_times.items()},
        'batching_ms_per_batch': {n: 1e3 * float(np.median(t)) for n, t in batching.items()}}
  # The train step's call at the CPU config: 128x128, batch 8, default config (prob 0.5).
  images, masks = _data(8, 128)
  step = jax.jit(functools.partial(augment.augment, config=default.get_config().augment))
  t = _interleaved({'train': _jax_call(step, jax.random.key(0), jnp.asarray(images),
                                       jnp.asarray(masks))}, rounds, inner=10)['train']
  results['train_step_128_batch8_ms'] = 1e3 * float(np.median(t))
  results['loadavg_after'] = os.getloadavg()
  return results


def _print(results: dict) -> None:
  print(f"{results['date']}  {results['cpu']}  ({results['cores']} cores)  "
        f"devices={results['devices']}")
  print('versions:', ', '.join(f'{k} {v}' for k, v in results['versions'].items()))
  print(f"batch {results['batch']}, {results['rounds']} interleaved rounds of "
        f"{results.get('inner', 1)} consecutive batches per method (and at least "
        f"{results.get('min_round_s', 0.0):g} s), load average "
        f"before {results['loadavg_before'][0]:.1f} / after {results['loadavg_after'][0]:.1f}")
  for size, r in results['sizes'].items():
    print(f'\n{size}x{size}  (elastic std {r["elastic_std_px"]:.2f} px, sigma '
          f'{r["elastic_sigma_px"]:.1f} px; elasticdeform points={r["elasticdeform_points"]})')
    print(f'  {"method":36s} {"ms/batch":>9s} {"img/s":>7s} {"best ms":>8s} '
          f'{"ours x faster (median / best)":>30s} {"1st call ms":>12s}')
    for name, m in r['methods'].items():
      print(f'  {name:36s} {m["ms_per_batch"]:9.1f} {m["images_per_s"]:7.0f} '
            f'{m["best_ms"]:8.1f} {m["speedup_of_ours"]:19.2f} / {m["speedup_of_ours_best"]:<8.2f} '
            f'{m.get("first_call_ms", float("nan")):10.1f}')
    for name, why in r['skipped'].items():
      print(f'  {name:40s} skipped: {why}')
    print('  elastic field only (ms/batch):')
    for name, ms in r['elastic_field_ms_per_batch'].items():
      print(f'    {name:44s} {ms:8.1f}')
    print('  batching (ms/batch):')
    for name, ms in r['batching_ms_per_batch'].items():
      print(f'    {name:44s} {ms:8.1f}')
  print(f"\ntrain-step call at 128x128, batch 8, default config: "
        f"{results['train_step_128_batch8_ms']:.2f} ms")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default='256,128')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--inner', type=int, default=10,
                      help='consecutive batches per method and round: sustained throughput '
                           '(the first call of each round is also reported on its own)')
  parser.add_argument('--min-round-s', type=float, default=MIN_ROUND_S,
                      help='and at least this many seconds per method and round: the same '
                           'window for every method (0: exactly --inner batches)')
  parser.add_argument('--json', default='', help='also write the results here')
  args = parser.parse_args()
  results = run([int(s) for s in args.sizes.split(',')], args.batch, args.rounds,
                args.inner, args.min_round_s)
  _print(results)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  main()
