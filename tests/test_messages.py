"""Input a hostile new user gives: each ends in one line that names the file or option, says
what is wrong and what to do, with exit status 1; valid but unusual input is taken. Run through
run_main in this process (conftest.run_here), as the command line runs it."""
import json

import numpy as np
import pytest
import torch

from conftest import assert_user_error, run_here, write_pair

SMALL = ['--embed_dim=16', '--word_dim=8', '--epochs=1', '--compile=False']


@pytest.fixture(scope='module')
def run(synthetic_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('messages') / 'run'
    assert run_here('train', '--dataset=synthetic', f'--data_dir={synthetic_dir}', f'--out_dir={out}', *SMALL).returncode == 0
    return out


def test_options_are_parsed_without_crashing(run):
    paragraph = 'a dog runs through the snow ' * 400   # a pasted paragraph: text, never a literal
    proc = run_here('eval', f'--out_dir={run}', f'--query={paragraph}', '--k=2', '--compile=False')
    assert proc.returncode == 0 and 'query:' in proc.stdout, proc
    assert_user_error(run_here('train', '--embed_dim=10000000000'), '--embed_dim=10000000000: must be from 1 to 16384')
    assert_user_error(run_here('train', '--epochs=' + '9' * 5000), 'expected an int')
    assert_user_error(run_here('train', '--epoch=3'), 'unknown option --epoch; did you mean --epochs?')
    assert_user_error(run_here('eval', f'--out_dir={run}', '--query=a dog', '--k=10000000000'), '--k=10000000000: must be from 1 to')
    assert '(at most 16384)' in run_here('train', '--help').stdout


@pytest.mark.parametrize('value, fragment', [
    ('https://example.com/dog.jpg', 'a URL; download the image first'),
    ('FOLDER', 'a folder; give one image file'),
    ('missing.jpg', 'no such image file'),
])
def test_image_that_is_no_image_file(run, tmp_path, value, fragment):
    value = str(tmp_path) if value == 'FOLDER' else value
    assert_user_error(run_here('eval', f'--out_dir={run}', f'--image={value}'), f'--image={value}', fragment)


def test_query_without_words_and_a_split_not_prepared(run, tmp_path):
    assert_user_error(run_here('eval', f'--out_dir={run}', '--query=?! ...'), 'no words in it', "give a sentence")
    write_pair(tmp_path / 'x', ['train'] * 4 + ['val'] * 2)
    data = tmp_path / 'x'
    assert run_here('prep', '--dataset=x', f'--data_dir={data}', '--vocab_threshold=1').returncode == 0
    out = tmp_path / 'run'
    proc = run_here('train', '--dataset=x', f'--data_dir={data}', f'--out_dir={out}', '--batch_size=4', *SMALL)
    assert proc.returncode == 0 and f'python eval.py --out_dir={out} --split=val' in proc.stdout, proc
    assert_user_error(run_here('eval', f'--out_dir={out}'), "split 'test' was not prepared", '--split=val')
    assert run_here('eval', f'--out_dir={out}', '--split=val', '--compile=False').returncode == 0


def test_epochs_before_the_schedules_second_phase_are_said(synthetic_dir, tmp_path):
    proc = run_here('train', '--dataset=synthetic', f'--data_dir={synthetic_dir}', f'--out_dir={tmp_path}', *SMALL)
    assert proc.returncode == 0
    assert 'note: --epochs=1 ends before --warmup_epochs=7 and --lr_decay_epoch=7' in proc.stdout


@pytest.mark.parametrize('case', ['truncated', 'objects'])
def test_features_npy_that_cannot_be_read(tmp_path, case):
    write_pair(tmp_path, ['train'] * 3 + ['val', 'test'])
    good = tmp_path / 'good.npy'
    np.save(good, np.random.default_rng(0).random((5, 8)).astype(np.float32))
    bad = tmp_path / 'bad.npy'
    if case == 'truncated':
        bad.write_bytes(good.read_bytes()[:140])
    else:
        np.save(bad, np.array([None] * 5, dtype=object), allow_pickle=True)
    proc = run_here('prep', '--dataset=x', f'--data_dir={tmp_path / "d"}', f'--dataset_json={tmp_path / "dataset.json"}',
                    f'--features={bad}')
    assert_user_error(proc, f'{bad}: not a readable .npy file', 'save the (N, D) features again with numpy.save')


def test_tiny_but_nonzero_features_are_valid(tmp_path):
    write_pair(tmp_path, ['train'] * 3 + ['val', 'test'])
    rows = np.random.default_rng(0).random((5, 8)) * 1e-30
    np.save(tmp_path / 'tiny.npy', rows.astype(np.float32))
    proc = run_here('prep', '--dataset=x', f'--data_dir={tmp_path / "d"}', f'--dataset_json={tmp_path / "dataset.json"}',
                    f'--features={tmp_path / "tiny.npy"}', '--vocab_threshold=1')
    assert proc.returncode == 0, proc
    train = np.load(tmp_path / 'd' / 'train_ims.npy')
    np.testing.assert_allclose(train, rows[:3] / np.linalg.norm(rows[:3], axis=1, keepdims=True), rtol=1e-5)


class Payload:
    def __reduce__(self):
        return (print, ('this ran',))


def test_weights_refused_by_weights_only_say_so(tmp_path):
    from features import load_state_dict
    from utils import UserError
    torch.save({'conv.weight': torch.zeros(1), 'extra': Payload()}, tmp_path / 'w.pt')
    with pytest.raises(UserError) as error:
        load_state_dict(str(tmp_path / 'w.pt'))
    message = str(error.value)
    assert 'refused: it holds more than tensors' in message and 'torch.save(model.state_dict(), PATH)' in message
    assert 'weights_only' not in message   # PyTorch's advice to turn the protection off is not passed on


def test_a_failed_download_says_what_works_offline(tmp_path):
    proc = run_here('prep', '--dataset=flickr8k', f'--data_dir={tmp_path}', '--mirror=http://127.0.0.1:9/')
    assert_user_error(proc, 'cannot download', '--dataset=synthetic', '--features=')


def test_running_out_of_memory_is_one_line(monkeypatch, capsys):
    import sys

    import options

    def main(argv):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 40000000000000 bytes")
    main.__module__ = 'train'
    monkeypatch.setattr(sys, 'argv', ['train.py'])
    with pytest.raises(SystemExit) as stop:
        options.run_main(main)
    assert stop.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: out of memory') and '--batch_size' in lines[0], lines


def test_resuming_a_fine_tuned_run_without_finetune_names_the_option(synthetic_dir, tmp_path, run):
    ckpt = torch.load(run / 'last.pt', weights_only=True)
    ckpt['model_config']['cnn'] = 'efficientnet_lite0'   # as a --finetune=True run records its CNN
    out = tmp_path / 'tuned'
    out.mkdir()
    torch.save(ckpt, out / 'last.pt')
    proc = run_here('train', '--dataset=synthetic', f'--data_dir={synthetic_dir}', f'--out_dir={out}', '--resume=True',
                    *SMALL[:2], '--epochs=2', '--compile=False')
    assert_user_error(proc, "cnn 'efficientnet_lite0' -> ''", 'resume with --finetune=True')
    assert json.dumps(torch.load(out / 'last.pt', weights_only=True)['model_config']) == json.dumps(ckpt['model_config'])
