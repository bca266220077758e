"""Bad input of every kind (issue 11), one row per case: a bad option of each script, a file of
each format with a field of the wrong type, someone else's folder, two runs into one folder, a
--force prep interrupted. Each ends with exit 1, one line on stderr naming the file or option,
no traceback, and every file that was on disk before byte-for-byte as it was (snapshot; the lock
files, which hold the process id of their last owner, are not data). Also --help on every script,
the tokenization of queries, and the advice given for a failed write.

The scripts run in this process through run_main (test_reliability.run_here), as the command
line runs them; as processes only where the process matters (two at once, a kill).
"""
import errno
import hashlib
import json
import os
import shutil
import signal
import time
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.io
import torch

from conftest import assert_user_error, run_here, start, wait_for, write_pair

SMALL = ['--dataset=synthetic', '--synthetic_sizes=60,20,20', '--synthetic_dim=32']
TRAIN = ['--dataset=synthetic', '--epochs=1', '--embed_dim=16', '--word_dim=8', '--batch_size=8', '--compile=False']
LOCKS = ('.prep.lock', '.train.lock')


def snapshot(*folders, skip=()):
    """Every file under the folders (lock files and `skip` aside) -> the SHA-256 of its bytes."""
    files = {}
    for folder in folders:
        for root, dirs, names in os.walk(folder):
            dirs[:] = [d for d in dirs if d not in skip]
            for name in names:
                if name not in LOCKS and name not in skip:
                    path = os.path.join(root, name)
                    files[path] = hashlib.sha256(open(path, 'rb').read()).hexdigest()
    return files


def assert_refused(proc, before, folders, *fragments):
    assert_user_error(proc, *fragments)
    assert 'Traceback' not in proc.stderr + proc.stdout
    assert snapshot(*folders) == before


@pytest.fixture(scope='module')
def made(tmp_path_factory):
    """A tiny synthetic dataset and a run trained on it, made once."""
    root = tmp_path_factory.mktemp('bad_input')
    data, run = root / 'data', root / 'run'
    assert run_here('prep', *SMALL, f'--data_dir={data}').returncode == 0
    proc = run_here('train', *TRAIN, f'--data_dir={data}', f'--out_dir={run}')
    assert proc.returncode == 0, proc.stderr
    assert run_here('eval', f'--out_dir={run}', '--compile=False').returncode == 0
    return SimpleNamespace(data=data, run=run)


# ----------------------------------------------------------------------------- options

BAD_OPTIONS = [
    ('train', '--out_dir=tests/conftest.py', '--out_dir=tests/conftest.py: must be a folder, not a file'),
    ('train', '--batch_size=0', '--batch_size=0: must be from 2 to 65536'),
    ('train', '--batch_size=1', 'no negative'),
    ('train', '--epochs=0', '--epochs=0: must be from 1 to 100000'),
    ('train', '--log_interval=0', '--log_interval=0'),
    ('train', '--embed_dim=0', '--embed_dim=0'),
    ('train', '--word_dim=-4', '--word_dim=-4'),
    ('train', '--learning_rate=1e999', '--learning_rate=inf: must be a finite number'),
    ('train', '--learning_rate=-1e-3', '--learning_rate=-0.001'),
    ('train', '--grad_clip=-1', '--grad_clip=-1.0', '0: no clipping'),
    ('train', '--word_dropout=1.0', '--word_dropout=1.0: must be a probability in [0, 1)'),
    ('train', '--image_dropout=-0.1', '--image_dropout=-0.1: must be a probability in [0, 1)'),
    ('train', '--weight_decay=-1e-4', '--weight_decay=-0.0001'),
    ('train', '--weight_decay=1e999', '--weight_decay=inf: must be a finite number'),
    ('train', '--word_dropout=nan', '--word_dropout=nan'),
    ('train', '--margin=-0.1', '--margin=-0.1'),
    ('train', '--margin=1e999', '--margin=inf: must be a finite number'),
    ('train', '--seed=-1', '--seed=-1'),
    ('train', '--seed=99999999999', '--seed=99999999999'),
    ('train', '--device=banana', "--device=banana: must be one of this machine's devices: auto, cpu"),
    ('train', '--device=cuda:99', '--device=cuda:99'),
    ('train', '--measure=dot', '--measure=dot: must be one of order, cosine'),
    ('train', '--dtype=half', '--dtype=half'),
    ('train', '--patience=-1', '--patience=-1'),
    ('train', '--eval_interval=-5', '--eval_interval=-5'),
    ('train', '--val_images=-1', '--val_images=-1'),
    ('train', '--val_images=21', '--val_images=21: the val split', 'has 20 images'),
    ('train', '--warmup_epochs=-1', '--warmup_epochs=-1'),
    ('train', '--lr_decay_epoch=-2', '--lr_decay_epoch=-2'),
    ('train', '--embed_dim=big', '--embed_dim=big: expected an int like'),
    ('train', '--cnn_learning_rate=-2e-4', '--cnn_learning_rate=-0.0002'),
    ('train', '--workers=-1', '--workers=-1: must be from 0 to 256'),
    ('prep', '--data_dir=tests/conftest.py', '--data_dir=tests/conftest.py: must be a folder'),
    ('prep', '--dataset=', '--dataset=: must be a name'),
    ('prep', '--features=feats.npz', '--features=feats.npz', '.npy file'),
    ('prep', '--features=missing.npy', '--features=missing.npy'),
    ('prep', '--dataset_json=missing.json', '--dataset_json=missing.json'),
    ('prep', '--images_dir=no/such/folder', '--images_dir=no/such/folder'),
    ('prep', '--mirror=example.com/files', '--mirror=example.com/files', 'scheme'),
    ('prep', '--cnn=alexnet', '--cnn=alexnet: must be one of vgg16'),
    ('prep', '--crops=5', '--crops=5'),
    ('prep', '--keep_crops=True', '--keep_crops=True: the synthetic set has one feature per image'),
    ('prep', '--keep_crops=1', '--keep_crops=1: expected a bool'),
    ('prep', '--weights=missing.pth', '--weights=missing.pth'),
    ('prep', '--batch_size=-1', '--batch_size=-1'),
    ('prep', '--workers=-1', '--workers=-1'),
    ('prep', '--decode=gpu', '--decode=gpu'),
    ('prep', '--device=banana', '--device=banana'),
    ('prep', '--vocab_threshold=0', '--vocab_threshold=0'),
    ('prep', '--vocab_threshold=100000', '--vocab_threshold=100000: no word', 'lower it'),
    ('prep', '--max_len=0', '--max_len=0'),
    ('prep', '--synthetic_sizes=60,0,20', '--synthetic_sizes=60,0,20: must be three positive counts'),
    ('prep', '--synthetic_sizes=60,20', '--synthetic_sizes=60,20'),
    ('prep', '--synthetic_sizes=a,b,c', '--synthetic_sizes=a,b,c'),
    ('prep', '--synthetic_dim=0', '--synthetic_dim=0'),
    ('prep', '--seed=-5', '--seed=-5'),
    ('eval', '--k=0', '--k=0: must be from 1 to 100000'),
    ('eval', '--gallery_queries=0', '--gallery_queries=0'),
    ('eval', '--gallery_by=caption', '--gallery_by=caption: must be one of text, image'),
    ('eval', '--gallery=out.jpg', '--gallery=out.jpg', 'PNG'),
    ('eval', '--device=banana', '--device=banana'),
    ('eval', '--device=cuda:99', '--device=cuda:99'),
    ('eval', '--checkpoint=', '--checkpoint='),
    ('eval', '--images_dir=no/such/folder', '--images_dir=no/such/folder'),
    ('eval', '--ensemble=,', "--ensemble=,: must be '' or run folders"),
    ('eval', '--ensemble=no/such/run', '--ensemble=no/such/run', 'each an existing folder'),
    ('bench', '--scale=huge', '--scale=huge'),
    ('bench', '--stages=train,fly', '--stages=train,fly'),
    ('bench', '--stages=', '--stages=: must be a comma-separated subset'),
    ('bench', '--train_iters=-1', '--train_iters=-1'),
    ('bench', '--decode=gpu', '--decode=gpu'),
    ('bench', '--seed=-1', '--seed=-1'),
    ('bench', '--device=banana', '--device=banana'),
]


@pytest.mark.parametrize('script,option,fragments', [(s, o, f) for s, o, *f in BAD_OPTIONS],
                         ids=[f'{s} {o}' for s, o, *_ in BAD_OPTIONS])
def test_bad_option_is_one_line_before_any_work(made, tmp_path, script, option, fragments):
    folders = {'train': [f'--data_dir={made.data}', f'--out_dir={tmp_path / "run"}', *TRAIN],
               'prep': [f'--data_dir={tmp_path / "data"}', *SMALL],
               'eval': [f'--out_dir={made.run}', '--compile=False'],
               'bench': ['--scale=tiny', f'--out={tmp_path / "bench.json"}']}[script]
    before = snapshot(made.data, made.run, tmp_path)
    assert_refused(run_here(script, *folders, option), before, [made.data, made.run, tmp_path], option.split('=')[0],
                   *fragments)


@pytest.mark.parametrize('script', ['prep', 'train', 'eval', 'bench'])
@pytest.mark.parametrize('flag', ['--help', '-h'])
def test_help_lists_every_option_with_its_default_and_meaning(script, flag):
    proc = run_here(script, flag)
    module = __import__(script)
    assert proc.returncode == 0 and proc.stderr == '', proc
    assert proc.stdout.startswith(f'{script}.py: {module.__doc__.split(chr(10))[0]}')
    lines = proc.stdout.splitlines()
    for key in module.CONFIG_KEYS:
        line = next(line for line in lines if line.strip().startswith(f'--{key}='))
        assert len(line.split()) > 1, line  # a default, then what it means
    if script == 'train':
        assert any(line.split()[:1] == ['--grad_clip=2.0'] and '0 = no clipping' in line for line in lines)


# ----------------------------------------------------------------------------- files

def bad_dataset_json(case, folder):
    """A dataset.json (with vgg_feats.mat) with one field broken; returns prep.py's extra args."""
    data, feats = write_pair(folder, ['train'] * 3 + ['val', 'test'])
    images = data['images']
    npy = folder / 'mine.npy'
    rows = np.random.default_rng(1).random((5, 8))
    changes = {
        'null_filepath': lambda: images[1].update(filepath=None),
        'numeric_filepath': lambda: images[1].update(filepath=7),
        'list_filename': lambda: images[2].update(filename=['2.jpg']),
        'no_filename': lambda: images[2].pop('filename'),
        'numeric_token': lambda: images[0]['sentences'][1].update(tokens=['a', 3, 'dogs']),
        'null_token': lambda: images[0]['sentences'][0].update(tokens=[None]),
        'sentences_object': lambda: images[3].update(sentences={'raw': 'a dog'}),
        'sentences_string': lambda: images[3].update(sentences='a dog runs'),
        'numeric_raw': lambda: images[4].update(sentences=[{'raw': 5}] * 5),
        'duplicate_file': lambda: images[3].update(filename='0.jpg'),
    }
    if case in changes:
        changes[case]()
    (folder / 'dataset.json').write_text(json.dumps(data))
    if case == 'nested':
        (folder / 'dataset.json').write_text('{"images": ' + '[' * 100000 + ']' * 100000 + '}')
    elif case in CROP_ARRAYS:
        shape, options = CROP_ARRAYS[case]
        np.save(npy, np.random.default_rng(1).random(shape))
        return [f'--features={npy}', *options]
    elif case == 'keep_crops_of_mat':
        return ['--crops=10', '--keep_crops=True']
    elif case.startswith('mat_'):
        value = {'mat_cell': np.array([feats[:, 0], 'x'], dtype=object), 'mat_text': 'features',
                 'mat_complex': feats + 1j}[case]
        scipy.io.savemat(folder / 'vgg_feats.mat', {'feats': value})
    elif case.startswith('npy_'):
        with open(npy, 'wb') as f:  # the name says .npy, whatever the content
            if case == 'npy_npz':
                np.savez(f, feats=rows)
            else:
                np.save(f, rows.astype(np.complex64) if case == 'npy_complex' else np.array([['a'] * 8] * 5))
        return [f'--features={npy}']
    return []


CROP_ARRAYS = {  # --features arrays that do not fit the crop options: (shape, options)
    'npy_crop_count': ((5, 4, 8), ['--crops=10']),
    'npy_no_crops': ((5, 0, 8), []),
    'npy_4d': ((5, 2, 2, 8), []),
    'npy_keep_one_feature': ((5, 8), ['--keep_crops=True']),
    'npy_keep_one_crop': ((5, 1, 8), ['--keep_crops=True']),
}


BAD_FILES = [
    ('null_filepath', "image 1: its 'filepath' is null; expected a file name"),
    ('numeric_filepath', "image 1: its 'filepath' is 7"),
    ('list_filename', """image 2: its 'filename' is ["2.jpg"]"""),
    ('no_filename', "image 2: its 'filename' is null"),
    ('numeric_token', "image 0 (0.jpg): a caption's 'tokens' holds 3; tokens are strings"),
    ('null_token', "'tokens' holds null"),
    ('sentences_object', """image 3 (3.jpg): 'sentences' is {"raw": "a dog"}; expected a list"""),
    ('sentences_string', "'sentences' is \"a dog runs\""),
    ('numeric_raw', "image 4 (4.jpg): a sentence without 'tokens'"),
    ('duplicate_file', 'dataset.json: images 0 and 3 are both 0.jpg'),
    ('nested', 'dataset.json: JSON nested too deeply'),
    ('mat_cell', "vgg_feats.mat: 'feats': an array of object values, expected real numbers"),
    ('mat_text', "vgg_feats.mat: 'feats': an array of <U8 values"),
    ('mat_complex', "'feats': an array of complex"),
    ('npy_npz', 'mine.npy: a .npz archive, not an array'),
    ('npy_complex', 'mine.npy: an array of complex64 values'),
    ('npy_text', 'mine.npy: an array of <U1 values'),
    ('npy_crop_count', 'mine.npy: 4 crops per image (shape (5, 4, 8)), but --crops=10; pass --crops=4 or leave --crops out'),
    ('npy_no_crops', 'mine.npy: shape (5, 0, 8): no crops per image'),
    ('npy_4d', 'mine.npy: shape (5, 2, 2, 8), expected (5, D)'),
    ('npy_keep_one_feature', 'mine.npy holds one feature per image, shape (5, 8); keeping crops needs an (N, C, D)'),
    ('npy_keep_one_crop', 'mine.npy holds one crop per image, shape (5, 1, 8), nothing to keep apart'),
    ('keep_crops_of_mat', "vgg_feats.mat: Karpathy's features, one per image, come before the images, so --keep_crops"),
]


@pytest.mark.parametrize('case,fragment', BAD_FILES, ids=[c for c, _ in BAD_FILES])
def test_bad_file_for_prep_is_one_line(tmp_path, case, fragment):
    args = bad_dataset_json(case, tmp_path)
    before = snapshot(tmp_path)
    assert_refused(run_here('prep', '--dataset=x', f'--data_dir={tmp_path}', *args), before, [tmp_path], fragment)


BAD_RUN_FILES = [
    ('train_npz', 'train', 'train_ims.npy: a .npz archive'),
    ('train_complex', 'train', 'train_ims.npy: an array of complex64 values'),
    ('config_without_field', 'eval', 'best.pt: its config lacks word_dim'),
    ('config_not_dict', 'eval', 'best.pt: its config lacks measure, embed_dim, word_dim, data_dir'),
    ('feature_dim_text', 'eval', 'best.pt: its config lacks feature_dim'),
    ('results_list', 'compare', 'results_test.json: not a results file eval.py writes'),
    ('results_without_rsum', 'compare', 'results_test.json: not a results file'),
    ('results_text_recall', 'compare', 'results_test.json: not a results file'),
]


@pytest.mark.parametrize('case,script,fragment', BAD_RUN_FILES, ids=[c for c, _, _ in BAD_RUN_FILES])
def test_bad_prepared_or_run_file_is_one_line(made, tmp_path, case, script, fragment):
    data, run = tmp_path / 'data', tmp_path / 'run'
    shutil.copytree(made.data, data)
    shutil.copytree(made.run, run)
    ims = data / 'train_ims.npy'
    if case == 'train_npz':
        with open(ims, 'wb') as f:
            np.savez(f, np.load(made.data / 'train_ims.npy'))
    elif case == 'train_complex':
        np.save(ims, np.load(made.data / 'train_ims.npy').astype(np.complex64))
    elif case.startswith(('config', 'feature')):
        ckpt = torch.load(run / 'best.pt', weights_only=True)
        if case == 'config_without_field':
            del ckpt['config']['word_dim']
        elif case == 'config_not_dict':
            ckpt['config'] = ['order']
        else:
            ckpt['feature_dim'] = '32'
        torch.save(ckpt, run / 'best.pt')
    else:
        result = json.loads((made.run / 'results_test.json').read_text()) if case != 'results_list' else []
        if case == 'results_without_rsum':
            del result['rsum']
        elif case == 'results_text_recall':
            result['t2i']['r5'] = '12.5'
        (run / 'results_test.json').write_text(json.dumps(result))
    args = {'train': [*TRAIN, f'--data_dir={data}', f'--out_dir={tmp_path / "new"}'],
            'eval': [f'--out_dir={run}', f'--data_dir={data}', '--compile=False'],
            'compare': [f'--compare={made.run},{run}']}[script]
    before = snapshot(tmp_path)
    assert_refused(run_here('train' if script == 'train' else 'eval', *args), before, [tmp_path], fragment)


# ----------------------------------------------------------------------------- ensembles

def ensemble_member(case, made, tmp_path):
    """A second run for made.run's ensemble, unfit for it in one way; returns eval.py's extra args."""
    run = tmp_path / 'member'
    if case in ('twice', 'save_embeddings', 'query', 'compare'):
        return [f'--ensemble={made.run},{made.run}' if case == 'twice' else f'--ensemble={made.run}',
                {'twice': '--split=test', 'save_embeddings': '--save_embeddings=True', 'query': '--query=a red star',
                 'compare': f'--compare={made.run}'}[case]]
    if case == 'no_checkpoint':
        run.mkdir()
    elif case == 'other_features':  # really trained, on 48-d features
        assert run_here('prep', *SMALL[:2], '--synthetic_dim=48', f'--data_dir={tmp_path / "data48"}').returncode == 0
        assert run_here('train', *TRAIN, f'--data_dir={tmp_path / "data48"}', f'--out_dir={run}').returncode == 0
    else:  # made.run's weights, said to come from another vocabulary, measure or dataset
        shutil.copytree(made.run, run)
        ckpt = torch.load(run / 'best.pt', weights_only=True)
        if case == 'other_vocab':
            words = sorted(ckpt['vocab'], key=ckpt['vocab'].get)
            ckpt['vocab'].update({words[2]: ckpt['vocab'][words[3]], words[3]: ckpt['vocab'][words[2]]})
        elif case == 'other_measure':
            ckpt['model_config']['measure'] = 'cosine'
        else:
            data = tmp_path / 'data'
            shutil.copytree(made.data, data)
            if case == 'other_dataset':
                meta = json.loads((data / 'meta.json').read_text())
                (data / 'meta.json').write_text(json.dumps({**meta, 'dataset': 'x'}))
            else:  # other_contents: the same shapes, other images
                np.save(data / 'test_ims.npy', np.load(data / 'test_ims.npy')[::-1].copy())
            ckpt['config']['data_dir'] = str(data)
        torch.save(ckpt, run / 'best.pt')
    return [f'--ensemble={made.run},{run}']


BAD_ENSEMBLES = [
    ('twice', 'is listed twice', 'list each run once'),
    ('no_checkpoint', 'member/best.pt: no such checkpoint'),
    ('other_features', 'take image features of different sizes (48-d, 32-d)'),
    ('other_vocab', 'have different vocabularies'),
    ('other_measure', 'use different measures (cosine, order)'),
    ('other_dataset', 'were trained on different datasets (x, synthetic)'),
    ('other_contents', 'were trained on different data', 'hold different test splits'),
    ('save_embeddings', '--save_embeddings: an ensemble has no one set of embeddings'),
    ('query', '--ensemble scores a split'),
    ('compare', '--compare and --ensemble: give one of the two'),
]


@pytest.mark.parametrize('case,fragments', [(c, f) for c, *f in BAD_ENSEMBLES], ids=[c for c, *_ in BAD_ENSEMBLES])
def test_bad_ensemble_is_one_line(made, tmp_path, case, fragments):
    """Runs that do not score the split alike (another dataset, feature size, vocabulary, measure,
    split), a run listed twice or without its checkpoint, an option an ensemble has no use for:
    refused before anything is written."""
    args = ensemble_member(case, made, tmp_path)
    before = snapshot(made.data, made.run, tmp_path)
    assert_refused(run_here('eval', *args, '--compile=False'), before, [made.data, made.run, tmp_path], *fragments)
    assert not (made.run / 'results_test_ensemble.json').exists()


# ----------------------------------------------------------------------------- folders

@pytest.mark.parametrize('names', [['best.pt'], ['results_test.json'], ['last.pt', 'log.jsonl']])
def test_train_refuses_a_folder_holding_another_run(made, tmp_path, names):
    """Another run's best.pt or results, with or without last.pt: refused without --resume=True,
    and the folder left as it was (no lock file made either). (A log alone is of a run that
    stopped before its first save: tests/test_restart.py.)"""
    run = tmp_path / 'theirs'
    run.mkdir()
    for name in names:
        shutil.copy(made.run / name, run / name)
    before = snapshot(run, made.data)
    assert_refused(run_here('train', *TRAIN, f'--data_dir={made.data}', f'--out_dir={run}'), before, [run, made.data],
                   f'{run} holds another run ({", ".join(n for n in names if n != "log.jsonl")})', '--resume=True')
    assert sorted(os.listdir(run)) == sorted(names)


@pytest.mark.parametrize('theirs', [['dataset.json', 'images'], ['train_ims.npy', 'vocab.json']])
def test_prep_refuses_files_it_did_not_write(tmp_path, theirs):
    """Someone's own dataset.json and images/ (or arrays) in the folder, no meta.json: a synthetic
    prep is refused and changes nothing; with --force=True it replaces them."""
    data = tmp_path / 'data'
    data.mkdir()
    for name in theirs:
        if name == 'images':
            (data / 'images').mkdir()
            (data / 'images' / 'mine.jpg').write_bytes(b'my photo')
        else:
            (data / name).write_text('my own file')
    before = snapshot(data)
    assert_refused(run_here('prep', *SMALL, f'--data_dir={data}'), before, [data],
                   f'{data}: holds {", ".join(theirs)} but no meta.json', '--force=True')
    assert not (data / '.prep.lock').exists()
    assert run_here('prep', *SMALL, f'--data_dir={data}', '--force=True').returncode == 0
    assert (data / 'meta.json').exists() and (data / theirs[0]).exists()
    assert not (data / 'images' / 'mine.jpg').exists() and (data / theirs[0]).read_bytes() != b'my own file'
    assert not (data / '.prep-staging').exists()


def test_second_train_into_a_running_folder_is_refused(made, tmp_path):
    """A second train.py into the --out_dir of one at work: one line naming the first's process id;
    the first finishes as if alone."""
    run = tmp_path / 'run'
    first = start('train.py', *TRAIN, '--epochs=12', f'--data_dir={made.data}', f'--out_dir={run}')
    output = ''.join(wait_for(first, 'training on'))
    before = snapshot(run, made.data, skip=('log.jsonl', 'curves.png', 'last.pt', 'best.pt'))
    second = run_here('train', *TRAIN, f'--data_dir={made.data}', f'--out_dir={run}')
    also_resumed = run_here('train', *TRAIN, f'--data_dir={made.data}', f'--out_dir={run}', '--resume=True')
    output += first.communicate(timeout=600)[0]
    for proc in (second, also_resumed):
        assert_user_error(proc, f'{run}: another train.py is writing this run folder right now',
                          f'by process {first.pid}')
    assert first.returncode == 0 and 'done: best validation rsum' in output, output
    log = [json.loads(line) for line in open(run / 'log.jsonl')]
    assert [r['iteration'] for r in log] == sorted(r['iteration'] for r in log) and log[-1]['iteration'] == 12 * 38
    assert torch.load(run / 'best.pt', weights_only=True)['config']['out_dir'] == str(run)
    assert snapshot(run, made.data, skip=('log.jsonl', 'curves.png', 'last.pt', 'best.pt')) == before


def test_interrupted_synthetic_force_leaves_the_old_dataset_whole(tmp_path):
    """A --force=True synthetic prep killed while it draws its pictures (in the staging folder):
    the old dataset.json, pictures, arrays and meta.json are as they were and still load."""
    from utils import load_meta, load_split
    data = tmp_path / 'data'
    assert run_here('prep', *SMALL, f'--data_dir={data}').returncode == 0
    before = snapshot(data)
    proc = start('prep.py', '--dataset=synthetic', f'--data_dir={data}', '--synthetic_sizes=3000,300,300',
                 '--synthetic_dim=32', '--seed=7', '--force=True')
    deadline = time.time() + 300
    while not (data / '.prep-staging' / 'images').exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert snapshot(data, skip=('.prep-staging',)) == before
    assert load_meta(str(data))['splits']['train']['images'] == 60 and len(load_split(str(data), 'val')[1]) == 100


def test_failed_synthetic_force_leaves_the_old_dataset_whole(tmp_path, monkeypatch):
    """A --force=True synthetic prep whose disk fills up while it writes its pictures."""
    from PIL import Image
    data = tmp_path / 'data'
    assert run_here('prep', *SMALL, f'--data_dir={data}').returncode == 0
    before = snapshot(data)
    save, saved = Image.Image.save, []

    def save_until_full(picture, path, *args, **kw):
        if len(saved) == 30:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        saved.append(path)
        return save(picture, path, *args, **kw)
    monkeypatch.setattr(Image.Image, 'save', save_until_full)
    proc = run_here('prep', *SMALL, f'--data_dir={data}', '--seed=7', '--force=True')
    assert_refused(proc, before, [data], 'No space left on device', 'free some disk space')
    assert not (data / '.prep-staging').exists()


def test_eval_finds_a_relative_data_dir_from_any_folder(made, tmp_path, monkeypatch):
    """An older checkpoint keeps data_dir and out_dir as given (relative to where train.py ran):
    eval.py run from elsewhere finds the dataset from the run folder's path, or says where it looked."""
    project = tmp_path / 'project'
    shutil.copytree(made.data, project / 'data' / 'x')
    run = project / 'checkpoints' / 'x'
    run.mkdir(parents=True)
    ckpt = torch.load(made.run / 'best.pt', weights_only=True)
    ckpt['config'].update(data_dir='data/x', out_dir='checkpoints/x')
    torch.save(ckpt, run / 'best.pt')
    (tmp_path / 'elsewhere').mkdir()
    monkeypatch.chdir(tmp_path / 'elsewhere')
    proc = run_here('eval', '--out_dir=../project/checkpoints/x', '--compile=False')
    assert proc.returncode == 0 and (run / 'results_test.json').exists(), proc.stderr
    shutil.rmtree(project / 'data')
    before = snapshot(tmp_path)
    assert_refused(run_here('eval', '--out_dir=../project/checkpoints/x', '--compile=False'), before, [tmp_path],
                   'the dataset it was trained on is not prepared where it was', f'{project / "data" / "x"}',
                   '--data_dir=')


# ----------------------------------------------------------------------------- words and advice

def test_queries_are_tokenized_as_the_captions_were():
    import re
    import prep
    from utils import tokenize
    rng = np.random.default_rng(0)
    for _ in range(200):  # ASCII: exactly the [a-z0-9]+ of Karpathy's tokens, as before
        text = ''.join(chr(c) for c in rng.integers(32, 127, 40))
        assert tokenize(text) == re.findall(r'[a-z0-9]+', text.lower())
    assert tokenize('Un CAFÉ, naïve-résumé!') == ['un', 'café', 'naïve', 'résumé']
    assert tokenize('cafe\u0301') == ['café']  # an accent typed as its own code point
    assert tokenize('一只狗 в снегу') == ['一只狗', 'в', 'снегу']  # other scripts have words too
    words = prep.read_caption({'tokens': ['Café', 'au', 'LAIT']}, 'x', 100)
    assert words == tokenize('café au lait')


def test_a_query_in_another_script_is_words_found_or_unknown():
    from conftest import make_model
    from utils import encode_text
    vocab = {'<pad>': 0, '<unk>': 1, 'café': 2, 'dog': 3}
    model = make_model(8, len(vocab), 4, 6, 'order')
    found = encode_text(model, vocab, ['CAFÉ'])
    assert torch.equal(found, encode_text(model, vocab, ['café'], tokenized=True))
    assert torch.equal(encode_text(model, vocab, ['狗']), encode_text(model, vocab, ['<unk>'], tokenized=True))


@pytest.mark.parametrize('code,advice', [
    (errno.EACCES, 'check the permissions'), (errno.EPERM, 'check the permissions'), (errno.EROFS, 'read-only'),
    (errno.ENOSPC, 'free some disk space'), (errno.EFBIG, 'free some disk space'), (errno.ENOENT, 'check the path'),
])
def test_a_failed_write_gets_the_advice_of_its_cause(tmp_path, monkeypatch, code, advice):
    import tempfile
    from utils import UserError, atomic_open, file_advice
    assert advice in file_advice(OSError(code, os.strerror(code)))
    if code != errno.EACCES:
        return
    (tmp_path / 'out.json').write_text('old')

    def refuse(*args, **kw):
        raise PermissionError(code, os.strerror(code))
    monkeypatch.setattr(tempfile, 'mkstemp', refuse)
    with pytest.raises(UserError) as e:
        with atomic_open(str(tmp_path / 'out.json'), 'w') as f:
            f.write('new')
    assert 'Permission denied' in str(e.value) and 'permissions' in str(e.value) and 'disk space' not in str(e.value)
    assert (tmp_path / 'out.json').read_text() == 'old'


def test_a_refused_prep_into_a_new_folder_leaves_no_folder(tmp_path):
    """A prep that stops before writing anything (here: a dataset json of the wrong shape) does
    not leave behind the folder it made for the dataset."""
    (tmp_path / 'dataset.json').write_text('{"hello": 1}')
    proc = run_here('prep', '--dataset=x', f'--data_dir={tmp_path / "new"}', f'--dataset_json={tmp_path / "dataset.json"}')
    assert_user_error(proc, 'dataset.json', "Karpathy's format")
    assert not (tmp_path / 'new').exists()
