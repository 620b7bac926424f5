"""Where the time of one lvseg_jax train step goes on CPU.

1. Phases: forward (train mode), forward + backward (value_and_grad of the library loss) and
   the full library train step (Adam update included), and the same three for the PyTorch
   reference (`bench/torch_unet.py`; `--no-torch` skips them), all timed interleaved.
2. Per HLO operation: a `jax.profiler` trace of a few compiled steps, each XLA thunk's time
   summed over the threads and attributed to a kind (3x3 conv forward / input-grad / weight-
   grad, transposed conv, pooling, normalization + elementwise fusions, ...) by reading the
   optimized HLO of the step.

  python bench/profile_step.py --model unet_bn --size 128 --width 16
  python bench/profile_step.py --impl before --model unet_bn --size 128 --width 32 --top 30
"""

import argparse
import collections
import glob
import os
import re
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from bench import train_throughput as tt  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='unet_bn', choices=tt.MODEL_NAMES)
  p.add_argument('--impl', default='after', choices=('before', 'after'))
  p.add_argument('--size', type=int, default=128)
  p.add_argument('--width', type=int, default=16)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--depth', type=int, default=4)
  p.add_argument('--dtype', default='float32')
  p.add_argument('--iters', type=int, default=5, help='timed repetitions per phase')
  p.add_argument('--trace-steps', type=int, default=3)
  p.add_argument('--top', type=int, default=20, help='print the N most expensive thunks')
  p.add_argument('--top-layers', type=int, default=40, help='print the N most expensive layers')
  tt.add_xla_args(p)
  p.add_argument('--no-trace', action='store_true')
  p.add_argument('--no-torch', action='store_true', help='skip the PyTorch phases')
  return p.parse_args(argv)


# ----------------------------------------------------------------------------- HLO kinds

_INSTR = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$')


def _computations(hlo_text):
  """{computation name: [(instr name, result shape text, opcode, rest of line)]}."""
  comps, current = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r'^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$', line)
    if header:
      current = header.group(1)
      comps[current] = []
      continue
    m = _INSTR.match(line)
    if m and current is not None:
      comps[current].append(m.groups())
  return comps


def _conv_kind(shape, rest):
  """3x3 forward / input-grad / weight-grad or 2x2 transposed, from the conv's attributes."""
  window = re.search(r'window=\{size=(\d+)x(\d+)', rest)
  size = (int(window.group(1)), int(window.group(2))) if window else (0, 0)
  if 'lhs_dilate' in rest or 'base-dilated' in rest:
    return 'transposed conv (lhs-dilated) fwd / weight-grad'
  if size[0] > 3:
    return 'conv weight-grad (big window)'
  if 'stride=2x2' in rest:
    return 'transposed conv weight-grad / strided conv'
  if size == (1, 1):
    return '1x1 conv'
  if 'rhs_reversal' in rest or re.search(r'dim_labels=\w+_\w*o\w*i->', rest):
    return 'conv input-grad (3x3)'
  return 'conv 3x3'


def classify(hlo_text):
  """Maps each top-level thunk name of the optimized HLO to a kind."""
  comps = _computations(hlo_text)
  kinds = {}
  for comp, instrs in comps.items():
    for name, shape, opcode, rest in instrs:
      kind = None
      called = re.findall(r'(?:calls|to_apply)=%?([\w.\-]+)', rest)
      inner = [i for c in called for i in comps.get(c, [])]
      inner_ops = {i[2] for i in inner}
      if opcode == 'convolution':
        kind = _conv_kind(shape, rest + ' ' + name)
      elif 'convolution' in inner_ops:
        conv = next(i for i in inner if i[2] == 'convolution')
        kind = _conv_kind(conv[1], conv[3] + ' ' + name)
      elif opcode == 'dot' or 'dot' in inner_ops:
        kind = 'dot (matmul: transposed conv / 1x1 conv as matmul)'
      elif opcode in ('reduce-window', 'select-and-scatter') or inner_ops & {
          'reduce-window', 'select-and-scatter'}:
        kind = 'max-pool (reduce-window / select-and-scatter)'
      elif opcode == 'scatter' or 'scatter' in inner_ops:
        kind = 'scatter (max-pool grad)'
      elif opcode == 'custom-call' or inner_ops & {'custom-call'}:
        kind = 'custom-call'
      elif opcode in ('fusion',) or inner_ops:
        if 'reduce' in inner_ops:
          kind = 'fusion with reduce (norm statistics, loss)'
        elif inner_ops & {'transpose', 'copy'} and len(inner_ops) <= 4:
          kind = 'transpose/copy (layout)'
        else:
          kind = 'elementwise fusion'
      elif opcode in ('copy', 'transpose'):
        kind = 'transpose/copy (layout)'
      elif opcode == 'iota' or inner_ops == {'iota'}:
        kind = 'iota (max-pool grad indices)'
      else:
        kind = opcode
      kinds.setdefault(name, kind)
  return kinds


# ----------------------------------------------------------------------------- phases

def phase_timings(args):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lvseg_jax import train  # pylint: disable=g-import-not-at-top
  if args.impl == 'before':
    from bench.baseline import models as models_mod  # pylint: disable=g-import-not-at-top
  else:
    from lvseg_jax import models as models_mod  # pylint: disable=g-import-not-at-top
  config = tt.model_config(args.model, args.width, args.depth, args.dtype)
  model = models_mod.get_model(config.model)
  variables = models_mod.init_variables(model, jax.random.key(0), args.size)
  images, masks = tt.make_batch(args.batch, args.size)
  images, masks = jnp.asarray(images), jnp.asarray(masks)
  mutable = ['batch_stats'] if 'batch_stats' in variables else False

  def apply(params):
    out = model.apply({**variables, 'params': params}, images, train=True, mutable=mutable)
    return out[0] if mutable else out

  def loss(params):
    ce, dice_loss, _ = train.per_sample_losses(apply(params), masks)
    return jnp.mean(ce + dice_loss)

  fwd = jax.jit(apply)
  fwd_bwd = jax.jit(jax.value_and_grad(loss))
  step = tt.build_jax_step(args.impl, args.model, args.width, args.size, args.batch,
                           args.depth, args.dtype)
  params = variables['params']
  sync = jax.block_until_ready
  phases = {'jax forward (train mode)': (lambda: fwd(params), sync),
            'jax forward + backward': (lambda: fwd_bwd(params), sync),
            'jax full train step (library)': (step, sync)}
  if not args.no_torch:
    phases.update(torch_phases(args, images, masks))
  for fn, fn_sync in phases.values():
    fn_sync(fn())
    fn_sync(fn())
  times = collections.defaultdict(list)
  faults = collections.Counter()
  for _ in range(args.iters):
    for label, (fn, fn_sync) in phases.items():
      seconds, step_faults = tt.timed_with_faults(fn, fn_sync)
      times[label].append(seconds)
      faults[label] += step_faults
  print(f'\n== phases ({args.impl}, {args.model}, {args.size}x{args.size}, width '
        f'{args.width}, batch {args.batch}; median of {args.iters}, interleaved) ==')
  for label, t in times.items():
    med = statistics.median(t)
    print(f'  {label:34} {1e3 * med:9.1f} ms   {args.batch / med:7.2f} images/s   '
          f'{faults[label] / args.iters:8.0f} page faults')
  return step


def torch_phases(args, images, masks):
  """The same phases for the PyTorch reference (`bench/torch_unet.py`), train mode."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from bench import torch_unet  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = torch_unet.UNet(torch_unet.block_norms_for(args.model, args.depth), args.width,
                          args.depth)
  model.train()
  x = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())
  y = torch.from_numpy(np.array(masks)).long()

  def forward():
    with torch.no_grad():
      return model(x)

  def forward_backward():
    model.zero_grad(set_to_none=True)
    loss, _ = torch_unet.dice_ce_loss(model(x), y)
    loss.backward()
    return loss

  step = tt.build_torch_step(args.model, args.width, args.size, args.batch, args.depth)
  no_sync = lambda out: None  # PyTorch CPU ops are synchronous
  return {'torch forward (train mode)': (forward, no_sync),
          'torch forward + backward': (forward_backward, no_sync),
          'torch full train step (Adam)': (step, no_sync)}


# ----------------------------------------------------------------------------- trace

def trace_step(args, run):
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src.lib import _profile_data  # pylint: disable=g-import-not-at-top

  trace_dir = tempfile.mkdtemp(prefix='lvseg_profile_')
  with jax.profiler.trace(trace_dir):
    for _ in range(args.trace_steps):
      jax.block_until_ready(run())
  files = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True)
  data = _profile_data.ProfileData.from_file(files[0])
  per_op = collections.Counter()
  for plane in data.planes:
    if plane.name != '/host:CPU':
      continue
    for line in plane.lines:
      if not line.name.startswith('tf_XLA'):
        continue
      for ev in line.events:
        if ev.name.startswith(('ThunkExecutor', 'CommonPjRt', 'PjRt', 'end: ',
                               'ThreadpoolListener', 'SlinkyThreadPool')):
          continue
        per_op[ev.name] += ev.duration_ns
  return per_op


def layer_of(op_name):
  """'fwd down0/norm0'-style label from an HLO op_name like
  'jit(train_step)/transpose(jvp(UNet))/down0/norm0/mul'."""
  if not op_name:
    return 'other'
  direction = 'bwd' if 'transpose(' in op_name else 'fwd'
  if 'UNet)' not in op_name:
    return f'{direction} loss / optimizer / other'
  path = re.sub(r'^[^/]*', '', op_name.split('UNet)', 1)[1]).strip('/').split('/')
  parts = [p for p in path if re.match(r'^[a-z_]+\d*$', p)][:2]
  if len(parts) == 2 and not re.match(r'^(conv|norm|upconv|head|down|up|bottleneck)\d*$',
                                      parts[1]):
    parts = parts[:1]
  layer = '/'.join(parts) or 'UNet (top level)'
  return f'{direction} {layer}'


def layers(hlo_text):
  """Maps each instruction name to the model layer its metadata names."""
  out, users = {}, collections.defaultdict(list)
  computations = _computations(hlo_text).values()
  for instrs in computations:
    for name, _, _, rest in instrs:
      m = re.search(r'op_name="([^"]*)"', rest)
      if m:
        out.setdefault(name, layer_of(m.group(1)))
      for operand in re.findall(r'%([\w.\-]+)', rest.split('metadata=')[0]):
        users[operand].append(name)
  # Layout copies XLA inserts carry no metadata: charge them to the layer that consumes them.
  for instrs in computations:
    for name, _, _, _ in instrs:
      if name not in out:
        consumer = next((u for u in users.get(name, []) if u in out), None)
        out[name] = out[consumer] + ' (layout copy)' if consumer else 'other'
  return out


def report_trace(args, per_op, hlo_text):
  kinds = classify(hlo_text)
  total = sum(per_op.values())
  by_kind = collections.Counter()
  for name, ns in per_op.items():
    by_kind[kinds.get(name, 'other (' + name.split('.')[0] + ')')] += ns
  n = args.trace_steps
  print(f'\n== thunk time by kind (summed over threads, per step; {n} traced steps) ==')
  for kind, ns in by_kind.most_common():
    print(f'  {kind:52} {ns / n / 1e6:9.1f} ms  {100 * ns / total:5.1f}%')
  print(f'  {"total":52} {total / n / 1e6:9.1f} ms')
  print('  (compare with the step time above: with the library default flag the 3x3 '
        'convolutions run in Eigen\'s thread pool and are not traced as thunks)')
  by_layer = collections.Counter()
  where = layers(hlo_text)
  for name, ns in per_op.items():
    by_layer[where.get(name, 'other')] += ns
  print(f'\n== thunk time by model layer (fwd / bwd = backward pass), per step ==')
  for layer, ns in sorted(by_layer.items(), key=lambda kv: -kv[1])[:args.top_layers]:
    print(f'  {layer:52} {ns / n / 1e6:9.1f} ms  {100 * ns / total:5.1f}%')
  print(f'\n== top {args.top} thunks ==')
  shapes = {}
  for instrs in _computations(hlo_text).values():
    for name, shape, opcode, rest in instrs:
      shapes.setdefault(name, f'{opcode} {shape}'[:70])
  for name, ns in per_op.most_common(args.top):
    print(f'  {name:36} {ns / n / 1e6:8.1f} ms  {kinds.get(name, "?"):40} '
          f'{shapes.get(name, "")}')


def compiled_hlo(args):
  """Optimized HLO text of the library train step for these settings."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lvseg_jax import train  # pylint: disable=g-import-not-at-top
  if args.impl == 'before':
    from bench.baseline import models as models_mod  # pylint: disable=g-import-not-at-top
  else:
    from lvseg_jax import models as models_mod  # pylint: disable=g-import-not-at-top
  config = tt.model_config(args.model, args.width, args.depth, args.dtype)
  config.data.image_size = args.size
  config.train.batch_size = args.batch
  config.augment.enabled = False
  model = models_mod.get_model(config.model)
  mesh = train.make_mesh(jax.devices()[:1])
  state = train.replicate(train.create_train_state(config, model, jax.random.key(0), 1000), mesh)
  step = train.make_train_step(config, mesh,
                               train.learning_rate_schedule(config.train, 1000))
  images, masks = tt.make_batch(args.batch, args.size)
  batch = {'image': images, 'mask': masks, 'valid': np.ones((args.batch,), bool)}
  return step.lower(state, batch, jax.random.key(1)).compile().as_text()


def main(argv=None):
  args = parse_args(argv)
  tt.setup_xla(args)
  import jax  # pylint: disable=g-import-not-at-top
  print('XLA_FLAGS =', os.environ.get('XLA_FLAGS', ''), '| devices', jax.devices())
  t0 = time.perf_counter()
  run = phase_timings(args)
  if args.no_trace:
    return
  per_op = trace_step(args, run)
  report_trace(args, per_op, compiled_hlo(args))
  print(f'\n(profile took {time.perf_counter() - t0:.0f} s; load {os.getloadavg()[0]:.1f} on '
        f'{os.cpu_count()} cores)')


if __name__ == '__main__':
  main()
