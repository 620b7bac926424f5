"""The training loop end to end on the real data: logs, checkpoints, resume, NaN stop, eval."""

import json
import os
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lvseg_jax import checkpointing
from lvseg_jax import data
from lvseg_jax import evaluate
from lvseg_jax import train


def _latest_params(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step()
  state = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))['state']
  return step, state


@pytest.fixture(scope='module')
def trained_run(tiny_config, tmp_path_factory):
  """One smoke training run shared by the tests below (4 steps, then evaluation)."""
  tmp_path = tmp_path_factory.mktemp('run')
  # Data-parallel over 2 devices with the shard_map step, on real batches.
  config = tiny_config(tmp_path, num_steps=4, checkpoint_every_steps=2,
                       num_devices=2, parallel='shard_map')
  workdir = str(tmp_path / 'work')
  results = train.train_and_evaluate(config, workdir)
  return config, workdir, results


def test_training_on_real_data_logs_finite_losses_and_writes_outputs(trained_run):
  config, workdir, results = trained_run
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  train_records = [r for r in records if r['split'] == 'train']
  assert [r['step'] for r in train_records] == [1, 2, 3, 4]
  assert all(np.isfinite(r['loss']) and r['images_per_sec'] > 0 for r in train_records)
  assert any(r['split'] == 'eval' for r in records)
  for name in ('config.json', 'split.json', 'training_curves.png', 'val_overlays.png',
               'eval_validation.json', 'eval_validation.md'):
    assert os.path.exists(os.path.join(workdir, name)), name
  with open(os.path.join(workdir, 'split.json')) as f:
    split = json.load(f)
  # The split the run used: the official sets, as SPLITS.md lists them, with frame counts.
  assert split['split'] == 'official' and split['train_sets'] == ['training']
  assert split['train_cases'] == list(data.get_official_set('training'))
  assert split['eval_cases'] == list(data.get_official_set('validation'))
  assert split['train_frames'] + split['eval_frames'] == 526   # the PNG copy's 526 frames
  # Evaluated on every validation frame, at the original resolution.
  with open(os.path.join(workdir, 'eval_validation.json')) as f:
    written = json.load(f)
  assert len(written['per_frame']) == len(results['per_frame']) > 100
  cases = {f['case'] for f in written['per_frame']}
  assert 'SC-HF-I-05' in cases and 'SC-HF-I-01' not in cases
  step, state = _latest_params(workdir)
  assert step == 4 and state['batch_stats']


def test_evaluate_mode_scores_the_saved_checkpoint(trained_run, data_root):
  config, workdir, results = trained_run
  config.eval.checkpoint = 'latest'
  again = evaluate.evaluate_checkpoint(config, workdir)
  # The final evaluation ran on the same (last) parameters, so the numbers match exactly.
  assert [f['dice'] for f in again['per_frame']] == [f['dice'] for f in results['per_frame']]
  assert os.path.exists(os.path.join(workdir, 'eval_latest_validation_png.md'))


def test_stopped_and_resumed_run_equals_uninterrupted_run(tiny_config, tmp_path):
  config = tiny_config(tmp_path, num_steps=5, checkpoint_every_steps=100)
  config.train.eval_every_epochs = 1000
  full = str(tmp_path / 'full')
  train.train_and_evaluate(config, full)
  parts = str(tmp_path / 'parts')
  config.train.halt_after_steps = 2        # as if preempted after step 2
  assert train.train_and_evaluate(config, parts) == {}
  assert _latest_params(parts)[0] == 2
  config.train.halt_after_steps = -1
  train.train_and_evaluate(config, parts)  # same command: resumes
  (s1, a), (s2, b) = _latest_params(full), _latest_params(parts)
  assert s1 == s2 == 5
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize('parallel', ['jit', 'shard_map'])
def test_train_step_compiles_once_per_run_fresh_and_resumed(tiny_config, tmp_path, monkeypatch,
                                                             parallel):
  """The state enters the step with the type the step returns, so steps 2.. reuse step 1's
  executable (a state off the mesh made the second step trace and compile again)."""
  made = []
  make_train_step = train.make_train_step

  def recording(*args, **kwargs):
    made.append(make_train_step(*args, **kwargs))
    return made[-1]

  monkeypatch.setattr(train, 'make_train_step', recording)
  config = tiny_config(tmp_path, num_steps=4, checkpoint_every_steps=100, halt_after_steps=2,
                       parallel=parallel)
  config.train.eval_every_epochs = 1000
  workdir = str(tmp_path / 'work')
  train.train_and_evaluate(config, workdir)   # steps 1-2, then halts
  config.train.halt_after_steps = -1
  train.train_and_evaluate(config, workdir)   # resumes from the checkpoint: steps 3-4
  assert _latest_params(workdir)[0] == 4
  assert [step_fn._cache_size() for step_fn in made] == [1, 1]  # pylint: disable=protected-access


def test_resuming_with_a_different_optimizer_layout_is_a_clear_error(tiny_config, tmp_path):
  config = tiny_config(tmp_path, num_steps=3, checkpoint_every_steps=100, halt_after_steps=1,
                       flatten_optimizer=False)
  config.train.eval_every_epochs = 1000
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  config.train.flatten_optimizer = True
  config.train.halt_after_steps = -1
  with pytest.raises(ValueError, match='train.flatten_optimizer: False -> True') as error:
    train.train_and_evaluate(config, workdir)
  assert workdir in str(error.value)
  # The workdir still describes its own checkpoints.
  assert checkpointing.load_config(workdir).train.flatten_optimizer is False
  config.train.flatten_optimizer = False   # the run's own settings resume it
  train.train_and_evaluate(config, workdir)
  assert _latest_params(workdir)[0] == 3


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tiny_config, tmp_path):
  # Warmup starts at lr 0, so step 1 is harmless and saved; lr 1e30 then blows up.
  config = tiny_config(tmp_path, num_steps=6, checkpoint_every_steps=1,
                       learning_rate=1e30, warmup_steps=1, log_every=1)
  config.augment.enabled = False
  workdir = str(tmp_path / 'nan')
  with pytest.raises(FloatingPointError, match='last good checkpoint'):
    train.train_and_evaluate(config, workdir)
  step, state = _latest_params(workdir)
  assert step >= 1
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state['params']))


def test_sigterm_is_turned_into_a_stop_request():
  with train._StopRequested() as stop:   # pylint: disable=protected-access
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.signum == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is not stop._handle  # handler restored


def test_load_for_inference_reads_best_or_latest(trained_run):
  _, workdir, _ = trained_run
  config, variables = checkpointing.load_for_inference(workdir, 'best')
  assert config.model.name == 'ibu' and set(variables) == {'params', 'batch_stats'}
  _, latest = checkpointing.load_for_inference(workdir, 'latest')
  assert jax.tree_util.tree_structure(latest) == jax.tree_util.tree_structure(variables)
  with pytest.raises(ValueError, match='best'):
    checkpointing.load_for_inference(workdir, 'newest')
