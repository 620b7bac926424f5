"""Per-layer times of the design alternatives #7 asks about: convolution layout and up-sampling.

Each JAX variant is jitted; each row's variants and the PyTorch layers run interleaved, one
call after another, in one process, so machine load hits them alike (median of `--iters`).
PyTorch's OpenMP (libgomp) threads busy-wait after each call, which slows a JAX call of a few
milliseconds that follows (docs/BENCHMARKS.md): run with `OMP_WAIT_POLICY=passive`, or
`--no-torch`, for the JAX columns of the small layers.

* Convolution layout: a 3x3 'SAME' convolution in NHWC (Flax's layout, the library's) and in
  NCHW (PyTorch's), for the layer shapes of a U-Net at `--sizes` and `--widths`: forward,
  input gradient (dx), weight gradient (dw) and forward + both gradients; PyTorch `conv2d` in
  NCHW and in channels_last.
* 2x up-sampling at the top decoder level ((N, S/2, S/2, 2w) -> (N, S, S, w)): the 2x2
  stride-2 transposed convolution as Flax `nn.ConvTranspose` (the original model code) and as
  `lvseg_jax.models.UpConv2x2` (the library's matmul form of the same function), against
  resize (nearest or bilinear) + 3x3 convolution, a common alternative that computes a
  *different* function (so not a drop-in change to the paper's networks); PyTorch
  `ConvTranspose2d` and `Upsample` + `Conv2d`.

* Kernel gradient (`--parts kernel_grad`): XLA's own weight gradient of each 3x3 convolution
  of the U-Net against the swapped form in `lvseg_jax.models` (the output gradient as the
  convolution's input), with the form the library picks for that layer.

  python bench/layer_variants.py                         # 128, widths 16 and 32, ~2 min
  python bench/layer_variants.py --parts kernel_grad --no-torch
  python bench/layer_variants.py --sizes 128,256 --json=/tmp/layers.json

The library's XLA CPU defaults (`lvseg_jax.runtime`) apply unless `--no-library-flags`.
"""

import argparse
import json
import os
import statistics
import sys
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from bench import train_throughput  # noqa: E402  (setup_xla, environment, timed)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--sizes', default='128', help='output image sizes')
  p.add_argument('--widths', default='16,32', help='U-Net base widths')
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--iters', type=int, default=10, help='timed calls per variant')
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--parts', default='layout,upsample')
  p.add_argument('--no-torch', action='store_true')
  train_throughput.add_xla_args(p)
  p.add_argument('--json', default='', help='write the results here')
  return p.parse_args(argv)


# ------------------------------------------------------------------------------------------- JAX


def _jax_sync(out):
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(out)


def jax_conv_runners(batch: int, size: int, cin: int, cout: int, layout: str,
                     ) -> dict[str, Callable]:
  """fwd / dx / dw / fwd+bwd calls of one 3x3 'SAME' convolution in `layout`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, size, size, cin)).astype(np.float32)
  w = rng.normal(size=(3, 3, cin, cout)).astype(np.float32) / np.sqrt(9 * cin)
  g = rng.normal(size=(batch, size, size, cout)).astype(np.float32)
  if layout == 'NHWC':
    dims = ('NHWC', 'HWIO', 'NHWC')
  elif layout == 'NCHW':
    dims = ('NCHW', 'OIHW', 'NCHW')
    x, w, g = x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1), g.transpose(0, 3, 1, 2)
  else:
    raise ValueError(f'Unknown layout {layout!r}; choose NHWC or NCHW.')
  x, w, g = jnp.asarray(x), jnp.asarray(w), jnp.asarray(g)

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=dims)

  def loss(x, w):
    return jnp.sum(conv(x, w) * g)

  fwd = jax.jit(conv)
  dx = jax.jit(jax.grad(loss, 0))
  dw = jax.jit(jax.grad(loss, 1))
  both = jax.jit(jax.value_and_grad(loss, (0, 1)))
  return {'fwd': lambda: fwd(x, w), 'dx': lambda: dx(x, w), 'dw': lambda: dw(x, w),
          'fwd+bwd': lambda: both(x, w)}


def jax_kernel_grad_runners(batch: int, size: int, cin: int, cout: int,
                            ) -> dict[str, dict[str, Callable]]:
  """The kernel gradient of one 3x3 'SAME' NHWC convolution: XLA's and the swapped form."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lvseg_jax import models  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, size, size, cin)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, cin, cout)) / np.sqrt(9 * cin), jnp.float32)
  g = jnp.asarray(rng.normal(size=(batch, size, size, cout)), jnp.float32)
  same = ((1, 1), (1, 1))
  convs = {
      'XLA kernel grad': lambda x, w: models._conv_nhwc(x, w, same, None),  # pylint: disable=protected-access
      'swapped kernel grad': lambda x, w: models._conv_swapped_kernel_grad(  # pylint: disable=protected-access
          x, w, same, None),
  }
  runners = {}
  for name, conv in convs.items():
    # x and g are arguments: the kernel gradient does not depend on w, so XLA would fold it.
    dw = jax.jit(jax.grad(lambda w, x, g, conv=conv: jnp.sum(conv(x, w) * g)))
    runners[name] = {'dw': lambda dw=dw: dw(w, x, g)}
  return runners


def jax_upsample_runners(batch: int, size: int, width: int, variant: str) -> dict[str, Callable]:
  """fwd and fwd+bwd (input and parameter gradients) calls of one 2x up-sampling layer."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lvseg_jax import models  # pylint: disable=g-import-not-at-top

  class ResizeConv(nn.Module):
    features: int
    method: str

    @nn.compact
    def __call__(self, x):
      n, h, w, c = x.shape
      x = jax.image.resize(x, (n, 2 * h, 2 * w, c), self.method)
      return nn.Conv(self.features, (3, 3), padding='SAME')(x)

  layers = {
      'ConvTranspose (lax.conv_transpose)': lambda: nn.ConvTranspose(
          width, (2, 2), strides=(2, 2), padding='SAME'),
      'UpConv2x2 (matmul, library)': lambda: models.UpConv2x2(width),
      'resize nearest + conv3x3': lambda: ResizeConv(width, 'nearest'),
      'resize bilinear + conv3x3': lambda: ResizeConv(width, 'bilinear'),
  }
  if variant not in layers:
    raise ValueError(f'Unknown up-sampling variant {variant!r}; choose one of {list(layers)}.')
  layer = layers[variant]()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, size // 2, size // 2, 2 * width)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(batch, size, size, width)), jnp.float32)
  params = layer.init(jax.random.key(0), x)

  def loss(params, x):
    return jnp.sum(layer.apply(params, x) * g)

  fwd = jax.jit(layer.apply)
  both = jax.jit(jax.value_and_grad(loss, (0, 1)))
  return {'fwd': lambda: fwd(params, x), 'fwd+bwd': lambda: both(params, x)}


# ----------------------------------------------------------------------------------------- torch


def _torch_runners(layer, x, g) -> dict[str, Callable]:
  import torch  # pylint: disable=g-import-not-at-top
  x = x.detach().requires_grad_(True)

  def fwd():
    with torch.no_grad():
      return layer(x)

  def fwd_bwd():
    layer.zero_grad(set_to_none=True)
    x.grad = None
    loss = (layer(x) * g).sum()
    loss.backward()
    return loss

  return {'fwd': fwd, 'fwd+bwd': fwd_bwd}


def torch_conv_runners(batch: int, size: int, cin: int, cout: int, channels_last: bool,
                       ) -> dict[str, Callable]:
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  layer = torch.nn.Conv2d(cin, cout, 3, padding=1)
  x = torch.randn(batch, cin, size, size)
  g = torch.randn(batch, cout, size, size)
  if channels_last:
    layer = layer.to(memory_format=torch.channels_last)
    x, g = x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
  return _torch_runners(layer, x, g)


def torch_upsample_runners(batch: int, size: int, width: int, variant: str,
                           ) -> dict[str, Callable]:
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  nn = torch.nn
  if variant == 'ConvTranspose2d':
    layer = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
  elif variant.startswith('Upsample'):
    mode = 'nearest' if 'nearest' in variant else 'bilinear'
    extra = {} if mode == 'nearest' else {'align_corners': False}
    layer = nn.Sequential(nn.Upsample(scale_factor=2, mode=mode, **extra),
                          nn.Conv2d(2 * width, width, 3, padding=1))
  else:
    raise ValueError(f'Unknown torch up-sampling variant {variant!r}.')
  x = torch.randn(batch, 2 * width, size // 2, size // 2)
  g = torch.randn(batch, width, size, size)
  return _torch_runners(layer, x, g)


# ------------------------------------------------------------------------------------------ main


def measure(rows: dict[str, tuple[dict[str, Callable], Callable]], iters: int, warmup: int,
            ) -> dict[str, dict[str, float]]:
  """Median ms of every (variant, phase), all calls of one repetition interleaved."""
  calls = [(name, phase, fn, sync) for name, (fns, sync) in rows.items()
           for phase, fn in fns.items()]
  for _, _, fn, sync in calls:
    for _ in range(warmup):
      train_throughput.timed(fn, sync)
  times = {(name, phase): [] for name, phase, _, _ in calls}
  for _ in range(iters):
    for name, phase, fn, sync in calls:
      times[(name, phase)].append(train_throughput.timed(fn, sync))
  out: dict[str, dict[str, float]] = {}
  for (name, phase), ts in times.items():
    out.setdefault(name, {})[phase] = round(1e3 * statistics.median(ts), 2)
  return out


def _print(title: str, result: dict[str, dict[str, float]]) -> None:
  phases = ['fwd', 'dx', 'dw', 'fwd+bwd']
  print(f'\n{title}\n{"variant":40}' + ''.join(f'{p:>10}' for p in phases) + '   (ms)')
  for name, values in result.items():
    print(f'{name:40}' + ''.join(
        f'{values[p]:10.1f}' if p in values else f'{"":>10}' for p in phases), flush=True)


def main(argv=None):
  args = parse_args(argv)
  train_throughput.setup_xla(args)
  env = train_throughput.environment()
  print(json.dumps(env))
  parts = [p for p in args.parts.split(',') if p]
  results = []
  no_sync = lambda out: None  # PyTorch eager on the CPU returns finished tensors
  for size in [int(s) for s in args.sizes.split(',')]:
    for width in [int(w) for w in args.widths.split(',')]:
      if 'layout' in parts:
        # The full-resolution layers, then one (c -> c) layer per deeper level of a depth-4 U-Net.
        shapes = [(size, 1, width), (size, width, width), (size, 2 * width, width)] + [
            (size // 2**k, width * 2**k, width * 2**k) for k in range(1, 5)]
        for level, cin, cout in shapes:
          rows = {f'JAX {layout}': (jax_conv_runners(args.batch, level, cin, cout, layout),
                                    _jax_sync) for layout in ('NHWC', 'NCHW')}
          if not args.no_torch:
            rows['PyTorch NCHW'] = (torch_conv_runners(args.batch, level, cin, cout, False),
                                    no_sync)
            rows['PyTorch channels_last'] = (
                torch_conv_runners(args.batch, level, cin, cout, True), no_sync)
          title = f'conv3x3 {args.batch}x{level}x{level}x{cin} -> {cout} (width {width})'
          result = measure(rows, args.iters, args.warmup)
          _print(title, result)
          results.append({'part': 'layout', 'size': level, 'width': width, 'cin': cin,
                          'cout': cout, 'ms': result, 'loadavg': os.getloadavg()})
      if 'kernel_grad' in parts:
        from lvseg_jax import models  # pylint: disable=g-import-not-at-top
        shapes = []
        for k in range(5):   # every 3x3 convolution of a depth-4 U-Net, by level
          level, features = size // 2**k, width * 2**k
          shapes.append((level, features // 2 if k else 1, features))
          shapes.append((level, features, features))
          if k < 4:
            shapes.append((level, 2 * features, features))   # decoder, after the concat
        for level, cin, cout in shapes:
          runners = jax_kernel_grad_runners(args.batch, level, cin, cout)
          rows = {f'JAX {name}': (fns, _jax_sync) for name, fns in runners.items()}
          picked = ('swapped' if models._swapped_kernel_grad_pays(cin, cout)  # pylint: disable=protected-access
                    else 'XLA')
          title = (f'conv3x3 kernel gradient {args.batch}x{level}x{level}x{cin} -> {cout} '
                   f'(width {width}; the library uses: {picked})')
          result = measure(rows, args.iters, args.warmup)
          _print(title, result)
          results.append({'part': 'kernel_grad', 'size': level, 'width': width, 'cin': cin,
                          'cout': cout, 'library': picked, 'ms': result,
                          'loadavg': os.getloadavg()})
      if 'upsample' in parts:
        rows = {}
        for variant in ('ConvTranspose (lax.conv_transpose)', 'UpConv2x2 (matmul, library)',
                        'resize nearest + conv3x3', 'resize bilinear + conv3x3'):
          rows['JAX ' + variant] = (jax_upsample_runners(args.batch, size, width, variant),
                                    _jax_sync)
        if not args.no_torch:
          for variant in ('ConvTranspose2d', 'Upsample nearest + Conv2d',
                          'Upsample bilinear + Conv2d'):
            rows['PyTorch ' + variant] = (
                torch_upsample_runners(args.batch, size, width, variant), no_sync)
        title = (f'2x up-sampling {args.batch}x{size // 2}x{size // 2}x{2 * width} -> '
                 f'{size}x{size}x{width}')
        result = measure(rows, args.iters, args.warmup)
        _print(title, result)
        results.append({'part': 'upsample', 'size': size, 'width': width, 'ms': result,
                        'loadavg': os.getloadavg()})
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'env': env, 'args': vars(args), 'results': results}, f, indent=1)


if __name__ == '__main__':
  main()
