"""The ablation report: a paper-style table over cells (seeds and folds aggregated), a box plot,
and `results.md` / `results.json`. Column definitions: the package docstring.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

from matplotlib.figure import Figure
import ml_collections

from lvseg_jax import results as results_lib
from lvseg_jax.experiments.grid import REPLICATE_KEYS, CellResult, to_plain, value_str


def _group_key(cell: CellResult, group_by: Sequence[str]) -> tuple[str, ...]:
  # '—' marks an override the cell does not have (dropped as not applicable, e.g. the IBN
  # mode of a U-Net) or never set.
  return tuple(value_str(cell.overrides[k]) if k in cell.overrides else '—' for k in group_by)


def default_group_by(cells: Sequence[CellResult]) -> tuple[str, ...]:
  """Every override key of the cells except the replicate keys (seed, fold), in grid order."""
  keys: list[str] = []
  for cell in cells:
    keys += [k for k in cell.overrides if k not in keys and k not in REPLICATE_KEYS]
  return tuple(keys)


def _groups(cells: Sequence[CellResult], group_by: Sequence[str]
            ) -> list[tuple[tuple[str, ...], list[CellResult]]]:
  groups: dict[tuple[str, ...], list[CellResult]] = {}
  for cell in cells:
    groups.setdefault(_group_key(cell, group_by), []).append(cell)
  return list(groups.items())


def _per_frame(cells: Sequence[CellResult], metric: str) -> list[Any]:
  return [f[metric] for c in cells if c.ok for f in c.results['per_frame']]


def _per_case(cells: Sequence[CellResult], metric: str) -> list[Any]:
  return [v[metric] for c in cells if c.ok for v in c.results['per_case'].values()]


def summarize(cells: Sequence[CellResult],
              group_by: Sequence[str] | None = None) -> dict[str, Any]:
  """The numbers behind the table (module docstring), JSON-able.

  Args:
    cells: from `run_grid`.
    group_by: override keys that define a table row; default `default_group_by(cells)`.

  Returns:
    {'group_by': [...], 'groups': [{'group': {key: value}, 'runs', 'failed', 'cells',
     'dice_per_image', 'dice_run_means', 'apd_good_mm_over_cases', 'good_pct_over_cases'}],
     'cells': [{'name', 'dir', 'status', 'overrides', 'seconds', 'error'}]}, each metric a
    {'mean', 'std', 'n'}.
  """
  group_by = tuple(default_group_by(cells) if group_by is None else group_by)
  groups = []
  for key, members in _groups(cells, group_by):
    done = [c for c in members if c.ok]
    groups.append({
        'group': dict(zip(group_by, key)),
        'runs': len(done),
        'failed': [c.name for c in members if not c.ok],
        'cells': [c.name for c in members],
        'dice_per_image': results_lib.mean_std(_per_frame(done, 'dice')),
        'dice_run_means': results_lib.mean_std(
            c.results['per_set']['per_image']['dice_all']['mean'] for c in done),
        'apd_good_mm_over_cases': results_lib.mean_std(_per_case(done, 'apd_good_mm')),
        'good_pct_over_cases': results_lib.mean_std(_per_case(done, 'good_pct')),
    })
  return {
      'group_by': list(group_by),
      'groups': groups,
      'cells': [{'name': c.name, 'dir': os.path.basename(c.workdir), 'status': c.status,
                 'overrides': to_plain(c.overrides), 'seconds': c.seconds,
                 'error': c.error.strip().splitlines()[-1] if c.error else None}
                for c in cells],
  }


def _fmt(ms: Mapping[str, Any], digits: int) -> str:
  if not math.isfinite(ms['mean']):
    return 'n/a'
  std = f"{ms['std']:.{digits}f}" if math.isfinite(ms['std']) else 'n/a'
  return f"{ms['mean']:.{digits}f} ± {std}"


def results_table(cells: Sequence[CellResult], group_by: Sequence[str] | None = None) -> str:
  """Markdown comparison table, one row per group, with the definitions under it.

  Cells that did not finish are named under the table (their group's `runs` excludes them).
  """
  summary = summarize(cells, group_by)
  keys = summary['group_by']
  header = keys + ['runs', 'Dice, per image (all frames)', 'Dice, over runs',
                   'APD (mm), over cases (good contours)', 'good contours (%), over cases']
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '---|' * len(keys) + '---:|' * (len(header) - len(keys))]
  for g in summary['groups']:
    row = [g['group'][k] for k in keys] + [
        str(g['runs']),
        f"{_fmt(g['dice_per_image'], 3)} (n={g['dice_per_image']['n']})",
        _fmt(g['dice_run_means'], 3),
        f"{_fmt(g['apd_good_mm_over_cases'], 2)} (n={g['apd_good_mm_over_cases']['n']})",
        f"{_fmt(g['good_pct_over_cases'], 1)} (n={g['good_pct_over_cases']['n']})",
    ]
    lines.append('| ' + ' | '.join(row) + ' |')
  lines += [
      '',
      'mean ± std (ddof=1); n = values averaged. *Dice, per image*: every evaluated frame of '
      'every run (undetected frames as 0). *Dice, over runs*: the runs\' per-image means '
      '(spread over seeds/folds). *APD* (average perpendicular distance, 2009 challenge '
      'protocol) and *good contours* (APD < the good-contour threshold): per case, then over '
      'the (run, case) pairs, as the challenge reported them; cases without a good contour '
      'have no APD. "—": the override does not apply to that row (e.g. the IBN mode of a '
      'U-Net) and the base config\'s value was used.',
  ]
  not_done = [c for c in summary['cells'] if c['status'] not in ('finished', 'skipped')]
  if not_done:
    lines += ['', 'Cells without results (not in the table):', '']
    lines += [f"* `{c['name']}`: {c['status']}" + (f" ({c['error']})" if c['error'] else '')
              for c in not_done]
  return '\n'.join(lines) + '\n'


def boxplot(cells: Sequence[CellResult], out_png: str,
            group_by: Sequence[str] | None = None) -> str:
  """Box plots of per-image Dice (all frames) and APD (detected frames) per group."""
  group_by = tuple(default_group_by(cells) if group_by is None else group_by)
  groups = _groups(cells, group_by)
  labels = [f"{' / '.join(key) if key else 'all'}\n({sum(c.ok for c in members)} run"
            f"{'' if sum(c.ok for c in members) == 1 else 's'})" for key, members in groups]
  panels = [('Dice per image (all frames)', 'dice'), ('APD per image, mm (detected frames)',
                                                       'apd_mm')]
  width = max(6.0, 1.1 * len(groups) * len(panels) + 2)
  fig = Figure(figsize=(width, 4.2))
  axes = fig.subplots(1, len(panels), squeeze=False)
  for ax, (title, metric) in zip(axes[0], panels):
    data = [results_lib.finite(_per_frame(members, metric)) for _, members in groups]
    # An empty box would make matplotlib drop the group; show it as 'no data' instead.
    positions = [i + 1 for i, d in enumerate(data) if d.size]
    if positions:
      ax.boxplot([d for d in data if d.size], positions=positions, widths=0.6,
                 showmeans=True, flierprops={'markersize': 2})
    for i, d in enumerate(data):
      if not d.size:
        ax.text(i + 1, 0.5, 'no data', ha='center', va='center', rotation=90,
                transform=ax.get_xaxis_transform(), color='gray')
    ax.set_xticks(range(1, len(groups) + 1))
    ax.set_xticklabels(labels, rotation=20 if len(groups) > 3 else 0, ha='right'
                       if len(groups) > 3 else 'center', fontsize=8)
    ax.set_xlim(0.4, len(groups) + 0.6)
    ax.set_title(title, fontsize=10)
    ax.grid(axis='y', alpha=0.3)
    if metric == 'dice':
      ax.set_ylim(-0.02, 1.02)
  if group_by:
    fig.suptitle(' / '.join(group_by), fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  fig.savefig(out_png, dpi=110)
  return out_png


def describe_setting(base_config: ml_collections.ConfigDict,
                     cells: Sequence[CellResult]) -> str:
  """One paragraph: scale, training length, split and seeds of the grid (for results.md)."""
  m, d, t = base_config.model, base_config.data, base_config.train
  length = (f'{t.num_steps} steps' if t.num_steps > 0 else f'{t.num_epochs} epochs')
  if d.split == 'kfold':
    split = (f'{d.num_folds}-fold patient-level cross-validation over '
             f'{"+".join(d.kfold_sets)} (kfold_seed {d.kfold_seed})')
  else:
    split = f'official (train on {"+".join(d.train_sets)}, evaluate on {"+".join(d.eval_sets)})'
  frames = ''
  for cell in cells:
    path = os.path.join(cell.workdir, 'split.json')
    if cell.ok and os.path.exists(path):
      with open(path) as f:
        s = json.load(f)
      frames = (f' ({len(s["train_cases"])} cases / {s["train_frames"]} frames train, '
                f'{len(s["eval_cases"])} cases / {s["eval_frames"]} frames eval in '
                f'`{cell.name}`)')
      break
  seeds = sorted({c.overrides.get('seed', base_config.seed) for c in cells})
  folds = sorted({c.overrides['data.fold'] for c in cells if 'data.fold' in c.overrides})
  seeds_s = f'{len(seeds)} seed{"s" if len(seeds) > 1 else ""} ({", ".join(map(str, seeds))})'
  folds_s = f', folds {", ".join(map(str, folds))}' if folds else ''
  return (f'Scale: {d.image_size}x{d.image_size} images, base width {m.base_width}, depth '
          f'{m.depth}; {length}, batch {t.batch_size}, {t.optimizer} lr {t.learning_rate:g}. '
          f'Split: {split}{frames}. {seeds_s}{folds_s} per row. Good contour: APD < '
          f'{base_config.eval.good_apd_mm:g} mm.')


def write_report(cells: Sequence[CellResult], workdir: str,
                 base_config: ml_collections.ConfigDict | None = None,
                 group_by: Sequence[str] | None = None) -> dict[str, str]:
  """Writes `results.md` (setting + table), `results.json` and `boxplot.png` into `workdir`.

  Returns:
    {'markdown': path, 'json': path, 'boxplot': path}.
  """
  os.makedirs(workdir, exist_ok=True)
  summary = summarize(cells, group_by)
  lines = ['# Ablation results', '']
  if base_config is not None:
    summary['setting'] = describe_setting(base_config, cells)
    lines += [summary['setting'], '']
  lines.append(results_table(cells, group_by))
  paths = {'markdown': os.path.join(workdir, 'results.md'),
           'json': os.path.join(workdir, 'results.json'),
           'boxplot': os.path.join(workdir, 'boxplot.png')}
  with open(paths['markdown'], 'w') as f:
    f.write('\n'.join(lines))
  with open(paths['json'], 'w') as f:
    json.dump(results_lib.to_jsonable(summary), f, indent=2, allow_nan=False)
  boxplot(cells, paths['boxplot'], group_by)
  return paths


