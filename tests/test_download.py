"""prep.py fetching Flickr8k (download.py): download with resume, checksums, safe unzip, the Karpathy
json, and the whole road from a (local) download server to train.py and eval.py."""
import hashlib
import json
import os
import zipfile

import numpy as np
import pytest

from conftest import assert_user_error, flickr8k_names, make_flickr8k_zips, run_script
from utils import UserError

TINY = flickr8k_names(2, 1, 1)   # VGG16 costs ~0.3 s per image on a CPU: few images


def test_fresh_flickr8k_from_mirror_then_train_and_eval(tmp_path, file_server):
    captions = make_flickr8k_zips(tmp_path / 'srv', TINY)
    url = file_server(tmp_path / 'srv', ranges=False)   # like Python's http.server
    data = tmp_path / 'flickr8k'
    proc = run_script('prep.py', f'--mirror={url}', '--weights=random', f'--data_dir={data}', '--workers=2')
    assert 'warning: --weights=random' in proc.stdout
    assert sorted(p for p, _, _ in file_server.log) == ['/Flickr8k_Dataset.zip', '/Flickr8k_text.zip']
    assert sorted(file_server.heads) == ['/Flickr8k_Dataset.zip', '/Flickr8k_text.zip']  # sizes, for the disk check

    meta = json.load(open(data / 'meta.json'))
    assert meta['splits'] == {'train': {'images': 2, 'captions': 10}, 'val': {'images': 1, 'captions': 5},
                              'test': {'images': 1, 'captions': 5}}
    assert (meta['cnn'], meta['crops'], meta['weights'], meta['feature_dim']) == ('vgg16', 1, 'random', 4096)
    for name in ('Flickr8k_Dataset.zip', 'Flickr8k_text.zip'):
        digest = hashlib.sha256(open(tmp_path / 'srv' / name, 'rb').read()).hexdigest()
        assert meta['downloads'][name]['sha256'] == digest and digest in proc.stdout
    dataset = json.load(open(data / 'dataset.json'))
    assert [(im['filename'], im['split']) for im in dataset['images']] == \
        [(TINY[0][0], 'train'), (TINY[0][1], 'train'), (TINY[1][0], 'val'), (TINY[2][0], 'test')]
    first = dataset['images'][0]['sentences'][0]
    assert first['raw'] == captions[TINY[0][0]][0]
    assert first['tokens'] == [w.lower() for w in first['raw'].split() if w not in ',.']
    assert open(data / 'val_files.txt').read().split() == [TINY[1][0]]
    assert not any('__MACOSX' in d for d, _, _ in os.walk(data))

    out = tmp_path / 'run'
    run_script('train.py', f'--data_dir={data}', f'--out_dir={out}', '--epochs=1', '--embed_dim=32', '--word_dim=16', '--batch_size=2')
    proc = run_script('eval.py', f'--out_dir={out}')
    assert json.load(open(out / 'results_test.json'))['n_images'] == 1

    # prepared again: nothing fetched, nothing extracted again
    file_server.log.clear()
    before = np.load(data / 'train_ims.npy')
    proc = run_script('prep.py', f'--mirror={url}', '--weights=random', f'--data_dir={data}', '--force=True')
    assert file_server.log == [] and 'warning' not in proc.stdout
    np.testing.assert_array_equal(np.load(data / 'train_ims.npy'), before)


@pytest.mark.parametrize('ranges', [True, False])
def test_download_resumes_a_partial_file(tmp_path, file_server, ranges):
    from download import download
    payload = np.random.default_rng(0).bytes(300_000)
    (tmp_path / 'srv').mkdir()
    (tmp_path / 'srv' / 'big.zip').write_bytes(payload)
    url = file_server(tmp_path / 'srv', ranges=ranges)
    dest = tmp_path / 'big.zip'
    # an interrupted earlier run left the first 100,000 bytes (garbage, if the server restarts them)
    (tmp_path / 'big.zip.part').write_bytes(payload[:100_000] if ranges else b'x' * 100_000)
    digest = download(url + 'big.zip', str(dest))
    assert dest.read_bytes() == payload and digest == hashlib.sha256(payload).hexdigest()
    assert not (tmp_path / 'big.zip.part').exists()
    assert file_server.log == [('/big.zip', 'bytes=100000-', 206 if ranges else 200)]
    download(url + 'big.zip', str(dest))         # present: not fetched again
    assert len(file_server.log) == 1


def test_recorded_checksum_mismatch_is_an_error(tmp_path, file_server):
    from download import download
    (tmp_path / 'srv').mkdir()
    (tmp_path / 'srv' / 'a.zip').write_bytes(b'not what was published')
    url = file_server(tmp_path / 'srv')
    with pytest.raises(UserError, match='expected 22 bytes, SHA-256 0000.*delete it'):
        download(url + 'a.zip', str(tmp_path / 'a.zip'), size=22, sha256='0' * 64)


def unsafe_zip(path, case):
    with zipfile.ZipFile(path, 'w') as zf:
        zf.writestr('Flicker8k_Dataset/ok.jpg', b'fine')
        if case == 'slip':
            zf.writestr('Flicker8k_Dataset/../../evil.txt', b'escape')
        elif case == 'absolute':
            zf.writestr('/tmp/evil.txt', b'escape')
        elif case == 'symlink':
            info = zipfile.ZipInfo('Flicker8k_Dataset/link.jpg')
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, '/etc/passwd')


@pytest.mark.parametrize('case,fragment', [('slip', 'points outside'), ('absolute', 'points outside'),
                                           ('symlink', 'symbolic link')])
def test_unsafe_zip_members_are_refused_before_anything_is_written(tmp_path, case, fragment):
    from download import extract_zip
    unsafe_zip(tmp_path / 'bad.zip', case)
    dest = tmp_path / 'out' / 'inner'
    dest.mkdir(parents=True)
    with pytest.raises(UserError, match=fragment):
        extract_zip(str(tmp_path / 'bad.zip'), str(dest))
    assert os.listdir(dest) == [] and os.listdir(tmp_path / 'out') == ['inner']


def test_truncated_download_is_one_clear_error(tmp_path, file_server):
    make_flickr8k_zips(tmp_path / 'srv', TINY)
    whole = (tmp_path / 'srv' / 'Flickr8k_Dataset.zip').read_bytes()
    (tmp_path / 'srv' / 'Flickr8k_Dataset.zip').write_bytes(whole[:len(whole) // 2])
    url = file_server(tmp_path / 'srv')
    proc = run_script('prep.py', f'--mirror={url}', '--weights=random', f'--data_dir={tmp_path / "d"}', check=False)
    assert_user_error(proc, 'Flickr8k_Dataset.zip: not a complete zip file', 'delete it and run prep.py again')


def test_missing_flickr8k_split_file_says_what_to_do(tmp_path):
    from download import flickr8k_json
    (tmp_path / 'text').mkdir()
    (tmp_path / 'text' / 'Flickr8k.token.txt').write_text('a.jpg#0\tA dog .\n')
    with pytest.raises(UserError, match='no Flickr_8k.trainImages.txt'):
        flickr8k_json(str(tmp_path / 'text'))
