"""A run folder is always one a user can go on from, however the run stopped: before its first
save a new run may start there (and --resume=True says so); after it, --resume=True continues.
Each way of stopping is made to happen for real: an exception in the first step, a full disk
(the write raises OSError(ENOSPC)), a NaN, Ctrl-C."""
import errno
import json

import torch

from conftest import assert_user_error, run_here

TINY = ['--embed_dim=32', '--word_dim=16', '--batch_size=64', '--log_interval=5', '--epochs=1', '--compile=False']


def args(data, out, *extra):
    return ['--dataset=synthetic', f'--data_dir={data}', f'--out_dir={out}', *TINY, *extra]


def run_train(*argv, patch=None):
    return run_here('train', *argv, patch=patch)


def assert_goes_on(data, out, resume_works):
    """The two ways on from a stopped run: exactly one of them works, and the other one's error says which."""
    other = run_train(*args(data, out, f'--resume={not resume_works}'))
    if resume_works:
        assert_user_error(other, 'pass --resume=True to continue it')
    else:
        assert_user_error(other, 'no checkpoint to resume from', 'drop --resume=True')
    done = run_train(*args(data, out, f'--resume={resume_works}'))
    assert done.returncode == 0 and 'done:' in done.stdout, done
    assert torch.load(out / 'last.pt', weights_only=True)['iteration'] == 47


def test_an_error_in_the_first_step_leaves_a_folder_a_new_run_can_use(synthetic_dir, tmp_path):
    def unreadable_first_batch(train):
        def get_batch(*a):
            raise train.UserError("photo.jpg: cannot read the image; replace it, then run again")
        train.get_batch = get_batch
    out = tmp_path / 'run'
    proc = run_train(*args(synthetic_dir, out), patch=unreadable_first_batch)
    assert_user_error(proc, 'photo.jpg: cannot read the image')
    assert (out / 'log.jsonl').exists() and not (out / 'last.pt').exists()
    assert_goes_on(synthetic_dir, out, resume_works=False)


def test_a_full_disk_at_the_first_save_leaves_a_folder_a_new_run_can_use(synthetic_dir, tmp_path, monkeypatch):
    import utils

    def fsync(fd):   # every atomic write ends with an fsync: on a full disk it fails
        raise OSError(errno.ENOSPC, 'No space left on device')
    out = tmp_path / 'run'
    with monkeypatch.context() as patch:
        patch.setattr(utils.os, 'fsync', fsync)
        proc = run_train(*args(synthetic_dir, out))
    assert_user_error(proc, 'cannot write it (No space left on device)', 'free some disk space')
    assert not (out / 'last.pt').exists() and not (out / 'best.pt').exists()
    assert not [p for p in out.iterdir() if p.name.endswith('.tmp')]
    assert_goes_on(synthetic_dir, out, resume_works=False)


def test_a_nan_before_the_first_save_says_start_again_and_after_it_resume(synthetic_dir, tmp_path):
    out = tmp_path / 'early'
    proc = run_train(*args(synthetic_dir, out, '--learning_rate=1e37'))
    assert_user_error(proc, 'training stopped: nothing was saved yet; start again (same --out_dir)', '--learning_rate')
    assert_goes_on(synthetic_dir, out, resume_works=False)

    def nan_at_10(train):   # a loss that turns NaN once checkpoints exist (a bad batch, say)
        step = train.train_step

        def train_step(model, optimizer, *rest):
            loss, norm = step(model, optimizer, *rest)
            return (loss * float('nan') if optimizer.state_dict()['state'][0]['step'] == 10 else loss), norm
        train.train_step = train_step
    out = tmp_path / 'late'
    proc = run_train(*args(synthetic_dir, out, '--eval_interval=3'), patch=nan_at_10)
    assert_user_error(proc, 'the loss became nan at iteration 10', 'last.pt keeps the last good state (iteration 9)',
                      'continue from it with --resume=True')
    assert_goes_on(synthetic_dir, out, resume_works=True)


def test_ctrl_c_before_the_first_validation_saves_a_run_to_resume(synthetic_dir, tmp_path):
    def stop_at_2(train):
        agreed = train.StopRequests.agreed

        def agreed_or_stop(self, iteration, world, dev, every):
            if iteration == 2:
                self.signum = 2
            return agreed(self, iteration, world, dev, every)
        train.StopRequests.agreed = agreed_or_stop
    out = tmp_path / 'run'
    proc = run_train(*args(synthetic_dir, out), patch=stop_at_2)
    assert proc.returncode == 130 and 'stopped at iteration 2' in proc.stdout, proc
    assert_goes_on(synthetic_dir, out, resume_works=True)
    log = [json.loads(line) for line in open(out / 'log.jsonl')]
    assert sum('val' in r for r in log) == 1


def test_resuming_with_other_model_options_names_the_option_to_give(synthetic_dir, tmp_path):
    out = tmp_path / 'run'
    assert run_train(*args(synthetic_dir, out)).returncode == 0
    proc = run_train(*args(synthetic_dir, out, '--resume=True', '--embed_dim=48', '--epochs=2'))
    assert_user_error(proc, 'embed_dim 32 -> 48', 'resume with --embed_dim=32', 'another --out_dir')
