"""Models shipped with the package, one folder each: `lvseg_jax/pretrained/<name>/`.

A folder holds config.json and variables.npz (`checkpointing.export_model`) and MODEL.md: the
commands that produced it, the data files' hash and its cross-validation figures. Any
function that takes a training workdir takes one of these folders.
"""

import os

# The model `--mode=predict` and `Segmenter.pretrained()` use when none is named.
DEFAULT = 'ibu3-cpu'
ROOT = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
  """The shipped models' names, sorted."""
  return sorted(n for n in os.listdir(ROOT)
                if os.path.exists(os.path.join(ROOT, n, 'variables.npz')))


def path(name: str = DEFAULT) -> str:
  """The folder of the shipped model `name`.

  Raises:
    ValueError: no shipped model of that name (the message lists them).
  """
  folder = os.path.join(ROOT, name)
  if not name or name not in names():
    raise ValueError(f'No shipped model {name!r}; choose one of {names()} or train one and '
                     'pass its --workdir.')
  return folder
