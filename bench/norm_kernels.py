"""Normalization + ReLU per layer: the C++ kernels against the XLA formulas and PyTorch.

Forward and backward (input and affine gradients) of a norm layer with `relu=True` at every
level of a depth-4 U-Net, with `kernel='cpu'` (lvseg_jax/csrc/norm_relu.cc) and `kernel='xla'`
(norms._normalize + ReLU), interleaved call by call; then the PyTorch layer + ReLU of
bench/torch_unet.py (`BatchNorm2d`, `InstanceNorm2d`, `GroupNorm(1, C)` for LayerNorm) on the
same shapes, in a block of its own so that its OpenMP threads, which spin after each call, do
not slow the JAX calls (docs/BENCHMARKS.md, "Interleaving and OpenMP spinning").

  python bench/norm_kernels.py                  # LayerNorm, width 16, batch 8, 128x128, ~1 min
  python bench/norm_kernels.py --norm batch --width 32 --no-torch
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
  p.add_argument('--norm', choices=('layer', 'batch', 'instance'), default='layer')
  p.add_argument('--width', type=int, default=16)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--size', type=int, default=128)
  p.add_argument('--depth', type=int, default=4)
  p.add_argument('--calls', type=int, default=30, help='timed calls per variant and shape')
  p.add_argument('--no-torch', action='store_true')
  p.add_argument('--json', default=None, help='write the medians (ms) here')
  return p.parse_args(argv)


def _median_ms(times):
  return 1e3 * statistics.median(times)


def main(argv=None):
  args = parse_args(argv)
  from lvseg_jax import runtime  # pylint: disable=g-import-not-at-top
  runtime.configure_process()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lvseg_jax import cpu_kernels, norms  # pylint: disable=g-import-not-at-top

  if not cpu_kernels.available():
    raise SystemExit('The C++ kernels are not available (see the warning above).')
  make_layer = {
      'layer': norms.LayerNorm,
      'instance': norms.InstanceNorm,
      'batch': lambda **kw: norms.BatchNorm(use_running_average=False, **kw),
  }[args.norm]
  rng = np.random.default_rng(0)
  shapes = [(args.batch, args.size >> level, args.size >> level, args.width << level)
            for level in range(args.depth + 1)]
  results = []
  for shape in shapes:
    x = rng.normal(0.5, 2.0, shape).astype(np.float32)
    upstream = rng.normal(size=shape).astype(np.float32)
    scale = (1 + 0.1 * rng.normal(size=shape[-1])).astype(np.float32)
    bias = (0.1 * rng.normal(size=shape[-1])).astype(np.float32)
    params = {'scale': jnp.asarray(scale), 'bias': jnp.asarray(bias)}
    xj, uj = jnp.asarray(x), jnp.asarray(upstream)
    calls = {}
    for kernel in ('xla', 'cpu'):
      layer = make_layer(relu=True, kernel=kernel)
      state = {k: v for k, v in layer.init(jax.random.key(0), xj).items() if k != 'params'}

      def apply(p, x, layer=layer, state=state):
        return layer.apply({**state, 'params': p}, x, mutable=['batch_stats'])[0]

      fwd = jax.jit(apply)
      grad = jax.jit(jax.grad(lambda p, x, apply=apply: jnp.vdot(apply(p, x), uj),
                              argnums=(0, 1)))
      calls[f'{kernel} fwd'] = lambda fwd=fwd: fwd(params, xj)
      calls[f'{kernel} fwd+bwd'] = lambda grad=grad: grad(params, xj)
    for call in calls.values():
      jax.block_until_ready(call())
    times = {name: [] for name in calls}
    for i in range(args.calls):
      for name in (list(calls) if i % 2 == 0 else list(calls)[::-1]):
        t0 = time.perf_counter()
        jax.block_until_ready(calls[name]())
        times[name].append(time.perf_counter() - t0)
    row = {'shape': list(shape), **{name: _median_ms(t) for name, t in times.items()}}
    results.append(row)
  if not args.no_torch:
    import torch  # pylint: disable=g-import-not-at-top
    for row in results:
      n, h, w, c = row['shape']
      xt = torch.from_numpy(rng.normal(0.5, 2.0, (n, c, h, w)).astype(np.float32))
      xt.requires_grad_(True)
      gt = torch.from_numpy(rng.normal(size=(n, c, h, w)).astype(np.float32))
      torch_layer = {'layer': lambda: torch.nn.GroupNorm(1, c),
                     'instance': lambda: torch.nn.InstanceNorm2d(c, affine=True),
                     'batch': lambda: torch.nn.BatchNorm2d(c)}[args.norm]()
      fwd_times, both_times = [], []
      for i in range(args.calls + 3):
        t0 = time.perf_counter()
        with torch.no_grad():
          torch.relu(torch_layer(xt))
        t1 = time.perf_counter()
        torch.relu(torch_layer(xt)).backward(gt)
        t2 = time.perf_counter()
        xt.grad = None
        torch_layer.zero_grad()
        if i >= 3:
          fwd_times.append(t1 - t0)
          both_times.append(t2 - t1)
      row['torch fwd'] = _median_ms(fwd_times)
      row['torch fwd+bwd'] = _median_ms(both_times)
  print(f'jax {jax.__version__}, {args.norm} norm + ReLU, median ms of {args.calls} calls')
  header = ['xla fwd', 'cpu fwd', 'xla fwd+bwd', 'cpu fwd+bwd']
  header += [] if args.no_torch else ['torch fwd', 'torch fwd+bwd']
  print(f'{"shape (NHWC)":22s}' + ''.join(f'{h:>14s}' for h in header) + f'{"xla/cpu":>10s}')
  for row in results:
    print(f'{str(tuple(row["shape"])):22s}' + ''.join(f'{row[h]:14.3f}' for h in header)
          + f'{row["xla fwd+bwd"] / row["cpu fwd+bwd"]:10.2f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'jax': jax.__version__, 'args': vars(args), 'rows': results}, f, indent=1)


if __name__ == '__main__':
  main()
