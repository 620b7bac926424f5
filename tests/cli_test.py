"""What a user meets on the command line: which config fields evaluate and predict take from
where, damaged checkpoints, config validation, metrics.jsonl on resume, skipped inputs in the
predict summary, signals and exit codes."""

import copy
import csv
import gc
import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lvseg_jax import checkpointing
from lvseg_jax import cli
from lvseg_jax import config_check
from lvseg_jax import data
from lvseg_jax import evaluate
from lvseg_jax import predict
from lvseg_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def trained(smoke_run):
  """The session's smoke run (checkpoints at steps 3, 6 and 8), evaluated at its latest step."""
  config, workdir, _ = smoke_run
  config = copy.deepcopy(config)
  config.eval.checkpoint = 'latest'
  return config, workdir


def _copy(workdir, tmp_path):
  target = str(tmp_path / 'copy')
  shutil.copytree(workdir, target)
  return target


# ------------------------------------------------------------------- evaluate: one rule


def test_evaluate_takes_the_spacing_table_from_the_command_line(trained, tmp_path):
  config, workdir = trained
  nominal = evaluate.evaluate_checkpoint(copy.deepcopy(config), workdir)
  table = tmp_path / 'spacing.csv'
  cases = data.get_official_set('validation')
  table.write_text('case,pixel_spacing_mm\n' + ''.join(f'{c},2.5\n' for c in cases))
  scaled_config = copy.deepcopy(config)
  scaled_config.data.spacing_table = str(table)
  scaled = evaluate.evaluate_checkpoint(scaled_config, workdir, ['data.spacing_table'])
  assert {f['spacing_source'] for f in scaled['per_frame']} == {'table'}
  # Isotropic spacing scales every distance of the APD geometry by the same factor.
  factor = 2.5 / config.data.nominal_spacing_mm
  pairs = [(a['apd_mm'], b['apd_mm']) for a, b in zip(nominal['per_frame'], scaled['per_frame'])
           if a['apd_mm'] is not None]
  assert pairs
  np.testing.assert_allclose([b for _, b in pairs], [a * factor for a, _ in pairs], rtol=1e-9)
  assert os.path.exists(os.path.join(workdir, 'eval_latest_validation_png_spacing-spacing.json'))


def test_evaluate_takes_the_data_source_from_the_command_line(trained):
  config, workdir = trained
  dicom_config = copy.deepcopy(config)
  dicom_config.data.source = 'dicom'
  results = evaluate.evaluate_checkpoint(dicom_config, workdir, ['data.source'])
  # Of the validation cases, the staged DICOM copy has SC-HF-I-05 and SC-HF-I-06.
  assert {f['case'] for f in results['per_frame']} == {'SC-HF-I-05', 'SC-HF-I-06'}
  assert {f['spacing_source'] for f in results['per_frame']} == {'dicom'}
  with open(os.path.join(workdir, 'eval_latest_validation_dicom.json')) as f:
    assert json.load(f)['evaluated']['source'] == 'dicom'


def test_overriding_a_trained_field_in_evaluate_is_an_error(trained):
  config, workdir = trained
  wider = copy.deepcopy(config)
  wider.model.base_width = 8
  with pytest.raises(ValueError, match=r'--config.model.base_width=8.*trained with '
                                       r'model.base_width=4.*come from the workdir'):
    evaluate.evaluate_checkpoint(wider, workdir, ['model.base_width'])
  # Not given on the command line: the workdir's value is used, silently and correctly.
  assert evaluate.evaluate_checkpoint(wider, workdir)['per_frame']


def test_evaluate_loads_only_the_cases_it_scores(trained, data_root, tmp_path):
  """A corrupt image of a training case does not stop an evaluation of the validation set."""
  config, workdir = trained
  root = tmp_path / 'scd'
  shutil.copytree(os.path.join(data_root, 'derived_png_meow2'), root / 'derived_png_meow2')
  bad = sorted(glob.glob(str(root / 'derived_png_meow2' / 'images' / 'SC-HF-I-01-*.png')))[0]
  with open(bad, 'wb') as f:
    f.write(b'not a png')
  local = copy.deepcopy(config)
  local.data.root = str(root)
  results = evaluate.evaluate_checkpoint(local, workdir, ['data.root'])
  assert 'SC-HF-I-01' not in {f['case'] for f in results['per_frame']}
  local.eval.split = 'training'   # ...while scoring the training set meets it
  with pytest.raises(data.DataError, match='SC-HF-I-01'):
    evaluate.evaluate_checkpoint(local, workdir, ['data.root'])


# ------------------------------------------------------------------- damaged checkpoints


@pytest.fixture
def _collect_orbax_leftovers():
  """A failed orbax restore leaves TensorStore read coroutines (holding nothing of ours) that
  Python reports when they are collected: collect them in this test's teardown, under its
  filter, not at some later test's."""
  yield
  gc.collect()


def _orbax_leftovers(test):
  test = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')(test)
  return pytest.mark.usefixtures('_collect_orbax_leftovers')(test)


def _truncate_files(folder):
  files = [p for p in glob.glob(os.path.join(folder, '**', '*'), recursive=True)
           if os.path.isfile(p)]
  assert files, folder
  for path in files:
    with open(path, 'r+b') as f:
      f.truncate(max(os.path.getsize(path) // 3, 1))


@_orbax_leftovers
def test_resume_falls_back_to_the_newest_intact_checkpoint(trained, tmp_path, caplog):
  config, workdir = trained
  work = _copy(workdir, tmp_path)
  _truncate_files(os.path.join(work, 'checkpoints', '8', 'state', 'ocdbt.process_0', 'd'))
  longer = copy.deepcopy(config)
  longer.train.num_steps = 10
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(longer, work)
  assert any('[8] could not be read' in r.getMessage() and 'from step 6' in r.getMessage()
             for r in caplog.records)
  records = [json.loads(line) for line in open(os.path.join(work, 'metrics.jsonl'))]
  assert [r['step'] for r in records if r['split'] == 'train'] == list(range(1, 11))


@_orbax_leftovers
def test_damaged_checkpoint_without_fallback_names_step_and_folder(trained, tmp_path):
  config, workdir = trained
  work = _copy(workdir, tmp_path)
  _truncate_files(os.path.join(work, 'checkpoints', '8', 'state', 'ocdbt.process_0', 'd'))
  strict = copy.deepcopy(config)
  strict.train.num_steps = 10
  strict.train.resume_fallback = False
  with pytest.raises(checkpointing.CheckpointError) as error:
    train.train_and_evaluate(strict, work)
  message = str(error.value)
  assert os.path.join(work, 'checkpoints', '8') in message and 'step 8' in message
  assert 'resume_fallback' in message


@_orbax_leftovers
def test_damaged_best_checkpoint_in_evaluate_names_the_folder(trained, tmp_path):
  config, workdir = trained
  work = _copy(workdir, tmp_path)
  (step,) = os.listdir(os.path.join(work, 'best'))
  with open(os.path.join(work, 'best', step, 'state', '_METADATA'), 'r+b') as f:
    f.truncate(10)
  best = copy.deepcopy(config)
  best.eval.checkpoint = 'best'
  with pytest.raises(checkpointing.CheckpointError,
                     match=rf'{os.path.join(work, "best", step)}.*checkpoint=latest'):
    evaluate.evaluate_checkpoint(best, work)


# ------------------------------------------------------------------- config, resume log


@pytest.mark.parametrize('key,value', [('train.batch_size', 0), ('train.batch_size', -4),
                                       ('eval.batch_size', 0), ('predict.batch_size', 0),
                                       ('train.num_steps', 0), ('data.fold', 7),
                                       ('model.depth', 0), ('train.learning_rate', -1.0),
                                       ('model.deep_supervision', 9),
                                       ('model.deep_supervision', -1)])
def test_every_size_field_is_checked_up_front(tiny_config, tmp_path, key, value):
  config = tiny_config()
  section, field = key.split('.')
  config[section][field] = value
  with pytest.raises(config_check.ConfigError, match=rf'^config\.{key}={value}: must'):
    train.train_and_evaluate(config, str(tmp_path / 'never'))
  assert not os.path.exists(tmp_path / 'never')   # stopped before anything was written


def test_resume_cuts_metrics_back_to_the_restored_step(trained, tmp_path):
  """As if killed after logging step 8 but before its checkpoint: resume logs 7-8 once."""
  config, workdir = trained
  work = _copy(workdir, tmp_path)
  shutil.rmtree(os.path.join(work, 'checkpoints', '8'))
  train.train_and_evaluate(copy.deepcopy(config), work)
  records = [json.loads(line) for line in open(os.path.join(work, 'metrics.jsonl'))]
  assert [r['step'] for r in records if r['split'] == 'train'] == list(range(1, 9))
  assert [r['step'] for r in records if r['split'] == 'eval'] == [4, 8]


# ------------------------------------------------------------------- predict: nothing vanishes


def test_skipped_and_constant_inputs_are_listed_in_the_predict_summary(trained, data_root,
                                                                       tmp_path):
  config, workdir = trained
  series = tmp_path / 'series'
  shutil.copytree(os.path.join(data_root, 'SCD_IMAGES_01', 'SCD0000201', 'CINESAX_300'), series)
  dicoms = sorted(glob.glob(str(series / '*.dcm')))
  with open(dicoms[0], 'wb') as f:
    f.write(b'\0' * 200)
  run = copy.deepcopy(config)
  run.predict.on_error = 'skip'
  run.predict.save_overlays = run.predict.save_nifti = False
  output = str(tmp_path / 'out')
  predict.predict(run, workdir, str(series), output)
  with open(os.path.join(output, 'summary.json')) as f:
    index = json.load(f)
  assert [s['path'] for s in index['skipped']] == [dicoms[0]]
  assert 'not a DICOM file' in index['skipped'][0]['problem']
  with open(os.path.join(output, 'summary.csv'), newline='') as f:
    rows = list(csv.DictReader(f))
  assert rows[-1]['note'].startswith(f'skipped {dicoms[0]}: ')
  # A plain PNG folder has no slices: the summary says why there are no volumes.
  pngs = tmp_path / 'pngs'
  pngs.mkdir()
  Image.fromarray(np.full((64, 64), 7, np.uint8)).save(pngs / 'a.png')
  Image.fromarray((np.arange(64 * 64) % 251).reshape(64, 64).astype(np.uint8)).save(
      pngs / 'b.png')
  (found,) = predict.find_series(str(pngs), run)
  assert any('1 frame(s) hold one constant value (IM-0001-0001)' in w for w in found.warnings)
  summaries = predict.predict(run, workdir, str(pngs), str(tmp_path / 'out_png'))
  assert summaries[0]['volumes_missing'] == 'the frames have no slice/phase information'
  with open(os.path.join(tmp_path, 'out_png', 'summary.csv'), newline='') as f:
    assert list(csv.DictReader(f))[0]['note'] == ('no volumes: the frames have no slice/phase '
                                                  'information')


# ------------------------------------------------------------------- signals, exit codes


def test_user_errors_print_one_line_and_exit_2(tmp_path):
  done = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/smoke.py', '--config.train.batch_size=0',
       f'--workdir={tmp_path}'], cwd=REPO, capture_output=True, text=True, timeout=300,
      check=False)
  assert done.returncode == cli.EXIT_USER_ERROR
  assert done.stderr.strip().splitlines()[-1] == (
      'error: config.train.batch_size=0: must be a positive integer.')
  assert 'Traceback' not in done.stderr


def test_the_command_line_loads_training_code_only_for_train_and_evaluate():
  """Predict's start-up pays for what predict runs: loading the command line (as `main.py`
  and `lvseg` do) leaves the training and evaluation modules and their imports unloaded."""
  heavy = ('lvseg_jax.train', 'lvseg_jax.evaluate', 'optax', 'matplotlib')
  code = (f'import sys; from lvseg_jax import cli; '
          f'print(sorted(m for m in {heavy!r} if m in sys.modules))')
  done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        timeout=300, check=False, env=dict(os.environ, PYTHONPATH=REPO))
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip().splitlines()[-1] == '[]'


def test_a_predict_bug_is_reraised_without_loading_training_code():
  """In a fresh interpreter (as a predict run is), `exit_code` re-raises a bug as it is and
  leaves `lvseg_jax.train` unloaded: only a loaded train module can have raised `Stopped`."""
  code = ('import sys; from lvseg_jax import cli\n'
          'try:\n'
          "  cli.exit_code(RuntimeError('a bug'), show_traceback=False)\n"
          'except RuntimeError as e:\n'
          "  print(repr(e), 'lvseg_jax.train' in sys.modules)\n")
  done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        timeout=300, check=False, env=dict(os.environ, PYTHONPATH=REPO))
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip().splitlines()[-1] == "RuntimeError('a bug') False"


def test_sigterm_during_data_loading_stops_before_step_one(tiny_config, tmp_path, monkeypatch):
  load = train.data_lib.load_datasets

  def load_then_signal(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)   # arrives while the data loads
    return load(*args, **kwargs)

  monkeypatch.setattr(train.data_lib, 'load_datasets', load_then_signal)
  with pytest.raises(train.Stopped) as stopped:
    train.train_and_evaluate(tiny_config(num_steps=4), str(tmp_path / 'w'))
  assert stopped.value.step is None
  assert cli.exit_code(stopped.value, show_traceback=False) == 128 + signal.SIGTERM == 143


def test_sigint_during_training_saves_then_exits_130(tiny_config, tmp_path, monkeypatch):
  make = train.make_train_step

  def signalling_step(*args, **kwargs):
    step_fn, calls = make(*args, **kwargs), []

    def step(*a):
      calls.append(1)
      if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGINT)
      return step_fn(*a)

    return step

  monkeypatch.setattr(train, 'make_train_step', signalling_step)
  config = tiny_config(num_steps=6, checkpoint_every_steps=100)
  config.train.eval_every_epochs = 1000
  workdir = str(tmp_path / 'w')
  with pytest.raises(train.Stopped) as stopped:
    train.train_and_evaluate(config, workdir)
  assert stopped.value.step == 2
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['2']
  assert cli.exit_code(stopped.value, show_traceback=False) == 130


def test_second_predict_reads_the_forward_pass_from_the_compilation_cache(data_root, tmp_path):
  """predict turns on JAX's persistent compilation cache (`config.compilation_cache_dir`): the
  second run loads the compiled forward pass instead of compiling it (JAX logs the hit)."""
  command = [sys.executable, 'main.py', '--mode=predict', '--verbosity=1',
             f'--input={os.path.join(data_root, "SCD_IMAGES_01", "SCD0000201")}',
             f'--config.compilation_cache_dir={tmp_path / "xla"}']
  logs = []
  for run in (1, 2):
    done = subprocess.run(command + [f'--output={tmp_path / f"out{run}"}'], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    logs.append(done.stderr)
  hit = "Persistent compilation cache hit for 'jit_forward'"
  assert hit not in logs[0] and hit in logs[1]
  assert glob.glob(str(tmp_path / 'xla' / 'jit_forward-*'))
