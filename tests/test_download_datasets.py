"""prep.py fetching Flickr30k and COCO (download.py) from a --mirror on 127.0.0.1 that serves files
named and laid out as the real ones, then train.py and eval.py on them; the disk-space check and
the Parquet extra's message."""
import collections
import json
import os
import shutil
import sys

import pytest

from conftest import make_coco_files, make_flickr30k_files, run_script
from utils import UserError, tokenize

SMALL_MODEL = ['--epochs=1', '--embed_dim=16', '--word_dim=8', '--batch_size=4']


def split_counts(meta):
    return {split: v['images'] for split, v in meta['splits'].items()}


def train_and_eval(data, out):
    run_script('train.py', f'--data_dir={data}', f'--out_dir={out}', *SMALL_MODEL)
    run_script('eval.py', f'--out_dir={out}')
    return json.load(open(out / 'results_test.json'))


def test_fresh_flickr30k_from_mirror_then_train_and_eval(tmp_path, file_server):
    from download import plan_downloads
    rows = make_flickr30k_files(tmp_path / 'srv')
    url = file_server(tmp_path / 'srv')
    data = tmp_path / 'flickr30k'
    proc = run_script('prep.py', '--dataset=flickr30k', f'--mirror={url}', '--weights=random', f'--data_dir={data}', '--workers=2')
    names = ['/flickr30k-images.zip', '/flickr_annotations_30k.csv']
    assert sorted(file_server.heads) == names and sorted(p for p, _, _ in file_server.log) == names
    zip_bytes = os.path.getsize(tmp_path / 'srv' / 'flickr30k-images.zip')
    assert f"flickr30k-images.zip: {zip_bytes / 1000:.1f} kB, then unzipped" in proc.stdout and 'free on this disk' in proc.stdout

    meta = json.load(open(data / 'meta.json'))
    assert split_counts(meta) == dict(collections.Counter(row['split'] for row in rows)) == {'train': 3, 'val': 2, 'test': 2}
    dataset = json.load(open(data / 'dataset.json'))
    assert [(im['filename'], im['split']) for im in dataset['images']] == [(r['filename'], r['split']) for r in rows]
    first = dataset['images'][0]['sentences'][0]
    assert first['raw'] == rows[0]['raw'][0] and first['raw'].startswith('A man says "hi"')
    assert first['tokens'] == tokenize(first['raw'])
    assert open(data / 'test_files.txt').read().split() == [r['filename'] for r in rows if r['split'] == 'test']
    assert (data / 'flickr30k-images' / '999999999.jpg').exists()   # in the zip, not in Karpathy's split
    assert meta['downloads']['flickr_annotations_30k.csv']['url'] == url + 'flickr_annotations_30k.csv'

    assert train_and_eval(data, tmp_path / 'run')['n_images'] == 2
    heads = len(file_server.heads)   # all here now: nothing to fetch, nothing to unzip, no request
    assert [plan[2:] for plan in plan_downloads('flickr30k', str(data), url)] == [(0, 0), (0, 0)]
    assert len(file_server.heads) == heads


def test_fresh_coco_from_mirror_then_train_and_eval(tmp_path, file_server):
    pytest.importorskip('pyarrow', reason='the COCO download needs the pip extra requirements-parquet.txt')
    tables = make_coco_files(tmp_path / 'srv')
    url = file_server(tmp_path / 'srv')
    data = tmp_path / 'coco'
    run_script('prep.py', '--dataset=coco', f'--mirror={url}', '--weights=random', f'--data_dir={data}', '--workers=2')
    assert sorted(p for p, _, _ in file_server.log) == sorted(
        ['/train2014.zip', '/val2014.zip', '/train-00000-of-00001.parquet', '/restval-00000-of-00001.parquet',
         '/validation-00000-of-00001.parquet', '/test-00000-of-00001.parquet'])

    meta = json.load(open(data / 'meta.json'))
    counts = {split: len(rows) for split, rows in tables.items()}
    assert split_counts(meta) == {'train': counts['train'] + counts['restval'], 'val': counts['val'], 'test': counts['test']}
    assert os.path.normpath(meta['images_dir']) == str(data)   # train2014/ and val2014/ side by side, as Karpathy's filepath says
    dataset = json.load(open(data / 'dataset.json'))
    expected = [(r['filepath'], r['filename'], r['cocoid'], split) for split, rows in tables.items() for r in rows]
    assert [(im['filepath'], im['filename'], im['cocoid'], im['split']) for im in dataset['images']] == expected
    six = tables['train'][1]   # COCO has images with more than 5 captions: the first 5 are kept
    assert len(six['sentences']) == 6
    train_files = open(data / 'train_files.txt').read().split()
    assert train_files[1] == f"train2014/{six['filename']}" and train_files[2].startswith('val2014/')
    caps = open(data / 'train_caps.txt').read().splitlines()
    assert len(caps) == 5 * len(train_files) and caps[5:10] == [' '.join(tokenize(s)) for s in six['sentences'][:5]]

    assert train_and_eval(data, tmp_path / 'run')['n_images'] == counts['test']


def fake_free_space(monkeypatch, free):
    import download
    monkeypatch.setattr(download.shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(10 ** 13, 10 ** 13 - free, free))


def test_a_disk_too_small_is_refused_before_anything_is_fetched(tmp_path, file_server, monkeypatch, capsys):
    from download import fetch
    make_flickr30k_files(tmp_path / 'srv')
    url = file_server(tmp_path / 'srv')
    (tmp_path / 'd').mkdir()
    fake_free_space(monkeypatch, 10_000)
    with pytest.raises(UserError, match=r'flickr30k needs \d+\.\d kB of disk space .* but 10\.0 kB is free; .*--data_dir'):
        fetch('flickr30k', str(tmp_path / 'd'), url)
    assert file_server.log == [] and os.listdir(tmp_path / 'd') == []
    # the public sources: their documented sizes, no request at all (4.39 GB zipped, as much unzipped, the CSV)
    fake_free_space(monkeypatch, 5 * 10 ** 9)
    with pytest.raises(UserError, match=r'flickr30k needs 8\.8 GB of disk space .* but 5\.0 GB is free'):
        fetch('flickr30k', str(tmp_path / 'd'), '')
    out = capsys.readouterr().out
    assert 'flickr30k-images.zip: 4.4 GB, then unzipped: about 4.4 GB' in out and 'free on this disk: 5.0 GB' in out


def test_a_partial_download_counts_only_what_is_left(tmp_path):
    from download import SOURCES, plan_downloads
    (tmp_path / 'val2014.zip.part').write_bytes(b'x' * 1_000_000)
    plan = {name: (to_fetch, to_unzip) for name, _, to_fetch, to_unzip in plan_downloads('coco', str(tmp_path))}
    size = SOURCES['coco']['val2014.zip'].size
    assert plan['val2014.zip'] == (size - 1_000_000, size) and plan['test-00000-of-00001.parquet'][1] == 0


def test_coco_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    from download import fetch
    monkeypatch.setitem(sys.modules, 'pyarrow', None)          # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, 'pyarrow.parquet', None)
    with pytest.raises(UserError, match=r'needs pyarrow: pip install -r requirements-parquet\.txt$'):
        fetch('coco', str(tmp_path), 'http://127.0.0.1:9/')   # said before any request
    assert os.listdir(tmp_path) == []


def test_a_flickr30k_table_not_as_published_is_one_clear_error(tmp_path):
    from download import flickr30k_json
    path = tmp_path / 'flickr_annotations_30k.csv'
    path.write_text('caption,split,filename\n"[]",train,1.jpg\n')
    with pytest.raises(UserError, match="no column raw .*delete it and run prep.py again"):
        flickr30k_json(str(path))
    path.write_text('raw,sentids,split,filename,img_id\n"[""a dog""]",[0],train,1.jpg,0\n"not json",[1],val,2.jpg,1\n')
    with pytest.raises(UserError, match="1 captions for 1.jpg; expected 5"):
        flickr30k_json(str(path))
    path.write_text('raw,sentids,split,filename,img_id\n"not json",[1],val,2.jpg,1\n')
    with pytest.raises(UserError, match="line 2: column 'raw' is not a JSON list of captions"):
        flickr30k_json(str(path))


def test_a_coco_split_file_not_as_published_is_one_clear_error(tmp_path):
    pa = pytest.importorskip('pyarrow')
    import pyarrow.parquet as pq
    from download import coco_json
    path = tmp_path / 'test-00000-of-00001.parquet'
    pq.write_table(pa.table({'filename': ['a.jpg'], 'captions': [['a dog'] * 5]}), path)
    with pytest.raises(UserError, match='not a Parquet file with the columns filepath, filename, sentences, cocoid'):
        coco_json({'test': str(path)})
    path.write_bytes(b'PAR1 truncated')
    with pytest.raises(UserError, match='delete it and run prep.py again'):
        coco_json({'test': str(path)})
