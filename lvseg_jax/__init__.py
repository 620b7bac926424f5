"""lvseg-jax: left-ventricle segmentation of short-axis cine MRI in JAX/Flax.

`Segmenter` segments images and cines with a shipped or trained model; the command line is
`main.py` (or the installed `lvseg` command).
"""

__version__ = '0.3.0'


def __getattr__(name: str):
  # Imported on first use: `import lvseg_jax.data` etc. stay free of the model stack.
  if name in ('Segmenter', 'Segmentation', 'SeriesResult'):
    from lvseg_jax import segmenter  # pylint: disable=g-import-not-at-top
    return getattr(segmenter, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
