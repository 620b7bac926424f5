"""lvseg-jax command line: train, evaluate, predict or summarize a model.

  python main.py --config=configs/ibu.py --workdir=runs/ibu                  # train + evaluate
  python main.py --config=configs/ibu.py --workdir=runs/ibu --mode=evaluate
  python main.py --mode=predict --input=path/to/dicom_series --output=out/   # shipped model
  python main.py --mode=predict --workdir=runs/ibu --input=... --output=...  # your model
  python main.py --config=configs/ibu.py --mode=summary

Config fields are overridden with `--config.section.field=value`, e.g.
`--config.data.root=/data/scd --config.model.base_width=16`. User errors print one line and
exit with 2 (`--verbosity=1` shows the traceback); a run stopped by SIGINT / SIGTERM exits
with 130 / 143 after saving. The flags and exit codes live in lvseg_jax/cli.py, which is also
the installed `lvseg` command.
"""

from absl import app
from absl import flags

from lvseg_jax import cli

if __name__ == '__main__':
  cli.define_flags()
  flags.adopt_module_key_flags(cli)   # --helpshort lists them
  app.run(cli.main)
