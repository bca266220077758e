"""prep.py from Karpathy-format files: parsing, splits, vocabulary, and bad input."""
import json
import os

import numpy as np
import pytest
import scipy.io

from conftest import assert_user_error, no_outputs, run_script, write_pair


def test_json_and_mat_become_aligned_normalized_splits(tmp_path):
    splits = ['train'] * 6 + ['restval'] * 3 + ['val'] * 4 + ['test'] * 5
    data, feats = write_pair(tmp_path, splits, val_only_word='zebra')
    run_script('prep.py', '--dataset=test', f'--data_dir={tmp_path}', '--vocab_threshold=1')
    meta = json.load(open(tmp_path / 'meta.json'))
    assert meta['splits'] == {'train': {'images': 9, 'captions': 45}, 'val': {'images': 4, 'captions': 20},
                              'test': {'images': 5, 'captions': 25}}
    assert meta['feature_dim'] == 64
    for split in ('train', 'val', 'test'):
        rows = [i for i, s in enumerate(splits) if (s == 'restval' and split == 'train') or s == split]
        ims = np.load(tmp_path / f'{split}_ims.npy')
        expected = feats.T[rows] / np.linalg.norm(feats.T[rows], axis=1, keepdims=True)
        np.testing.assert_allclose(ims, expected, rtol=1e-6)
        caps = open(tmp_path / f'{split}_caps.txt').read().splitlines()
        assert caps == [' '.join(s['tokens']) for i in rows for s in data['images'][i]['sentences'][:5]]
        assert open(tmp_path / f'{split}_files.txt').read().split() == [f'{i}.jpg' for i in rows]
    vocab = json.load(open(tmp_path / 'vocab.json'))
    assert vocab['<pad>'] == 0 and vocab['<unk>'] == 1
    assert 'zebra' not in vocab                    # a word only val captions use stays unknown
    assert sorted(vocab.values()) == list(range(len(vocab)))


def test_vocab_threshold_counts_train_captions_only(tmp_path):
    from prep import build_vocab
    vocab = build_vocab([['a', 'dog'], ['a', 'cat'], ['a', 'dog', 'runs']], threshold=2)
    assert vocab == {'<pad>': 0, '<unk>': 1, 'a': 2, 'dog': 3}


def test_refuses_to_overwrite_unless_forced(tmp_path):
    write_pair(tmp_path, ['train'] * 3 + ['val', 'test'])
    run_script('prep.py', '--dataset=x', f'--data_dir={tmp_path}')
    before = open(tmp_path / 'meta.json').read()
    again = run_script('prep.py', '--dataset=x', f'--data_dir={tmp_path}')   # the quick start run twice
    assert 'already prepared with these options; nothing to do' in again.stdout
    other = run_script('prep.py', '--dataset=x', f'--data_dir={tmp_path}', '--vocab_threshold=1', check=False)
    assert_user_error(other, 'already prepared, with other options', '--force=True')
    assert open(tmp_path / 'meta.json').read() == before
    run_script('prep.py', '--dataset=x', f'--data_dir={tmp_path}', '--vocab_threshold=1', '--force=True')
    assert json.load(open(tmp_path / 'meta.json'))['options']['vocab_threshold'] == 1


def test_features_npy_of_any_dimension(tmp_path):
    write_pair(tmp_path, ['train'] * 3 + ['val', 'test'])
    np.save(tmp_path / 'mine.npy', np.random.default_rng(1).random((5, 2048)).astype(np.float32))
    run_script('prep.py', '--dataset=x', f'--data_dir={tmp_path}', f'--features={tmp_path / "mine.npy"}')
    assert json.load(open(tmp_path / 'meta.json'))['feature_dim'] == 2048
    assert np.load(tmp_path / 'train_ims.npy').shape == (3, 2048)


def test_dataset_without_test_split_prepares_train_and_val(tmp_path):
    """As ../shared's Flickr8k, whose test photos are held back: train and val are enough, and
    a later --split=test says that split was not prepared."""
    write_pair(tmp_path, ['train'] * 4 + ['val'] * 2)
    proc = run_script('prep.py', '--dataset=x', f'--data_dir={tmp_path}', '--vocab_threshold=1')
    assert 'no test images' in proc.stdout and 'dataset.json' in proc.stdout
    assert sorted(json.load(open(tmp_path / 'meta.json'))['splits']) == ['train', 'val']
    assert not (tmp_path / 'test_ims.npy').exists()
    out = tmp_path / 'run'
    run_script('train.py', '--dataset=x', f'--data_dir={tmp_path}', f'--out_dir={out}', '--epochs=1',
               '--embed_dim=16', '--word_dim=8', '--batch_size=4')
    assert_user_error(run_script('eval.py', f'--out_dir={out}', check=False), "split 'test' was not prepared",
                      'prepared splits: train, val')
    run_script('eval.py', f'--out_dir={out}', '--split=val')
    assert json.load(open(out / 'results_val.json'))['n_images'] == 2
    # without val there is nothing to validate on: the dataset json is named
    write_pair(tmp_path / 'b', ['train'] * 4 + ['test'] * 2)
    assert_user_error(run_script('prep.py', '--dataset=x', f'--data_dir={tmp_path / "b"}', check=False),
                      'dataset.json: no images in split', "'val'")


@pytest.mark.parametrize('case,fragment', [
    ('missing_json', 'dataset.json: not found'),
    ('malformed_json', 'not valid JSON'),
    ('not_karpathy', "Karpathy's format"),
    ('bad_split', "unknown split 'dev'"),
    ('empty_caption', 'empty caption'),
    ('four_captions', 'at least 5'),
    ('mat_columns', 'do not belong together'),
    ('no_features', 'vgg_feats.mat'),
    ('nan_features', 'NaN or inf'),
    ('long_caption', '--max_len'),
])
def test_bad_input_is_one_clear_line(tmp_path, case, fragment):
    data, feats = write_pair(tmp_path, ['train'] * 3 + ['val', 'test'])
    path = tmp_path / 'dataset.json'
    if case == 'missing_json':
        os.remove(path)
    elif case == 'malformed_json':
        path.write_text('{"images": [')
    elif case == 'not_karpathy':
        path.write_text('[1, 2, 3]')
    else:
        if case == 'bad_split':
            data['images'][1]['split'] = 'dev'
        elif case == 'empty_caption':
            data['images'][2]['sentences'][1]['tokens'] = []
        elif case == 'four_captions':
            data['images'][1]['sentences'] = data['images'][1]['sentences'][:4]
        elif case == 'long_caption':
            data['images'][1]['sentences'][0]['tokens'] = ['word'] * 101
        path.write_text(json.dumps(data))
        if case == 'mat_columns':
            scipy.io.savemat(tmp_path / 'vgg_feats.mat', {'feats': feats[:, :4]})
        elif case == 'no_features':
            os.remove(tmp_path / 'vgg_feats.mat')
        elif case == 'nan_features':
            feats[3, 2] = np.nan
            scipy.io.savemat(tmp_path / 'vgg_feats.mat', {'feats': feats})
    proc = run_script('prep.py', '--dataset=x', f'--data_dir={tmp_path}', check=False)
    assert_user_error(proc, fragment)
    assert no_outputs(tmp_path), os.listdir(tmp_path)


def test_unknown_option_and_bad_value():
    assert_user_error(run_script('prep.py', '--vocab_treshold=3', check=False), 'unknown option --vocab_treshold')
    assert_user_error(run_script('train.py', '--batch_size=big', check=False), '--batch_size=big')
