"""Inference latency for a full cine series, end to end, and peak memory.

For each model configuration this writes a workdir with a randomly initialized checkpoint (the
weights do not change the work done, except that post-processing sees other masks) and then,
each in a fresh process so the peak resident memory belongs to that configuration alone:

  * `cli`: `python main.py --mode=predict` on the series, as a user runs it: Python and JAX
    start-up, checkpoint restore, DICOM reading, jit compilation, the forward passes,
    post-processing, contours, and every output file (PNG masks and overlays, contour files,
    NIfTI, CSV/JSON). Wall time and peak RSS (`wait4`), `--repeats` times: the first run cold
    (an empty compilation cache), the others warm.
  * `stages`: the same work inside one process, timed stage by stage, with the forward pass
    compiled once and then timed warm; peak RSS, and on a GPU the device's peak memory.

  python bench/inference_latency.py                              # CPU-scale and full-size IBU-Net
  python bench/inference_latency.py --configs cpu --repeats 1
  python bench/inference_latency.py --configs full,full-bf16      # on a GPU
  python bench/inference_latency.py --configs cpu,shipped         # + the shipped model
  python bench/inference_latency.py --series /path/to/CINESAX_300 --json /tmp/latency.json

The default series is SCD0000101/CINESAX_300 (SC-HF-I-01: 12 slices x 20 phases = 240 frames,
256 x 256) from the SCD data (`LVSEG_DATA_DIR`, default ../shared/data/scd).
"""

import argparse
import importlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

DATA_ROOT = os.environ.get('LVSEG_DATA_DIR', os.path.join(REPO, '..', 'shared', 'data', 'scd'))
DEFAULT_SERIES = os.path.join(DATA_ROOT, 'SCD_IMAGES_01', 'SCD0000101', 'CINESAX_300')

# name -> (config file, overrides): the CPU training scale and the paper's full size.
CONFIGS = {
    'cpu': ('configs/cpu.py', {}),                       # IBU-Net, 128 x 128, width 16
    'full': ('configs/ibu.py', {}),                      # IBU-Net, 256 x 256, width 64
    # The same float32 checkpoint run with bfloat16 activations (for GPUs).
    'full-bf16': ('configs/ibu.py', {'predict.dtype': 'bfloat16'}),
    # The shipped model (lvseg_jax/pretrained/), its trained weights: three classes, two contours.
    'shipped': ('configs/clinical_cpu.py', {}),
    # The same with flip test-time augmentation: 4 passes per frame (the time it costs).
    'shipped-tta': ('configs/clinical_cpu.py', {'predict.tta': True,
                                                'predict.tta_transforms': 'flips'}),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--configs', default='cpu,full', help=f'comma list of {sorted(CONFIGS)}')
  p.add_argument('--series', default=DEFAULT_SERIES, help='a DICOM series folder')
  p.add_argument('--repeats', type=int, default=3, help='CLI runs per configuration')
  p.add_argument('--batch-size', type=int, default=0,
                 help="config.predict.batch_size (0: configs/default.py's)")
  p.add_argument('--json', default='', help='also write the results here')
  p.add_argument('--child-stages', default='', help=argparse.SUPPRESS)  # internal
  p.add_argument('--child-workdir', default='', help=argparse.SUPPRESS)  # internal
  args = p.parse_args(argv)
  if not args.batch_size:
    from configs import default  # pylint: disable=g-import-not-at-top
    args.batch_size = default.get_config().predict.batch_size
  return args


def load_config(name: str, batch_size: int):
  path, overrides = CONFIGS[name]
  module = importlib.import_module(path[:-len('.py')].replace('/', '.'))
  config = module.get_config()
  for key, value in overrides.items():
    section, field = key.split('.')
    config[section][field] = value
  config.predict.batch_size = batch_size
  config.predict.progress = False
  return path, config


def peak_rss_mib() -> float:
  """This process's peak resident memory since exec (VmHWM), in MiB.

  Not `ru_maxrss`: Linux carries that over from the forking parent across exec.
  """
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) / 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) / 1024
  return float('nan')


def make_workdir(name: str, batch_size: int, root: str) -> str:
  """A workdir with the config and a random-init 'best' checkpoint, as training leaves it
  ('shipped*': the shipped model's folder)."""
  if name.startswith('shipped'):
    from lvseg_jax import pretrained  # pylint: disable=g-import-not-at-top
    return pretrained.path()
  import jax  # pylint: disable=g-import-not-at-top
  from lvseg_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from lvseg_jax import models  # pylint: disable=g-import-not-at-top
  _, config = load_config(name, batch_size)
  workdir = os.path.join(root, name)
  model = models.get_model(config.model)
  variables = models.init_variables(model, jax.random.key(0), config.data.image_size)
  checkpointing.save_config(config, workdir)
  manager = checkpointing.Checkpointer(workdir)
  manager.save_best(1, variables, 0.0, {'step': 1})
  manager.close()
  return workdir


def run_cli(config_path: str, workdir: str, series: str, output: str, batch_size: int,
            overrides: dict | None = None):
  """Wall seconds and peak RSS (MiB) of one `main.py --mode=predict` process.

  The child's `ru_maxrss` starts from this (small, JAX-free) parent's RSS at fork, which
  `main` records; the children's peaks are far above it.
  """
  shutil.rmtree(output, ignore_errors=True)
  cmd = [sys.executable, os.path.join(REPO, 'main.py'), f'--config={config_path}',
         f'--workdir={workdir}', '--mode=predict', f'--input={series}', f'--output={output}',
         f'--config.predict.batch_size={batch_size}', '--config.predict.progress=false']
  cmd += [f'--config.{key}={value}' for key, value in (overrides or {}).items()]
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  out = proc.stdout.read()
  _, status, usage = os.wait4(proc.pid, 0)
  seconds = time.perf_counter() - start
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode != 0:
    raise RuntimeError(f'{" ".join(cmd)} failed ({proc.returncode}):\n{out.decode()[-3000:]}')
  return seconds, usage.ru_maxrss / 1024


def child_stages(name: str, workdir: str, series_path: str, batch_size: int) -> dict:
  """Stage-by-stage timing of the predict path in this (fresh) process."""
  t = {}
  start = time.perf_counter()
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lvseg_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from lvseg_jax import models  # pylint: disable=g-import-not-at-top
  from lvseg_jax import predict  # pylint: disable=g-import-not-at-top
  checkpointing.quiet_orbax_logging()
  jax.devices()
  t['import_and_backend_s'] = time.perf_counter() - start
  rss_after_import = current_rss_mib()

  _, run_config = load_config(name, batch_size)
  tic = time.perf_counter()
  trained, variables = checkpointing.load_for_inference(workdir, 'best')
  config = predict.inference_config(run_config, trained)
  model = models.get_model(config.model)
  t['restore_checkpoint_s'] = time.perf_counter() - tic

  tic = time.perf_counter()
  series = predict.find_series(series_path, config)
  t['read_dicom_s'] = time.perf_counter() - tic
  frames = [f for s in series for f in s.frames]

  forward = predict.make_forward_fn(model, predict.tta_mode(config.predict))
  size = int(config.data.image_size)
  dummy = np.zeros((batch_size, size, size, 1), np.float32)
  tic = time.perf_counter()
  jax.block_until_ready(forward(jax.device_put(variables), dummy))
  t['compile_first_batch_s'] = time.perf_counter() - tic

  tic = time.perf_counter()
  predictions = predict.predict_frames(model, variables, frames, config, forward_fn=forward)
  t['predict_frames_s'] = time.perf_counter() - tic

  # The network alone, warm: the same batches without pre/post-processing.
  batches = -(-len(frames) // batch_size)
  device_vars = jax.device_put(variables)
  device_batch = jax.device_put(np.random.default_rng(0).normal(
      size=(batch_size, size, size, 1)).astype(np.float32))
  tic = time.perf_counter()
  for _ in range(batches):
    out = forward(device_vars, device_batch)
  jax.block_until_ready(out)
  t['network_only_s'] = time.perf_counter() - tic

  output = tempfile.mkdtemp(prefix='lvseg_latency_out_')
  tic = time.perf_counter()
  for s in series:
    mine = predictions[:len(s.frames)]
    predictions = predictions[len(s.frames):]
    summary = predict.summarize_series(s, mine, config)
    predict.write_series_outputs(s, mine, summary, output, config)
  t['write_outputs_s'] = time.perf_counter() - tic
  shutil.rmtree(output, ignore_errors=True)

  result = {'frames': len(frames), 'stages': t,
            'frames_per_s_predict_frames': len(frames) / t['predict_frames_s'],
            'frames_per_s_network': batches * batch_size / t['network_only_s'],
            'peak_rss_mib': peak_rss_mib(),
            'rss_after_import_mib': rss_after_import,
            'device': str(jax.devices()[0])}
  stats = getattr(jax.devices()[0], 'memory_stats', lambda: None)()
  if stats and 'peak_bytes_in_use' in stats:
    result['device_peak_mib'] = stats['peak_bytes_in_use'] / 2**20
  return result


def environment() -> dict:
  """Machine and versions, without importing JAX (this process must stay small)."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  from bench import common  # pylint: disable=g-import-not-at-top
  return {'date': time.strftime('%Y-%m-%d'), **common.machine(),
          'python': platform.python_version(), 'jax': metadata.version('jax'),
          'jaxlib': metadata.version('jaxlib'), 'xla_flags_env': os.environ.get('XLA_FLAGS', '')}


def main(argv=None):
  args = parse_args(argv)
  if args.child_workdir:
    name, root = args.child_workdir.split(':', 1)
    print(make_workdir(name, args.batch_size, root))
    return
  if args.child_stages:
    name, workdir = args.child_stages.split(':', 1)
    print(json.dumps(child_stages(name, workdir, args.series, args.batch_size)))
    return
  if not os.path.isdir(args.series):
    sys.exit(f'Series folder not found: {args.series!r} (set LVSEG_DATA_DIR or --series).')
  names = [n for n in args.configs.split(',') if n]
  unknown = sorted(set(names) - set(CONFIGS))
  if unknown:
    sys.exit(f'Unknown --configs {unknown}; choose from {sorted(CONFIGS)}.')
  env = environment()
  print(json.dumps(env), flush=True)
  root = tempfile.mkdtemp(prefix='lvseg_latency_')
  results = {}
  try:
    for name in names:
      config_path, config = load_config(name, args.batch_size)
      # In a child, so that this process stays small (see run_cli).
      proc = subprocess.run([sys.executable, os.path.abspath(__file__),
                             f'--child-workdir={name}:{root}', f'--batch-size={args.batch_size}'],
                            cwd=REPO, capture_output=True, text=True, check=False)
      if proc.returncode != 0:
        raise RuntimeError(f'making the workdir failed:\n{proc.stderr[-3000:]}')
      workdir = proc.stdout.strip().splitlines()[-1]
      print(f'\n== {name}: {config.model.name}, {config.data.image_size}x{config.data.image_size},'
            f' width {config.model.base_width}, predict batch {args.batch_size}', flush=True)
      cli = []
      for i in range(args.repeats):
        # A compilation cache of this run's own: run 1 is cold (it compiles and fills the
        # cache), the later runs are warm, as a user's second prediction is.
        seconds, rss = run_cli(config_path, workdir, args.series, os.path.join(root, 'out'),
                               args.batch_size, dict(CONFIGS[name][1], compilation_cache_dir=
                                                     os.path.join(root, f'jax_cache_{name}')))
        cli.append({'seconds': seconds, 'peak_rss_mib': rss})
        print(f"  cli run {i + 1} ({'warm' if i else 'cold'}): {seconds:6.1f} s end to end, "
              f'peak RSS {rss:6.0f} MiB',
              flush=True)
      cmd = [sys.executable, os.path.abspath(__file__), f'--child-stages={name}:{workdir}',
             f'--series={args.series}', f'--batch-size={args.batch_size}']
      proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
      if proc.returncode != 0:
        raise RuntimeError(f'stage timing failed:\n{proc.stderr[-3000:]}')
      stages = json.loads(proc.stdout.strip().splitlines()[-1])
      print(f"  stages ({stages['frames']} frames, {stages['device']}):")
      for stage, seconds in stages['stages'].items():
        print(f'    {stage:28s} {seconds:7.2f} s')
      print(f"    predict_frames {stages['frames_per_s_predict_frames']:.1f} frames/s; network "
            f"alone {stages['frames_per_s_network']:.1f} frames/s; peak RSS "
            f"{stages['peak_rss_mib']:.0f} MiB (RSS after imports {stages['rss_after_import_mib']:.0f})"
            + (f"; device peak {stages['device_peak_mib']:.0f} MiB"
               if 'device_peak_mib' in stages else ''), flush=True)
      results[name] = {
          'config': config_path, 'model': config.model.name,
          'image_size': config.data.image_size, 'base_width': config.model.base_width,
          'cli': cli, 'cli_median_s': statistics.median(r['seconds'] for r in cli),
          'cli_peak_rss_mib': max(r['peak_rss_mib'] for r in cli), 'stages': stages}
  finally:
    shutil.rmtree(root, ignore_errors=True)
  env['loadavg_end'] = os.getloadavg()
  env['parent_peak_rss_mib'] = peak_rss_mib()
  print(f"\n(this parent process's peak RSS: {env['parent_peak_rss_mib']:.0f} MiB)")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'env': env, 'args': vars(args), 'results': results}, f, indent=1)


if __name__ == '__main__':
  main()
