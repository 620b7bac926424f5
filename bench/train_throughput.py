"""Training throughput (images/s) of the lvseg_jax train step against the same U-Net in PyTorch.

Both run interleaved in one process (so machine load hits them alike), one step after another:
  * `jax`:   the library's real train step (`lvseg_jax.train.make_train_step`, jit);
  * `torch`: the same U-Net in PyTorch eager (`bench/torch_unet.py`), Adam, same loss.

Reported: the median (or `--stat=min`) step time over `--iters` steps, as images/s, and the
JAX / PyTorch throughput ratio. Augmentation is off by default (`--augment` turns it on: it
runs inside the JAX step, so it is then charged to JAX only).

  python bench/train_throughput.py --sizes 128 --widths 16,32                # CPU, ~5 min
  python bench/train_throughput.py --models unet_bn --sizes 128 --widths 16 --iters 5
  python bench/train_throughput.py --torch-formats nchw,channels_last
  python bench/train_throughput.py --widths 16,32,64 --batch 16 --iters 30 --iters-256 30 \
      --dtype bfloat16          # on a GPU: PyTorch on CUDA too, bf16 autocast

Device: JAX runs on its default backend; PyTorch on CUDA when JAX's backend is a GPU and
PyTorch sees one (`--torch-device` overrides), with `cudnn.benchmark` on, as GPU users run it.
On a GPU, float32 convolutions use TF32 in both frameworks (their defaults). `--dtype
bfloat16` gives JAX bf16 activations (float32 parameters, statistics and optimizer) and
PyTorch `torch.autocast(dtype=torch.bfloat16)`.
"""

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

MODEL_NAMES = ('unet', 'unet_bn', 'lnu', 'ibu')
TORCH_LABELS = {'nchw': 'torch', 'channels_last': 'torch-cl'}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--models', default=','.join(MODEL_NAMES))
  p.add_argument('--sizes', default='128,256')
  p.add_argument('--widths', default='16,32')
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--depth', type=int, default=4)
  p.add_argument('--iters', type=int, default=8, help='timed steps per implementation')
  p.add_argument('--iters-256', type=int, default=3, help='timed steps at sizes >= 256')
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--stat', default='median', choices=('median', 'min'),
                 help='step time statistic (min is the least load-sensitive)')
  p.add_argument('--no-torch', action='store_true')
  p.add_argument('--torch-threads', type=int, default=0, help='0: PyTorch default')
  p.add_argument('--torch-formats', default='nchw',
                 help="PyTorch memory formats to time side by side: nchw (PyTorch's default) "
                      'and/or channels_last (NHWC, oneDNN\'s fast path on CPU)')
  p.add_argument('--channels-last', action='store_true',
                 help='same as --torch-formats=channels_last')
  p.add_argument('--torch-device', default='auto',
                 help="cpu | cuda | auto (cuda if JAX's default backend is a GPU)")
  p.add_argument('--dtype', default='float32',
                 help='activation dtype (float32|bfloat16): JAX model.dtype, PyTorch autocast')
  p.add_argument('--augment', action='store_true', help='augmentation inside the JAX step')
  p.add_argument('--xla-flags', default='', help='extra XLA_FLAGS, appended')
  p.add_argument('--json', default='', help='write the results here')
  return p.parse_args(argv)


def model_config(name, width, depth, dtype='float32'):
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.model.name = 'unet' if name.startswith('unet') else name
  config.model.norm = 'batch' if name == 'unet_bn' else 'none'
  config.model.base_width = width
  config.model.depth = depth
  config.model.dtype = dtype
  return config


def make_batch(batch, size, seed=0):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]
  r = rng.uniform(0.1, 0.25, (batch, 1, 1)) * size
  masks = ((yy - size / 2)**2 + (xx - size / 2)**2 < r**2).astype(np.int32)
  images = (masks[..., None] + rng.normal(0, 0.5, (batch, size, size, 1))).astype(np.float32)
  return images, masks


def build_jax_step(name, width, size, batch, depth=4, dtype='float32', augment=False):
  """Returns run() -> loss (a jax.Array), one library train step per call."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lvseg_jax import models as models_mod  # pylint: disable=g-import-not-at-top
  from lvseg_jax import train  # pylint: disable=g-import-not-at-top
  config = model_config(name, width, depth, dtype)
  config.data.image_size = size
  config.train.batch_size = batch
  config.augment.enabled = augment
  model = models_mod.get_model(config.model)
  total = 1000
  state = train.create_train_state(config, model, jax.random.key(0), total)
  schedule = train.learning_rate_schedule(config.train, total)
  mesh = train.make_mesh(jax.devices()[:1])
  state = train.replicate(state, mesh)  # else the second call compiles the step again
  step = train.make_train_step(config, mesh, schedule)
  images, masks = make_batch(batch, size)
  device_batch = {'image': jax.device_put(images), 'mask': jax.device_put(masks),
                  'valid': jax.device_put(np.ones((batch,), bool))}
  key = jax.random.key(1)
  holder = [state]

  def run():
    holder[0], metrics = step(holder[0], device_batch, key)
    return metrics['loss']

  return run


def build_torch_step(name, width, size, batch, depth=4, channels_last=False, device='cpu',
                     dtype='float32'):
  import torch  # pylint: disable=g-import-not-at-top
  from bench import torch_unet  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = torch_unet.UNet(torch_unet.block_norms_for(name, depth), width, depth).to(device)
  autocast = {'float32': None, 'bfloat16': torch.bfloat16}[dtype]
  step = torch_unet.make_train_step(model, channels_last=channels_last, autocast_dtype=autocast)
  images, masks = make_batch(batch, size)
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
  y = torch.from_numpy(masks).long().to(device)
  return lambda: step(x, y)


def torch_device(requested: str) -> str:
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  if requested != 'auto':
    return requested
  return 'cuda' if jax.default_backend() == 'gpu' and torch.cuda.is_available() else 'cpu'


def minor_page_faults() -> int:
  """The process's minor page faults so far (pages the kernel mapped in on first touch)."""
  import resource  # pylint: disable=g-import-not-at-top
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn, sync):
  t0 = time.perf_counter()
  out = fn()
  sync(out)
  return time.perf_counter() - t0


def timed_with_faults(fn, sync) -> tuple[float, int]:
  """`timed`, and the minor page faults the call took."""
  before = minor_page_faults()
  seconds = timed(fn, sync)
  return seconds, minor_page_faults() - before


def environment(device: str = 'cpu'):
  """Machine and versions; `device=''` leaves PyTorch out (it need not be installed)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  from bench import common  # pylint: disable=g-import-not-at-top
  env = {**common.machine(), 'jax': jax.__version__,
         'jaxlib': jaxlib.__version__, 'flax': flax.__version__,
         'xla_flags': os.environ.get('XLA_FLAGS', ''),
         'jax_device': jax.devices()[0].device_kind, 'torch_device': device}
  if not device:
    return env
  import torch  # pylint: disable=g-import-not-at-top
  env['torch'] = torch.__version__
  env['torch_threads'] = torch.get_num_threads()
  if device == 'cuda':
    env['torch_cuda_device'] = torch.cuda.get_device_name()
    env['torch_cuda'] = torch.version.cuda
    env['cudnn'] = torch.backends.cudnn.version()
    env['cudnn_benchmark'] = torch.backends.cudnn.benchmark
    env['cudnn_allow_tf32'] = torch.backends.cudnn.allow_tf32
  return env


def main(argv=None):
  args = parse_args(argv)
  if args.xla_flags:   # before JAX starts
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + args.xla_flags).strip()
  import jax  # pylint: disable=g-import-not-at-top
  device = ''
  if not args.no_torch:  # --no-torch runs where PyTorch is not installed
    import torch  # pylint: disable=g-import-not-at-top
    if args.torch_threads:
      torch.set_num_threads(args.torch_threads)
    device = torch_device(args.torch_device)
    if device == 'cuda':
      torch.backends.cudnn.benchmark = True
  env = environment(device)
  print(json.dumps(env))
  impls = ['jax']
  formats = ['channels_last'] if args.channels_last else [
      f for f in args.torch_formats.split(',') if f]
  if args.no_torch:
    formats = []
  unknown = [f for f in formats if f not in TORCH_LABELS]
  if unknown:
    raise SystemExit(f'--torch-formats: unknown {unknown}; choose from {list(TORCH_LABELS)}.')
  torch_labels = {f: TORCH_LABELS[f] for f in formats}
  # A CPU step returns when its work is done; a CUDA step as soon as the work is queued.
  torch_sync = ((lambda out: torch.cuda.synchronize()) if device == 'cuda'
                else (lambda out: None))
  results = []
  header = (f"{'model':8} {'size':>4} {'width':>5} " +
            ' '.join(f'{i:>11}' for i in impls) +
            ''.join(f' {label:>8}' for label in torch_labels.values()) + ' ' +
            ' '.join(f'{i + "/" + label:>20}' for label in torch_labels.values()
                     for i in impls) + '   (images/s)')
  print(header, flush=True)
  for size in [int(s) for s in args.sizes.split(',')]:
    iters = args.iters if size < 256 else args.iters_256
    for width in [int(w) for w in args.widths.split(',')]:
      for name in args.models.split(','):
        runners = {}
        for impl in impls:
          runners[impl] = (build_jax_step(name, width, size, args.batch, args.depth,
                                          args.dtype, args.augment), jax.block_until_ready)
        for fmt, label in torch_labels.items():
          runners[label] = (build_torch_step(name, width, size, args.batch, args.depth,
                                             fmt == 'channels_last', device, args.dtype),
                            torch_sync)
        compile_s = {}
        for label, (fn, sync) in runners.items():
          compile_s[label] = timed(fn, sync)          # first call: jit compile (+ step)
          for _ in range(args.warmup - 1):
            timed(fn, sync)
        times = {label: [] for label in runners}
        faults = {label: 0 for label in runners}
        for _ in range(iters):                         # interleaved: load hits all alike
          for label, (fn, sync) in runners.items():
            seconds, step_faults = timed_with_faults(fn, sync)
            times[label].append(seconds)
            faults[label] += step_faults
        stat = min if args.stat == 'min' else statistics.median
        ips = {label: args.batch / stat(t) for label, t in times.items()}
        row = dict(model=name, size=size, width=width, batch=args.batch, iters=iters,
                   stat=args.stat,
                   dtype=args.dtype, augment=args.augment, images_per_s=ips,
                   step_ms={k: [round(1e3 * x, 1) for x in v] for k, v in times.items()},
                   first_call_s=compile_s, loadavg=os.getloadavg(),
                   page_faults_per_step={k: v / iters for k, v in faults.items()})
        # ratio: JAX / PyTorch NCHW (the default eager model); ratio_cl: / channels_last.
        for label, key in (('torch', 'ratio'), ('torch-cl', 'ratio_cl')):
          if label in ips:
            row[key] = {k: ips[k] / ips[label] for k in ips if k in impls}
        results.append(row)
        line = f'{name:8} {size:4d} {width:5d} ' + ' '.join(
            f"{ips[i]:11.2f}" for i in impls)
        line += ''.join(f' {ips[label]:8.2f}' for label in torch_labels.values()) + ' '
        line += ' '.join(f"{ips[i] / ips[label]:20.2f}"
                         for label in torch_labels.values() for i in impls)
        print(line + f"   load {os.getloadavg()[0]:.1f}", flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'env': env, 'args': vars(args), 'results': results}, f, indent=1)


if __name__ == '__main__':
  main()
