"""The training loop end to end on the real data: logs, checkpoints, resume, NaN stop, eval."""

import copy
import json
import os
import shutil
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lvseg_jax import checkpointing
from lvseg_jax import data
from lvseg_jax import evaluate
from lvseg_jax import train

from conftest import SMOKE_STEPS_PER_EPOCH


def _latest_params(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step()
  state = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))['state']
  return step, state


def _records(workdir, split):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if r['split'] == split]


def test_training_on_real_data_logs_finite_losses_and_writes_outputs(smoke_run):
  config, workdir, results = smoke_run
  train_records = _records(workdir, 'train')
  assert [r['step'] for r in train_records] == list(range(1, 9))
  assert all(np.isfinite(r['loss']) and r['images_per_sec'] > 0 for r in train_records)
  # Evaluated at the end of each 4-step epoch.
  assert [r['step'] for r in _records(workdir, 'eval')] == [4, 8]
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
  assert split['train_frames'] // config.train.batch_size == SMOKE_STEPS_PER_EPOCH
  # Evaluated on every validation frame, at the original resolution.
  with open(os.path.join(workdir, 'eval_validation.json')) as f:
    written = json.load(f)
  assert len(written['per_frame']) == len(results['per_frame']) > 100
  cases = {f['case'] for f in written['per_frame']}
  assert 'SC-HF-I-05' in cases and 'SC-HF-I-01' not in cases
  step, state = _latest_params(workdir)
  assert step == 8 and state['batch_stats']
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))) == [3, 6, 8]


def test_evaluate_mode_scores_the_saved_checkpoint(smoke_run):
  config, workdir, results = smoke_run
  config = copy.deepcopy(config)
  config.eval.checkpoint = 'latest'
  again = evaluate.evaluate_checkpoint(config, workdir)
  # The final evaluation ran on the same (last) parameters, so the numbers match exactly.
  assert [f['dice'] for f in again['per_frame']] == [f['dice'] for f in results['per_frame']]
  assert os.path.exists(os.path.join(workdir, 'eval_latest_validation_png.md'))


def test_best_checkpoint_holds_the_best_of_the_evaluations(smoke_run):
  """best/ keeps the step whose validation Dice was highest, and evaluating it gives that Dice
  again (with best != latest that is the earlier parameters, not the last ones)."""
  config, workdir, _ = smoke_run
  dice = {r['step']: r['dice'] for r in _records(workdir, 'eval')}
  (best,) = (int(s) for s in os.listdir(os.path.join(workdir, 'best')))
  assert dice[best] == max(dice.values())
  config = copy.deepcopy(config)
  config.eval.checkpoint = 'best'
  again = evaluate.evaluate_checkpoint(config, workdir)
  assert evaluate.headline(again)['dice'] == dice[best]


def test_best_is_the_highest_dice_even_when_a_later_evaluation_is_worse(smoke_run, tmp_path):
  """Three evaluations, Dice 0.4, 0.7, 0.5: best is the second, latest the third."""
  config, workdir, _ = smoke_run
  _, variables = checkpointing.load_for_inference(workdir, 'latest')
  checkpointing.save_config(config, str(tmp_path))
  checkpointer = checkpointing.Checkpointer(str(tmp_path))
  shifted = lambda k: jax.tree_util.tree_map(lambda x: np.asarray(x) + k, variables)
  for step, dice in ((1, 0.4), (2, 0.7), (3, 0.5)):
    checkpointer.save_best(step, shifted(step), dice, {'kind': 'variables', 'step': step})
    checkpointer.save_latest(step, shifted(step), {'kind': 'variables', 'step': step})
  checkpointer.close()
  assert os.listdir(tmp_path / 'best') == ['2']
  for which, step in (('best', 2), ('latest', 3)):
    _, restored = checkpointing.load_for_inference(str(tmp_path), which)
    for got, want in zip(jax.tree_util.tree_leaves(restored),
                         jax.tree_util.tree_leaves(shifted(step))):
      np.testing.assert_array_equal(got, want)


def test_resume_from_an_earlier_checkpoint_across_an_epoch_boundary(smoke_run, smoke_copy):
  """Resumed from step 3 (3 of epoch 0's 4 batches done), the run skips those 3 batches, crosses
  into epoch 1 and ends where the uninterrupted run ended, bit for bit."""
  _, workdir, _ = smoke_run
  config, work = smoke_copy
  for step in ('6', '8'):
    shutil.rmtree(os.path.join(work, 'checkpoints', step))
  train.train_and_evaluate(config, work)
  assert [r['step'] for r in _records(work, 'train')] == list(range(1, 9))
  assert [r['step'] for r in _records(work, 'eval')] == [4, 8]
  (s1, a), (s2, b) = _latest_params(workdir), _latest_params(work)
  assert s1 == s2 == 8
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
  config = tiny_config(num_steps=4, checkpoint_every_steps=100, halt_after_steps=2,
                       parallel=parallel)
  config.train.eval_every_epochs = 1000
  workdir = str(tmp_path / 'work')
  train.train_and_evaluate(config, workdir)   # steps 1-2, then halts
  config.train.halt_after_steps = -1
  train.train_and_evaluate(config, workdir)   # resumes from the checkpoint: steps 3-4
  assert _latest_params(workdir)[0] == 4
  assert [step_fn._cache_size() for step_fn in made] == [1, 1]  # pylint: disable=protected-access


def test_resuming_with_a_different_optimizer_layout_is_a_clear_error(smoke_copy):
  config, workdir = smoke_copy
  config.train.num_steps = 9
  config.train.flatten_optimizer = False
  with pytest.raises(ValueError, match='train.flatten_optimizer: True -> False') as error:
    train.train_and_evaluate(config, workdir)
  assert workdir in str(error.value)
  # The workdir still describes its own checkpoints.
  assert checkpointing.load_config(workdir).train.flatten_optimizer is True
  config.train.flatten_optimizer = True   # the run's own settings resume it
  train.train_and_evaluate(config, workdir)
  assert _latest_params(workdir)[0] == 9


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tiny_config, tmp_path):
  # Warmup starts at lr 0, so step 1 is harmless and saved; lr 1e30 then blows up.
  config = tiny_config(num_steps=6, checkpoint_every_steps=1,
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


def test_load_for_inference_reads_best_or_latest(smoke_run):
  _, workdir, _ = smoke_run
  config, variables = checkpointing.load_for_inference(workdir, 'best')
  assert config.model.name == 'ibu' and set(variables) == {'params', 'batch_stats'}
  _, latest = checkpointing.load_for_inference(workdir, 'latest')
  assert jax.tree_util.tree_structure(latest) == jax.tree_util.tree_structure(variables)
  with pytest.raises(ValueError, match='best'):
    checkpointing.load_for_inference(workdir, 'newest')


def test_without_eval_sets_a_final_model_trains_on_every_case(tiny_config, tmp_path):
  """data.eval_sets=() (the shipped model's recipe): training + validation cases all train,
  nothing is evaluated, and the latest checkpoint is the model (export_model reads it)."""
  config = tiny_config(num_steps=2, checkpoint_every_steps=100)
  config.data.train_sets, config.data.eval_sets = ('training', 'validation'), ()
  workdir = str(tmp_path / 'final')
  assert train.train_and_evaluate(config, workdir) == {}
  with open(os.path.join(workdir, 'split.json')) as f:
    split = json.load(f)
  assert len(split['train_cases']) == 30 and split['eval_cases'] == []
  assert split['train_frames'] == 526
  assert not os.listdir(os.path.join(workdir, 'best'))   # no evaluation, no best checkpoint
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    assert {json.loads(line)['split'] for line in f} == {'train'}
  info = checkpointing.export_model(workdir, str(tmp_path / 'export'), 'latest')
  _, exported = checkpointing.load_for_inference(str(tmp_path / 'export'))
  _, latest = checkpointing.load_for_inference(workdir, 'latest')
  for a, b in zip(jax.tree_util.tree_leaves(exported), jax.tree_util.tree_leaves(latest)):
    np.testing.assert_array_equal(a, b)
  assert info['parameters'] > 0
