"""Case splits: the official 2009 challenge sets and patient-level, stratified k-fold."""

import collections
from typing import Any, Sequence

from absl import logging
import numpy as np

from lvseg_jax.data import sources
from lvseg_jax.data.records import DataError, case_group, normalize_case_id, root_dir

# Official 2009 MICCAI LV Segmentation Challenge split (SPLITS.md), contour-folder names.
OFFICIAL_SETS = {
    'training': (
        'SC-HF-I-01', 'SC-HF-I-02', 'SC-HF-I-04', 'SC-HF-I-40', 'SC-HF-NI-03', 'SC-HF-NI-04',
        'SC-HF-NI-34', 'SC-HF-NI-36', 'SC-HYP-01', 'SC-HYP-03', 'SC-HYP-38', 'SC-HYP-40',
        'SC-N-02', 'SC-N-03', 'SC-N-40'),
    'validation': (
        'SC-HF-I-05', 'SC-HF-I-06', 'SC-HF-I-07', 'SC-HF-I-08', 'SC-HF-NI-07', 'SC-HF-NI-11',
        'SC-HF-NI-31', 'SC-HF-NI-33', 'SC-HYP-06', 'SC-HYP-07', 'SC-HYP-08', 'SC-HYP-37',
        'SC-N-05', 'SC-N-06', 'SC-N-07'),
    'online': (
        'SC-HF-I-09', 'SC-HF-I-10', 'SC-HF-I-11', 'SC-HF-I-12', 'SC-HF-NI-12', 'SC-HF-NI-13',
        'SC-HF-NI-14', 'SC-HF-NI-15', 'SC-HYP-09', 'SC-HYP-10', 'SC-HYP-11', 'SC-HYP-12',
        'SC-N-09', 'SC-N-10', 'SC-N-11'),
}
# Set name meaning "every case present in the data" (for data outside the official lists).
ALL_CASES = 'all'


def get_official_set(name: str) -> tuple[str, ...]:
  """Case list of an official challenge set ('training', 'validation', 'online')."""
  if name not in OFFICIAL_SETS:
    raise ValueError(f'Unknown SCD set {name!r}; choices: {sorted(OFFICIAL_SETS)} or '
                     f'{ALL_CASES!r}')
  return OFFICIAL_SETS[name]


def _resolve_sets(names: Sequence[str] | str, available: set[str]) -> dict[str, list[str]]:
  """Set name -> its cases (`'all'` -> every available case); names validated."""
  if isinstance(names, str):
    names = [n for n in names.replace(',', ' ').split() if n]
  resolved = {}
  for name in names:
    resolved[name] = sorted(available) if name == ALL_CASES else list(get_official_set(name))
  return resolved


def kfold_assignments(cases: Sequence[str], num_folds: int, seed: int = 0,
                      groups: dict[str, str] | None = None) -> dict[str, int]:
  """Patient-level folds: case -> fold in [0, num_folds).

  Cases are shuffled (seeded) within their pathology group (`groups[case]`, default the SCD
  name's group) and dealt round-robin across groups, so fold sizes differ by at most one and
  each fold gets a share of every group.
  """
  cases = sorted(set(cases))
  if num_folds < 2:
    raise ValueError(f'num_folds must be >= 2, got {num_folds}')
  if len(cases) < num_folds:
    raise ValueError(f'{len(cases)} case(s) cannot fill {num_folds} folds')
  rng = np.random.default_rng(seed)
  by_group = collections.defaultdict(list)
  for case in cases:
    by_group[groups[case] if groups else case_group(case)].append(case)
  assignment, position = {}, 0
  for group in sorted(by_group):
    members = by_group[group]
    for k in rng.permutation(len(members)):
      assignment[members[k]] = position % num_folds
      position += 1
  return assignment


def case_splits(data_config: Any, available: Sequence[str] | None = None) -> dict[str, list[str]]:
  """Train / eval case lists for `config.data.split` (official | kfold), with a missing report.

  Official: train = union of `train_sets`, eval = union of `eval_sets` (official set names or
  'all'). K-fold: the cases of `kfold_sets` present in the data are split into `num_folds`
  patient-level folds; fold `fold` is eval, the rest train. Either way the cases of
  `train_exclude` then leave train (the folds stay as they were, so results compare).

  Args:
    data_config: `config.data`.
    available: cases present in the data; default: scanned from the file names.

  Returns:
    {'train': [...], 'eval': [...], 'excluded': `train_exclude` cases taken out of train,
     'unassigned': cases in the data but in neither (nor excluded),
     'missing:<set>': cases an official set names that the data lacks (all three sets),
     and for k-fold 'fold:<k>': the cases of each fold}.

  Raises:
    ValueError: unknown split or set name, train and eval sharing cases, bad fold settings,
      a `train_exclude` case not in the data.
    DataError: a requested set none of whose cases are in the data.
  """
  split = data_config.split
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; choices: {sorted(SPLITS)}')
  if available is None:
    available = sources.available_cases(data_config)
  available = {normalize_case_id(c) for c in available}
  result = SPLITS[split](data_config, available)
  exclude = {normalize_case_id(c) for c in data_config.train_exclude}
  if exclude - available:   # most likely a typo: fail rather than train on the case
    raise ValueError(f'data.train_exclude names case(s) not in the {data_config.source} data: '
                     f'{sorted(exclude - available)}')
  result['excluded'] = [c for c in result['train'] if c in exclude]
  result['train'] = [c for c in result['train'] if c not in exclude]
  for name, cases in OFFICIAL_SETS.items():
    result[f'missing:{name}'] = [c for c in cases if c not in available]
  used = set(result['train']) | set(result['eval']) | set(result['excluded'])
  result['unassigned'] = sorted(available - used)
  return result


def _present(data_config: Any, sets: dict[str, list[str]], available: set[str],
             role: str) -> list[str]:
  """Present cases of the requested sets (ordered, unique); warns on gaps, fails on none."""
  cases = []
  for name, members in sets.items():
    present = [c for c in members if c in available]
    if not present:
      raise DataError(root_dir(data_config), f'{role} set {name!r} was requested but none of its '
                      f'{len(members)} cases are in the {data_config.source} data')
    missing = [c for c in members if c not in available]
    if missing:
      logging.warning('%s set %r: %d of %d cases are not in the data: %s', role, name,
                      len(missing), len(members), missing)
    cases.extend(c for c in present if c not in cases)
  return cases


def _official_split(data_config: Any, available: set[str]) -> dict[str, list[str]]:
  train_sets = _resolve_sets(data_config.train_sets, available)
  eval_sets = _resolve_sets(data_config.eval_sets, available)
  train = _present(data_config, train_sets, available, 'train')
  # No eval sets: train on everything (a final model); nothing is evaluated.
  evaluate = _present(data_config, eval_sets, available, 'eval') if eval_sets else []
  shared = sorted(set(train) & set(evaluate))
  if shared:
    raise ValueError(f'train_sets {list(train_sets)} and eval_sets {list(eval_sets)} share '
                     f'{len(shared)} case(s): {shared}')
  return {'train': train, 'eval': evaluate}


def _kfold_split(data_config: Any, available: set[str]) -> dict[str, list[str]]:
  pool = _present(data_config, _resolve_sets(data_config.kfold_sets, available),
                  available, 'kfold')
  num_folds, fold = int(data_config.num_folds), int(data_config.fold)
  if not 0 <= fold < num_folds:
    raise ValueError(f'fold must be in [0, {num_folds}), got {fold}')
  source = sources.get_source(data_config.source)
  folds = kfold_assignments(pool, num_folds, int(data_config.kfold_seed),
                            source.groups(data_config) if source.groups else None)
  result = {'train': [c for c in pool if folds[c] != fold],
            'eval': [c for c in pool if folds[c] == fold]}
  for k in range(num_folds):
    result[f'fold:{k}'] = [c for c in pool if folds[c] == k]
  return result


SPLITS = {'official': _official_split, 'kfold': _kfold_split}