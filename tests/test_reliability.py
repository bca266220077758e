"""Reliability and security: a killed run resumes to the same weights, Ctrl-C saves, a NaN stops
training with the last good checkpoint kept, untrusted checkpoints never run, a full disk or a
second prep.py is one clear line, and bad input of every kind is named (see README's table).

Scripts run in a subprocess where the process itself matters (kills, signals, file size limits);
elsewhere in this process through run_main, as the command line would run them, which is faster.
"""
import fcntl
import importlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import ENV, ROOT, assert_user_error, no_outputs, run_here, start, wait_for, write_pair

# Tiny and frequent: a checkpoint every 3 iterations, a log line every 5, 94 iterations in all.
TINY = ['--embed_dim=32', '--word_dim=16', '--batch_size=64', '--log_interval=5', '--eval_interval=3', '--epochs=2',
        '--word_dropout=0.1', '--image_dropout=0.1']  # dropout: a resumed run must draw the same masks too
# One thread: deterministic and, on a loaded machine, many times faster than competing OpenMP threads.


def train_args(data, out, *extra):
    return ['--dataset=synthetic', f'--data_dir={data}', f'--out_dir={out}', *TINY, *extra]


def load(path):
    return torch.load(path, weights_only=True)


def assert_same(a, b, where='checkpoint'):
    """Bit-for-bit equal tensors, recursively through dicts and lists."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f'{where}[{k!r}]')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f'{where}[{k}]')
    else:
        assert a == b, (where, a, b)


def assert_same_run(out, reference):
    for name in ('last.pt', 'best.pt'):
        got, want = load(out / name), load(reference / name)
        for key in ('model', 'optimizer', 'iteration', 'best_rsum', 'loss_window', 'grad_norm_window', 'rng_state'):
            assert (key in got) == (key in want), (name, key)
            if key in want:
                assert_same(got[key], want[key], f'{name}[{key!r}]')
    assert (out / 'log.jsonl').read_text() == (reference / 'log.jsonl').read_text()
    assert not [n for n in os.listdir(out) if n.endswith('.tmp')], os.listdir(out)


def assert_checkpoints_load(out):
    """Whatever is on disk right now: every checkpoint loads, with finite weights."""
    for name in ('last.pt', 'best.pt'):
        if (out / name).exists():
            ckpt = load(out / name)
            assert all(torch.isfinite(t).all() for t in ckpt['model'].values()), name


@pytest.fixture(scope='module')
def reference(synthetic_dir, tmp_path_factory):
    """An uninterrupted run, and how long its training took (from 'training on' to the end)."""
    out = tmp_path_factory.mktemp('reference')
    proc = start('train.py', *train_args(synthetic_dir, out))
    wait_for(proc, 'training on')
    t0 = time.time()
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    return SimpleNamespace(out=out, seconds=time.time() - t0, data=synthetic_dir)


def test_interrupted_runs_resume_to_the_same_weights(reference, tmp_path):
    """Ctrl-C once, then SIGKILL at random moments, resuming each time: the same weights, optimizer
    state, best.pt and log.jsonl as the uninterrupted run, and every checkpoint on disk loads."""
    out = tmp_path / 'interrupted'
    proc = start('train.py', *train_args(reference.data, out))
    wait_for(proc, 'val:')  # past the first checkpoint, in the middle of training
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, output
    assert 'Traceback' not in output and 'continue with --resume=True' in output, output
    stopped_at = int(output.split('stopped at iteration ')[1].split(';')[0])
    assert load(out / 'last.pt')['iteration'] == stopped_at < 94
    rng = random.Random(7)
    kills, resumed = 0, []
    for attempt in range(8):
        resume = (out / 'last.pt').exists()  # killed before its first checkpoint: start again
        proc = start('train.py', *train_args(reference.data, out, f'--resume={resume}'))
        output = ''
        if kills < 3:
            output = ''.join(wait_for(proc, 'training on'))
            time.sleep(rng.uniform(0.05, 0.5) * reference.seconds)
            proc.kill()
        output += proc.communicate(timeout=300)[0]
        resumed += [line for line in output.splitlines() if line.startswith('resuming from')]
        if proc.returncode == -signal.SIGKILL:
            kills += 1
            assert_checkpoints_load(out)
            continue
        assert proc.returncode == 0 and ('done:' in output or 'already finished' in output), output
        break
    assert kills >= 2 and resumed[0].endswith(f'at iteration {stopped_at} (epoch {stopped_at // 47})'), (kills, resumed)
    assert_same_run(out, reference.out)


def test_resuming_a_finished_run_says_so_and_changes_nothing(reference):
    def files():  # the lock file holds the process id of whoever holds it last: not the run's data
        return {p.name: p.read_bytes() for p in reference.out.iterdir() if p.name != '.train.lock'}
    before = files()
    proc = run_here('train', *train_args(reference.data, reference.out, '--resume=True'))
    assert proc.returncode == 0 and 'already finished' in proc.stdout, proc
    assert files() == before


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(synthetic_dir, tmp_path):
    """A learning rate far too large (1e37) overflows the weights within a few steps."""
    out = tmp_path / 'nan'
    proc = run_here('train', *train_args(synthetic_dir, out, '--learning_rate=1e37', '--eval_interval=1'))
    assert_user_error(proc, 'at iteration', 'training stopped', 'last.pt keeps the last good state', '--learning_rate')
    bad = int(proc.stderr.split('at iteration ')[1].split(';')[0])
    kept = load(out / 'last.pt')
    assert f"(iteration {kept['iteration']})" in proc.stderr and 0 < kept['iteration'] < bad, proc.stderr
    assert_checkpoints_load(out)
    log = [json.loads(line) for line in open(out / 'log.jsonl')]
    assert all(r['iteration'] < bad for r in log) and all(np.isfinite(r['loss']) for r in log if 'loss' in r)


# ----------------------------------------------------------------------------- untrusted checkpoints

class Payload:
    """A pickle that creates a marker file when it is loaded: what a malicious checkpoint does."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def test_malicious_checkpoint_is_refused_without_running(synthetic_dir, tmp_path):
    marker = str(tmp_path / 'MARKER')
    out = tmp_path / 'run'
    out.mkdir()
    torch.save({'config': {}, 'vocab': {}, 'feature_dim': 256, 'model': Payload(marker)}, out / 'best.pt')
    torch.load(out / 'best.pt', weights_only=False)  # the payload is live: plain pickle runs it ...
    assert os.path.exists(marker)
    os.remove(marker)
    shutil.copy(out / 'best.pt', out / 'last.pt')
    assert_user_error(run_here('eval', f'--out_dir={out}', f'--data_dir={synthetic_dir}'), 'best.pt', 'refused')
    assert_user_error(run_here('train', *train_args(synthetic_dir, out, '--resume=True')), 'last.pt', 'refused')
    assert not os.path.exists(marker)  # ... and neither script did


def test_foreign_torn_and_mismatched_checkpoints(reference, tmp_path):
    out, data = tmp_path / 'run', reference.data
    out.mkdir()
    best = load(reference.out / 'best.pt')
    torch.save(best['model'], out / 'best.pt')  # a bare state_dict, as other projects write
    assert_user_error(run_here('eval', f'--out_dir={out}'), 'not a checkpoint written by train.py')
    (out / 'best.pt').write_bytes((reference.out / 'best.pt').read_bytes()[:5000])  # torn copy
    assert_user_error(run_here('eval', f'--out_dir={out}'), 'best.pt', 'not a readable checkpoint')
    torch.save({**best, 'model_config': {**best['model_config'], 'embed_dim': 64}}, out / 'best.pt')
    assert_user_error(run_here('eval', f'--out_dir={out}'), 'best.pt', 'config does not fit its weights')
    assert not (out / 'results_test.json').exists()
    # resuming on another setup: other dimensions, or a dataset with another vocabulary
    shutil.copy(reference.out / 'last.pt', out / 'last.pt')
    assert_user_error(run_here('train', *train_args(data, out, '--resume=True', '--embed_dim=64')),
                      'cannot resume', 'embed_dim 32 -> 64')
    other = tmp_path / 'other_data'
    shutil.copytree(data, other)
    vocab = json.loads((other / 'vocab.json').read_text())
    a, b = list(vocab)[2:4]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / 'vocab.json').write_text(json.dumps(vocab))
    assert_user_error(run_here('train', *train_args(other, out, '--resume=True')), 'cannot resume', 'vocabulary')
    assert (out / 'last.pt').read_bytes() == (reference.out / 'last.pt').read_bytes()


# ----------------------------------------------------------------------------- bad prepared data

@pytest.mark.parametrize('case,fragment', [
    ('nan_features', 'train_ims.npy: row 7 holds NaN or inf'),
    ('wrong_dim', 'val_ims.npy: shape (100, 255)'),
    ('caption_count', 'train_caps.txt: 2999 captions for 600 images'),
    ('empty_caption', 'train_caps.txt: line 4 is an empty caption'),
    ('non_utf8_captions', "cannot read split 'train'"),
    ('bad_vocab', 'vocab.json: not a vocabulary prep.py writes'),
    ('malformed_meta', 'meta.json: not valid JSON'),
    ('foreign_meta', 'meta.json: not the metadata prep.py writes'),
])
def test_bad_prepared_data_is_one_clear_line(synthetic_dir, tmp_path, case, fragment):
    data = tmp_path / 'data'
    shutil.copytree(synthetic_dir, data)
    if case == 'nan_features':
        feats = np.load(data / 'train_ims.npy')
        feats[7, 3] = np.inf
        np.save(data / 'train_ims.npy', feats)
    elif case == 'wrong_dim':
        np.save(data / 'val_ims.npy', np.load(data / 'val_ims.npy')[:, :255])
    elif case in ('caption_count', 'empty_caption'):
        lines = (data / 'train_caps.txt').read_text().splitlines()
        lines = lines[:-1] if case == 'caption_count' else lines[:3] + [''] + lines[4:]
        (data / 'train_caps.txt').write_text('\n'.join(lines) + '\n')
    elif case == 'non_utf8_captions':
        (data / 'train_caps.txt').write_bytes(b'a \xff\xfe dog\n' + (data / 'train_caps.txt').read_bytes())
    elif case == 'bad_vocab':
        (data / 'vocab.json').write_text('{"dog": 0, "cat": 7}')
    elif case == 'malformed_meta':
        (data / 'meta.json').write_text('{"dataset": "synthetic", ')
    elif case == 'foreign_meta':
        (data / 'meta.json').write_text('{"name": "something else"}')
    proc = run_here('train', *train_args(data, tmp_path / 'run'))
    assert_user_error(proc, fragment)
    assert not (tmp_path / 'run' / 'last.pt').exists()


def test_eval_wrong_split_name(reference):
    assert_user_error(run_here('eval', f'--out_dir={reference.out}', '--split=dev'),
                      "split 'dev' was not prepared", "prepared splits: test, train, val")


# ----------------------------------------------------------------------------- bad input to prep.py
# (tests/test_prep.py covers the json's structure, split names, empty and long captions, the .mat's
# columns and NaN features; these are the rest)

@pytest.mark.parametrize('case,fragment', [
    ('npy_rows', 'shape (4, 64), expected (5, D)'),
    ('npy_1d', 'shape (320,), expected (5, D)'),
    ('npy_inf', '1 rows hold NaN or inf (first: image 2)'),
    ('npy_overflow', "image 1: values so large that the vector's length overflows"),
    ('npy_pickle', 'not a readable .npy file'),
    ('mat_transposed', 'do not belong together'),
    ('non_utf8_json', 'not valid JSON'),
    ('surrogate_caption', 'not valid Unicode text'),
    ('huge_caption', 'a caption of 1000000 tokens'),
])
def test_more_bad_input_to_prep(tmp_path, case, fragment):
    data, feats = write_pair(tmp_path, ['train'] * 3 + ['val', 'test'])
    npy = tmp_path / 'mine.npy'
    rows = np.random.default_rng(1).random((5, 64)).astype(np.float32)
    args = [f'--features={npy}'] if case.startswith('npy') else []
    if case == 'npy_rows':
        np.save(npy, rows[:4])
    elif case == 'npy_1d':
        np.save(npy, rows.reshape(-1))
    elif case == 'npy_inf':
        rows[2, 5] = -np.inf
        np.save(npy, rows)
    elif case == 'npy_overflow':
        rows[1] = 1e30
        np.save(npy, rows)
    elif case == 'npy_pickle':
        np.save(npy, np.array([{'a': 1}] * 5, dtype=object), allow_pickle=True)
    elif case == 'mat_transposed':
        import scipy.io
        scipy.io.savemat(tmp_path / 'vgg_feats.mat', {'feats': feats.T})  # N x D instead of D x N
    elif case == 'non_utf8_json':
        (tmp_path / 'dataset.json').write_bytes(json.dumps(data).replace('"a"', '"\xe9t\xe9"').encode('latin-1'))
    elif case == 'surrogate_caption':
        data['images'][1]['sentences'][2]['tokens'] = ['a', '\udc80dog']
        (tmp_path / 'dataset.json').write_text(json.dumps(data))  # json escapes it as \udc80
    elif case == 'huge_caption':
        data['images'][1]['sentences'][0] = {'raw': 'dog ' * 1000000}
        (tmp_path / 'dataset.json').write_text(json.dumps(data))
    assert_user_error(run_here('prep', '--dataset=x', f'--data_dir={tmp_path}', *args), fragment)
    assert no_outputs(tmp_path), os.listdir(tmp_path)


def test_second_prep_on_the_same_dataset_is_refused(tmp_path):
    write_pair(tmp_path, ['train'] * 3 + ['val', 'test'])
    prep = importlib.import_module('prep')
    lock = prep.lock_dataset(str(tmp_path))  # what a running prep.py holds
    with open(tmp_path / '.prep.lock') as other, pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert_user_error(run_here('prep', '--dataset=x', f'--data_dir={tmp_path}'),
                      'another prep.py is writing this dataset', '.prep.lock')
    assert no_outputs(tmp_path)
    lock.release()
    assert run_here('prep', '--dataset=x', f'--data_dir={tmp_path}').returncode == 0


# ----------------------------------------------------------------------------- full disk, kills mid-write

def limit_file_size(limit):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return preexec


def test_full_disk_while_training_keeps_the_checkpoints(reference, tmp_path):
    out = tmp_path / 'run'
    shutil.copytree(reference.out, out)
    size = (out / 'last.pt').stat().st_size
    assert (out / 'log.jsonl').stat().st_size < size // 3
    # continue the finished run for a third epoch: its first checkpoint does not fit
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'),
                           *train_args(reference.data, out, '--resume=True', '--epochs=3'),
                           '--compile=False'],  # the file-size limit also stops torch.compile writing its C++
                          cwd=ROOT, env=ENV, capture_output=True, text=True, preexec_fn=limit_file_size(size // 2), timeout=300)
    assert_user_error(proc, 'last.pt: cannot write it (File too large)', 'free some disk space')
    assert (out / 'last.pt').read_bytes() == (reference.out / 'last.pt').read_bytes()
    assert_checkpoints_load(out)  # best.pt (smaller, no optimizer state) may have been written: whole, then
    assert not [n for n in os.listdir(out) if n.endswith('.tmp')]


def test_full_disk_while_preparing_keeps_the_prepared_dataset(tmp_path):
    write_pair(tmp_path, ['train'] * 3 + ['val', 'test'])
    assert run_here('prep', '--dataset=x', f'--data_dir={tmp_path}').returncode == 0
    def files():  # the lock file holds the process id of its last holder: not the dataset's data
        return {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != '.prep.lock'}
    before = files()
    np.save(tmp_path / 'wide.npy', np.random.default_rng(2).random((5, 4096)).astype(np.float32))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'prep.py'), '--dataset=x', f'--data_dir={tmp_path}',
                           f'--features={tmp_path / "wide.npy"}', '--force=True'], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, preexec_fn=limit_file_size(30000), timeout=300)
    assert_user_error(proc, 'train_ims.npy: cannot write it', 'free some disk space')
    after = files()
    assert after == {**before, 'wide.npy': after['wide.npy']}
    assert not (tmp_path / '.prep-staging').exists()


def test_atomic_write_killed_midway_leaves_the_old_file(tmp_path):
    """A process killed while it writes a file through atomic_open leaves the old file whole."""
    from utils import atomic_open
    path = tmp_path / 'file.bin'
    path.write_bytes(b'old' * 1000)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child writes slowly, and says when it is half way
        try:
            with atomic_open(str(path)) as f:
                for k in range(100):
                    f.write(b'new' * 1000)
                    f.flush()
                    if k == 50:
                        os.write(w, b'x')
                    time.sleep(0.01)
        finally:
            os._exit(0)
    os.read(r, 1)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert path.read_bytes() == b'old' * 1000
    assert [n for n in os.listdir(tmp_path) if n.endswith('.tmp')]  # the torn temporary, never the file itself


def test_atomic_write_names_the_file_only_for_failed_writes(tmp_path):
    """ENOSPC inside the block is the file's error; another OSError there (reading some input)
    is the caller's, passed on as it is. The old file stays either way."""
    import errno
    from utils import UserError, atomic_open
    path = tmp_path / 'out.json'
    path.write_text('old')
    with pytest.raises(UserError, match='out.json: cannot write it .No space left on device.'):
        with atomic_open(str(path), 'w') as f:
            f.write('new')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(FileNotFoundError):
        with atomic_open(str(path), 'w') as f:
            open(tmp_path / 'missing input')
    assert path.read_text() == 'old' and os.listdir(tmp_path) == ['out.json']
