"""JAX and PyTorch train steps in separate processes, with and without the allocator defaults.

`bench/train_throughput.py` times both frameworks interleaved in one process, so both run
under the same process settings. `lvseg_jax.runtime.configure_malloc()` (applied by
`main.py`) changes glibc's allocator for the whole process, which PyTorch's step gains from
too. This script separates the two: every round runs these processes one after the other
(all four by default),

  jax-lib     the lvseg_jax step as `main.py` runs it (allocator and XLA defaults);
  jax-plain   the same step with glibc's default allocator (LVSEG_MALLOC_DEFAULTS=0);
  torch       PyTorch eager as a PyTorch user runs it: default allocator, no JAX;
  torch-lib   PyTorch eager under lvseg_jax's allocator settings,

and reports, per model and width, the median images/s over rounds and the ratios
jax-lib / torch (each as shipped), jax-lib / torch-lib (same allocator) and jax-plain / torch:
the ratio of the medians, each round's ratio in brackets, and the median of those after `~`.
Even rounds run the processes in reverse order, so that a drift in the machine's load over a
round does not favour whichever framework always runs first. `--runs` picks some of the four;
a fifth, `jax-lib-alt`, runs jax-lib under the interpreter given by `--alt-python` (another
virtual environment, e.g. Python 3.12 with jax 0.11, against the same PyTorch).

  python bench/separate_processes.py --rounds 3 --out bench_out/separate    # ~20 min
  python bench/separate_processes.py --runs jax-lib,torch --models unet,lnu --widths 16 \
      --rounds 8 --iters 16 --out bench_out/separate_w16
  python bench/separate_processes.py --runs jax-lib,jax-lib-alt,torch \
      --alt-python ../venv312/bin/python --models unet,lnu --widths 16 --out bench_out/jax011
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = {  # label: (--jax value, allocator defaults on)
    'jax-lib': ('after', True),
    'jax-plain': ('after', False),
    'torch': ('', False),
    'torch-lib': ('', True),
    'jax-lib-alt': ('after', True),  # jax-lib under the interpreter of --alt-python
}
RATIOS = (('jax-lib', 'torch'), ('jax-lib', 'torch-lib'), ('jax-plain', 'torch'),
          ('jax-lib-alt', 'torch'), ('jax-lib-alt', 'torch-lib'))
DEFAULT_RUNS = ('jax-lib', 'jax-plain', 'torch', 'torch-lib')


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--out', default='bench_out/separate', help='folder for the JSON of each run')
  p.add_argument('--models', default='unet,unet_bn,lnu,ibu')
  p.add_argument('--sizes', default='128')
  p.add_argument('--widths', default='16,32')
  p.add_argument('--iters', type=int, default=8)
  p.add_argument('--runs', default=','.join(DEFAULT_RUNS),
                 help=f'comma-separated, some of {", ".join(RUNS)}')
  p.add_argument('--alt-python', default=None,
                 help='Python interpreter of the jax-lib-alt run, e.g. another virtual '
                      "environment's bin/python with another jax version")
  args = p.parse_args(argv)
  args.runs = [r for r in args.runs.split(',') if r]
  unknown = sorted(set(args.runs) - set(RUNS))
  if unknown or not args.runs:
    p.error(f'--runs: unknown {unknown}; choose from {", ".join(RUNS)}')
  if ('jax-lib-alt' in args.runs) != (args.alt_python is not None):
    p.error('--alt-python and the jax-lib-alt run go together')
  return args


def run_once(label: str, args, path: str) -> None:
  jax_impl, malloc = RUNS[label]
  python = args.alt_python if label == 'jax-lib-alt' else sys.executable
  cmd = [python, os.path.join(HERE, 'train_throughput.py'), '--jax', jax_impl,
         '--models', args.models, '--sizes', args.sizes, '--widths', args.widths,
         '--iters', str(args.iters), '--iters-256', str(args.iters), '--json', path]
  if jax_impl:
    cmd.append('--no-torch')
  env = {**os.environ, 'LVSEG_MALLOC_DEFAULTS': '1' if malloc else '0'}
  subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)


def read_run(path: str) -> tuple[dict[tuple[str, int, int], float], list[float]]:
  """Images/s per (model, size, width), and page faults per step in row order, of one run."""
  with open(path) as f:
    results = json.load(f)['results']
  ips = {(r['model'], r['size'], r['width']): next(iter(r['images_per_s'].values()))
         for r in results}
  return ips, [next(iter(r['page_faults_per_step'].values())) for r in results]


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  ips = collections.defaultdict(lambda: collections.defaultdict(list))
  faults = {}
  labels = args.runs
  ratio_pairs = [(a, b) for a, b in RATIOS if a in labels and b in labels]
  for rnd in range(1, args.rounds + 1):
    for label in (labels if rnd % 2 else labels[::-1]):
      path = os.path.join(args.out, f'{label}_r{rnd}.json')
      run_once(label, args, path)
      run_ips, faults[label] = read_run(path)
      for key, value in run_ips.items():
        ips[key][label].append(value)
      print(f'round {rnd} {label:11} done; load {os.getloadavg()[0]:.1f}', flush=True)
  print(f'\nimages/s, median over {args.rounds} rounds (per round in brackets)')
  header = f"{'model':8} {'size':>4} {'width':>5} " + ' '.join(f'{l:>10}' for l in labels)
  header += ' ' + ' '.join(f'{a + "/" + b:>26}' for a, b in ratio_pairs)
  print(header)
  summary = []
  for key, per_label in ips.items():
    med = {label: statistics.median(v) for label, v in per_label.items()}
    ratios = {f'{a}/{b}': med[a] / med[b] for a, b in ratio_pairs}
    per_round = {f'{a}/{b}': [x / y for x, y in zip(per_label[a], per_label[b])]
                 for a, b in ratio_pairs}
    paired = {k: statistics.median(v) for k, v in per_round.items()}
    summary.append(dict(model=key[0], size=key[1], width=key[2], images_per_s=per_label,
                        median=med, ratio_of_medians=ratios, ratio_per_round=per_round,
                        median_of_ratios_per_round=paired))
    print(f'{key[0]:8} {key[1]:4d} {key[2]:5d} ' +
          ' '.join(f'{med[l]:10.2f}' for l in labels) + ' ' +
          ' '.join(f'{ratios[k]:8.2f} [{" ".join(f"{x:.2f}" for x in per_round[k])}] '
                   f'~{paired[k]:.2f}'.rjust(26) for k in ratios))
  print('\nminor page faults per step in the last round, per model/width:')
  for label, values in faults.items():
    print(f'  {label:11} ' + ' '.join(f'{v:.0f}' for v in values))
  with open(os.path.join(args.out, 'summary.json'), 'w') as f:
    json.dump({'args': vars(args), 'results': summary, 'page_faults_last_round': faults}, f,
              indent=1)


if __name__ == '__main__':
  main()
