"""Per-call time of the jitted augmentation right after single-threaded work.

Usage (from the repository root):
  python bench/augment_warmup.py                 # after 1 and after 10 SciPy batches

On the 2-vCPU benchmark machine the ~2 ms JAX call runs about 2x slower for ~60 ms after the
process has spent a few hundred ms on one core (the single-threaded baselines of
`bench/augment.py`), then returns to its steady time. This script shows that transient: each
round runs `--before` SciPy batches (the classic per-image recipe, one core), then `--calls`
augmentation calls timed one by one; the median over rounds is printed per range of calls.
"""

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import augment as bench_augment  # noqa: E402
from lvseg_jax import augment  # noqa: E402
from lvseg_jax import runtime  # noqa: E402

RANGES = ((0, 1), (1, 5), (5, 10), (10, 20), (20, 30), (30, 50), (50, 100), (100, 150))


def per_call_ms(before: int, calls: int, rounds: int, size: int, batch: int) -> np.ndarray:
  """(rounds, calls) milliseconds of each augmentation call after `before` SciPy batches."""
  images, masks = bench_augment._data(batch, size)  # pylint: disable=protected-access
  config = bench_augment._bench_config()  # pylint: disable=protected-access
  device_images, device_masks = jax.device_put(images), jax.device_put(masks)
  key = jax.random.key(0)
  fn = jax.jit(lambda k, x, m: augment.augment(k, x, m, config))
  jax.block_until_ready(fn(key, device_images, device_masks))
  rng = np.random.default_rng(0)
  out = np.zeros((rounds, calls))
  for r in range(rounds):
    for _ in range(before):
      bench_augment.scipy_recipe(images, masks, rng, config)
    for i in range(calls):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(key, device_images, device_masks))
      out[r, i] = 1e3 * (time.perf_counter() - t0)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--before', default='1,10', help='SciPy batches before each round')
  parser.add_argument('--calls', type=int, default=150)
  parser.add_argument('--rounds', type=int, default=8)
  parser.add_argument('--size', type=int, default=128)
  parser.add_argument('--batch', type=int, default=32)
  args = parser.parse_args()
  runtime.configure_process()
  print(f'{args.size}x{args.size}, batch {args.batch}, {args.rounds} rounds, '
        f'load average {os.getloadavg()[0]:.1f}; median ms per call over rounds')
  befores = [int(b) for b in args.before.split(',')]
  results = {b: per_call_ms(b, args.calls, args.rounds, args.size, args.batch) for b in befores}
  print('calls     ' + ''.join(f'  after {b:2d} SciPy' for b in befores))
  for lo, hi in RANGES:
    if lo >= args.calls:
      break
    print(f'{lo:3d}-{min(hi, args.calls):3d}   ' +
          ''.join(f'{np.median(results[b][:, lo:hi]):15.2f}' for b in befores))
  print('mean of the first 10 calls: ' +
        ', '.join(f'{np.median(results[b][:, :10].mean(1)):.2f} ms (after {b})' for b in befores))


if __name__ == '__main__':
  main()
