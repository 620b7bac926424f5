"""3x3 convolution per layer: the C++ kernels against XLA:CPU's convolutions.

Forward, input gradient and kernel gradient of every 3x3 convolution of a depth-4 U-Net (both
convolutions of each encoder, bottleneck and decoder block: input channels c -> output
channels o at each level), with `models.conv_general_dilated(kernel='cpu')`
(lvseg_jax/csrc/conv3x3.cc) and `kernel='xla'` (XLA:CPU's Eigen convolutions under the
library's XLA flags), interleaved call by call. The first layer (1 input channel) has no
kernel path and is left out. Prints which path `kernel='auto'` takes for each layer.

  python bench/conv_kernels.py                    # widths 16 and 32, batch 8, 128x128, ~3 min
  python bench/conv_kernels.py --widths 16 --size 256 --calls 10
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--widths', default='16,32')
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--size', type=int, default=128)
  p.add_argument('--depth', type=int, default=4)
  p.add_argument('--calls', type=int, default=15, help='timed calls per variant and layer')
  p.add_argument('--json', default=None, help='write the medians (ms) here')
  return p.parse_args(argv)


def unet_layers(width: int, size: int, depth: int) -> list[tuple[int, int, int]]:
  """(spatial size, in channels, out channels) of a U-Net's 3x3 convolutions, first one out."""
  layers = []
  for level in range(depth + 1):
    features = width << level
    spatial = size >> level
    if level:
      layers.append((spatial, features // 2, features))       # encoder / bottleneck, conv 0
    layers.append((spatial, features, features))               # conv 1
    if level < depth:
      layers.append((spatial, 2 * features, features))         # decoder, conv 0 (after concat)
  return sorted(set(layers), key=lambda l: (-l[0], l[1], l[2]))


def main(argv=None):
  args = parse_args(argv)
  from lvseg_jax import runtime  # pylint: disable=g-import-not-at-top
  runtime.configure_process()
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lvseg_jax import cpu_kernels, models  # pylint: disable=g-import-not-at-top

  if not cpu_kernels.conv3x3_available():
    raise SystemExit('The C++ convolution kernels are not available (no AVX-512, disabled, or '
                     'not built: see the log).')

  def ops(kernel):
    conv = functools.partial(models.conv_general_dilated, window_strides=(1, 1),
                             padding='SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                             kernel=kernel)
    forward = jax.jit(lambda x, k: conv(x, k))
    grads = jax.jit(lambda x, k, dy: jax.vjp(lambda a, b: conv(a, b), x, k)[1](dy))
    input_grad = jax.jit(lambda x, k, dy: grads(x, k, dy)[0])
    kernel_grad = jax.jit(lambda x, k, dy: grads(x, k, dy)[1])
    return {'fwd': forward, 'dx': input_grad, 'dk': kernel_grad}

  variants = {'xla': ops('xla'), 'cpu': ops('cpu')}
  rng = np.random.default_rng(0)
  print(json.dumps({'jax': jax.__version__, 'cpu_count': os.cpu_count(),
                    'loadavg_start': os.getloadavg(), 'xla_flags': os.environ.get('XLA_FLAGS'),
                    'batch': args.batch, 'size': args.size}))
  print(f'{"layer":>22} {"auto":>5} ' + ' '.join(f'{op + " " + v:>9}' for op in ('fwd', 'dx', 'dk')
                                                  for v in ('xla', 'cpu')) + '   ms (median)')
  results = []
  for width in (int(w) for w in args.widths.split(',')):
    for spatial, cin, cout in unet_layers(width, args.size, args.depth):
      x = jnp.asarray(rng.normal(size=(args.batch, spatial, spatial, cin)), jnp.float32)
      k = jnp.asarray(rng.normal(size=(3, 3, cin, cout)) / np.sqrt(9 * cin), jnp.float32)
      dy = jnp.asarray(rng.normal(size=(args.batch, spatial, spatial, cout)), jnp.float32)
      auto = 'cpu' if models._conv3x3_kernel_applies(  # pylint: disable=protected-access
          x, k, ((1, 1), (1, 1)), 'auto') else 'xla'
      row = {'width': width, 'spatial': spatial, 'in': cin, 'out': cout, 'auto': auto}
      for op in ('fwd', 'dx', 'dk'):
        call_args = (x, k) if op == 'fwd' else (x, k, dy)
        times = {v: [] for v in variants}
        for v in variants:
          jax.block_until_ready(variants[v][op](*call_args))
        for _ in range(args.calls):
          for v in variants:
            start = time.perf_counter()
            jax.block_until_ready(variants[v][op](*call_args))
            times[v].append(time.perf_counter() - start)
        for v in variants:
          row[f'{op}_{v}'] = 1e3 * statistics.median(times[v])
      results.append(row)
      label = f'w{width} {spatial}^2 {cin}->{cout}'
      print(f'{label:>22} {auto:>5} ' + ' '.join(f'{row[f"{op}_{v}"]:9.2f}'
                                                  for op in ('fwd', 'dx', 'dk')
                                                  for v in ('xla', 'cpu')), flush=True)
  print(json.dumps({'loadavg_end': os.getloadavg()}))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
