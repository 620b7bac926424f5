"""Agreement of predicted EDV, ESV, EF and LV mass with the expert's, under cross-validation.

  python ablate.py --config=configs/clinical_cpu.py --workdir=runs/clinical_cv \
      --grid='{"model.name": ["ibu"]}' --folds=0,1,2,3,4
  python agreement.py --workdir=runs/clinical_cv [--tta=flips]
  python agreement.py --workdir=runs/cv_a,runs/cv_b --output=runs/ensemble   # same folds

Each case is measured by the fold run that held it out (lvseg_jax.agreement), and the contours
predict writes are scored by the challenge protocol on the held-out frames. Writes
`<workdir>/agreement.md`, `agreement.json` and `agreement_bland_altman.png`.
"""

from absl import app
from absl import flags

FLAGS = flags.FLAGS

flags.DEFINE_list('workdir', None, 'Folder of the k-fold runs (ablate.py --folds=...); several '
                  'folders of the same folds, comma separated: each case by their ensemble.')
flags.DEFINE_string('output', None, 'Where to write the results (default: --workdir; required '
                    'for an ensemble).')
flags.DEFINE_enum('checkpoint', 'latest', ['latest', 'best'], "Each fold's final model "
                  "(latest), or its checkpoint with the best Dice on its held-out cases (best: "
                  'chosen on the cases it then measures, so optimistic).')
flags.DEFINE_string('tta', 'none', 'Test-time augmentation of every fold model: none | lr | '
                    'flips | d4 (lvseg_jax.predict.inference.TTA_TRANSFORMS); only for models '
                    'trained with flip augmentation.')
flags.DEFINE_string('localizer', None, "For resize_mode='roi' fold runs: a k-fold folder of "
                    'the same folds whose runs find the LV (each case by the run that held it '
                    "out); default: each run's data.roi_localizer.")
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from lvseg_jax import agreement  # pylint: disable=g-import-not-at-top
  from lvseg_jax import checkpointing  # pylint: disable=g-import-not-at-top
  checkpointing.quiet_orbax_logging()
  try:
    agreement.run_agreement(FLAGS.workdir, FLAGS.output, FLAGS.checkpoint, FLAGS.tta,
                            FLAGS.localizer)
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(str(e)) from e


if __name__ == '__main__':
  app.run(main)
