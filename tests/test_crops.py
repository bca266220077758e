"""Kept crops (issue 20): prep.py --keep_crops=True writes every crop's feature, (N, C, D), from
an (N, C, D) --features array or extracted (resumably) from the images; validation and eval.py
score each image's mean crop; train.py draws one crop per image per step, a function of (seed,
iteration) alone, so that a stopped and resumed run ends bit for bit where an uninterrupted one
does. Bad crop options are in tests/test_bad_input.py's tables."""
import importlib
import json
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import assert_user_error, dataset_from_array, image_dataset, run_here, tiny_backbone, write_pair
from test_reliability import assert_same_run

N_CROPS, DIM = 4, 64
SPLITS = ['train'] * 40 + ['val'] * 10 + ['test'] * 10
# 13 iterations an epoch: validations and checkpoints every 5, a loss line every 4
TRAIN = ['--dataset=x', '--embed_dim=32', '--word_dim=16', '--batch_size=16', '--epochs=2', '--eval_interval=5',
         '--log_interval=4', '--compile=False']


def crop_features(seed=0):
    """(60, 4, 64) raw features: a direction per image plus a different offset per crop."""
    rng = np.random.default_rng(seed)
    base = rng.random((len(SPLITS), 1, DIM))
    return (base + 0.5 * rng.random((len(SPLITS), N_CROPS, DIM))).astype(np.float32)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope='module')
def kept(tmp_path_factory):
    """A dataset.json, its (N, C, D) features and the dataset prepared from them with kept crops."""
    root = tmp_path_factory.mktemp('crops')
    proc, data = dataset_from_array(root, SPLITS, 'crops.npy', crop_features(), '--keep_crops=True')
    assert proc.returncode == 0, proc.stderr
    assert '(4 crops each, kept)' in proc.stdout
    return SimpleNamespace(root=root, data=data, json=root / 'dataset.json', npy=root / 'crops.npy')


def run_train(*args, stop_at=None, draws=None):
    """train.py's main through run_main, in this process (conftest.run_here), optionally
    stopped as Ctrl-C stops it once `stop_at` iterations are done; `draws` collects the
    iteration of every step_features call."""
    def patch(train):
        if stop_at is not None:
            def agreed(self, iteration, world, dev, every):
                if iteration == stop_at:
                    self.signum = signal.SIGINT
                return self.signum is not None
            train.StopRequests.agreed = agreed
        if draws is not None:
            draw = train.step_features
            train.step_features = lambda feats, iteration, seed: draws.append(iteration) or draw(feats, iteration, seed)
    return run_here('train', *args, patch=patch)


# ----------------------------------------------------------------------------- prep.py

def test_prep_keeps_every_crop_normalized_and_meta_says_so(kept):
    feats = crop_features()
    meta = json.loads((kept.data / 'meta.json').read_text())
    assert meta['crops'] == N_CROPS and meta['kept_crops'] is True and meta['feature_dim'] == DIM
    train = np.load(kept.data / 'train_ims.npy')
    assert train.shape == (40, N_CROPS, DIM) and train.dtype == np.float32
    np.testing.assert_allclose(train, unit(feats[:40]), rtol=1e-5, atol=1e-6)  # each crop on its own
    assert np.load(kept.data / 'val_ims.npy').shape == (10, N_CROPS, DIM)


def test_prep_without_keep_crops_averages_an_array_of_crops(kept, tmp_path):
    """An (N, C, D) --features array without --keep_crops: each image's mean crop, as --crops=10
    makes it; --crops, if given, must be the array's crop count."""
    proc = run_here('prep', '--dataset=x', f'--data_dir={tmp_path}', f'--dataset_json={kept.json}',
                    f'--features={kept.npy}', '--vocab_threshold=1')
    assert proc.returncode == 0 and '4 crops per image, prepared as their mean' in proc.stdout, proc.stderr
    meta = json.loads((tmp_path / 'meta.json').read_text())
    assert meta['crops'] == N_CROPS and 'kept_crops' not in meta
    np.testing.assert_allclose(np.load(tmp_path / 'val_ims.npy'), unit(crop_features()[40:50].mean(1)), rtol=1e-5, atol=1e-6)


def test_keep_crops_with_one_crop_is_refused_before_any_work(tmp_path):
    write_pair(tmp_path, ['train'] * 3 + ['val', 'test'])
    assert_user_error(run_here('prep', '--dataset=x', f'--data_dir={tmp_path / "new"}',
                               f'--dataset_json={tmp_path / "dataset.json"}', '--keep_crops=True'),
                      '--keep_crops=True: --crops=1 is one crop per image', '--crops=10')
    assert not (tmp_path / 'new').exists()


@pytest.mark.parametrize('case', ['train_2d', 'val_other_count'])
def test_kept_crops_of_the_wrong_shape_are_one_line(kept, tmp_path, case):
    import shutil
    data = tmp_path / 'data'
    shutil.copytree(kept.data, data)
    if case == 'train_2d':
        np.save(data / 'train_ims.npy', np.load(data / 'train_ims.npy')[:, 0])
    else:
        np.save(data / 'val_ims.npy', np.load(data / 'val_ims.npy')[:, :3])
    split = case.split('_')[0]
    assert_user_error(run_train(*TRAIN, f'--data_dir={data}', f'--out_dir={tmp_path / "run"}'),
                      f'{split}_ims.npy: shape', f'expected (images, {N_CROPS}, {DIM}) as meta.json says')


def fake_vgg16(monkeypatch):
    """The tiny backbone in place of VGG16, so that extraction through prep.py takes a second."""
    import features
    monkeypatch.setattr(features, 'build_backbone', lambda cnn, weights, device, dtype='float32', grid=False: (tiny_backbone(), 32))
    monkeypatch.setitem(features.CNN_DIMS, 'vgg16', 32)
    return features


def test_extracted_kept_crops_resume_and_average_to_the_ten_crop_features(tmp_path, monkeypatch):
    """--crops=10 --keep_crops=True from the images: (N, 10, D), written batch by batch into
    features_vgg16_10crop_kept.npy; interrupted after two images it resumes there (the rows
    done are not computed again) and ends as an uninterrupted run does; the mean of its raw
    crops is the 10-crop feature prep.py makes without --keep_crops; eval.py --image features a
    new image as the dataset scores its own."""
    features = fake_vgg16(monkeypatch)
    args = ['--dataset=x', '--crops=10', '--keep_crops=True', '--batch_size=1', '--workers=0', '--dtype=float32']
    for name in ('a', 'b'):
        image_dataset(tmp_path / name, ['train', 'train', 'val', 'test', 'test'])
    write_progress = features.write_progress

    def killed_after_two(out, progress_path, job, rows, bad, done):
        write_progress(out, progress_path, job, rows, bad, done)
        if done == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(features, 'write_progress', killed_after_two)
    proc = run_here('prep', *args, f'--data_dir={tmp_path / "a"}')
    assert proc.returncode == 130 and not (tmp_path / 'a' / 'meta.json').exists(), proc.stderr
    monkeypatch.setattr(features, 'write_progress', write_progress)
    raw = tmp_path / 'a' / 'features_vgg16_10crop_kept.npy'
    rows = np.load(raw, mmap_mode='r+')
    assert rows.shape == (5, 10, 32) and json.load(open(f'{raw}.job.json'))['keep_crops'] is True
    rows[0, 3] = 1.0  # a mark on a finished row: computed again, it would be gone
    rows.flush()
    del rows
    proc = run_here('prep', *args, f'--data_dir={tmp_path / "a"}')
    assert proc.returncode == 0 and 'resuming at image 2 of 5' in proc.stdout, proc
    meta = json.loads((tmp_path / 'a' / 'meta.json').read_text())
    assert (meta['crops'], meta['kept_crops'], meta['cnn']) == (10, True, 'vgg16')
    train = np.load(tmp_path / 'a' / 'train_ims.npy')
    assert train.shape == (2, 10, 32)
    np.testing.assert_allclose(train[0, 3], np.full(32, 32 ** -0.5), rtol=1e-6)
    assert run_here('prep', *args, f'--data_dir={tmp_path / "b"}').returncode == 0
    np.testing.assert_array_equal(np.load(raw)[1:], np.load(tmp_path / 'b' / 'features_vgg16_10crop_kept.npy')[1:])
    assert run_here('prep', *args[:2], *args[3:], f'--data_dir={tmp_path / "c"}',  # the same, averaged
                    f'--dataset_json={tmp_path / "b" / "dataset.json"}',
                    f'--images_dir={tmp_path / "b" / "images"}').returncode == 0
    mean = np.load(tmp_path / 'c' / 'features_vgg16_10crop.npy')
    np.testing.assert_allclose(np.load(tmp_path / 'b' / 'features_vgg16_10crop_kept.npy').mean(1), mean, rtol=1e-5, atol=1e-6)
    # eval.py --image: a new image is featured as the dataset scores its own, by its mean crop
    from eval import image_features
    from utils import load_meta, load_split
    test_files = (tmp_path / 'b' / 'test_files.txt').read_text().split()
    got = image_features([str(tmp_path / 'b' / 'images' / f) for f in test_files], load_meta(str(tmp_path / 'b')),
                         torch.device('cpu'))
    np.testing.assert_allclose(got, load_split(str(tmp_path / 'b'), 'test')[0], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- scoring: the mean crop

def test_validation_and_eval_score_the_mean_of_the_crops(kept, tmp_path):
    """Validation's features are each image's crops, summed one by one, divided, normalized;
    eval.py of a kept-crops dataset gives the results of a dataset prepared from those means."""
    train = importlib.reload(importlib.import_module('train'))
    run = tmp_path / 'run'
    proc = run_train(*TRAIN, f'--data_dir={kept.data}', f'--out_dir={run}', '--epochs=1')
    assert proc.returncode == 0 and '(4 crops each, one drawn per step)' in proc.stdout, proc.stderr
    cfg = train.make_config([f'--data_dir={kept.data}'])
    data = train.load_data(cfg, torch.device('cpu'))
    crops = np.load(kept.data / 'val_ims.npy').astype(np.float64)
    plain = sum(crops[:, c] for c in range(N_CROPS)) / N_CROPS
    plain /= np.sqrt((plain ** 2).sum(1, keepdims=True))
    assert data.val_feats.shape == (10, DIM) and data.feats.shape == (40, N_CROPS, DIM)
    np.testing.assert_allclose(data.val_feats, plain, rtol=1e-5, atol=1e-6)
    from eval import load_model
    model = load_model(str(run / 'best.pt'), torch.device('cpu'))[0]
    got = train.validate(model, data, cfg, 1)
    data.val_feats = plain.astype(np.float32)
    want = train.validate(model, data, cfg, 1)
    assert numbers(got) == pytest.approx(numbers(want))
    # eval.py: the dataset's test split against the same split prepared from its mean crops
    means = tmp_path / 'means'
    test_rows = [i for i, s in enumerate(SPLITS) if s == 'test']
    all_means = np.zeros((len(SPLITS), DIM), np.float32)
    all_means[test_rows] = unit(np.load(kept.data / 'test_ims.npy').mean(1))
    all_means[[i for i in range(len(SPLITS)) if i not in test_rows]] = 1.0
    np.save(tmp_path / 'means.npy', all_means)
    assert run_here('prep', '--dataset=x', f'--data_dir={means}', f'--dataset_json={kept.json}',
                    f'--features={tmp_path / "means.npy"}', '--vocab_threshold=1').returncode == 0
    results = {}
    for name, folder in (('crops', kept.data), ('means', means)):
        assert run_here('eval', f'--out_dir={run}', f'--data_dir={folder}', '--compile=False').returncode == 0
        results[name] = numbers(json.loads((run / 'results_test.json').read_text()))
    assert results['crops'] == pytest.approx(results['means'])


def numbers(result):
    """The figures of a results dict, flat (pytest.approx takes no nested dicts)."""
    return [result[d][m] for d in ('i2t', 't2i') for m in ('r1', 'r5', 'r10', 'medr', 'meanr')] + [result['rsum']]


# ----------------------------------------------------------------------------- the draw

def test_crop_draw_is_seeded_uniform_and_gathered_right():
    train = importlib.reload(importlib.import_module('train'))
    feats = torch.randn(3000, N_CROPS, 8)
    def crops(seed, iteration):
        return train.step_features(feats, iteration, seed).crop
    assert torch.equal(crops(1, 7), crops(1, 7))
    assert not torch.equal(crops(1, 7), crops(2, 7)) and not torch.equal(crops(1, 7), crops(1, 8))
    counts = torch.bincount(torch.cat([crops(1, i) for i in range(10)]), minlength=N_CROPS).double()
    assert ((counts / counts.sum() - 1 / N_CROPS).abs() < 0.02).all(), counts  # 30,000 draws: a few sigma
    drawn = train.step_features(feats, 3, 1)
    rows = torch.tensor([5, 17, 5, 2999, 0])
    assert torch.equal(drawn[rows], torch.stack([feats[r, drawn.crop[r]] for r in rows.tolist()]))
    one_crop = feats[:, 0]
    assert train.step_features(one_crop, 3, 1) is one_crop  # (N, D): the step takes its rows as before


def test_stopped_and_resumed_run_draws_the_same_crops(kept, tmp_path):
    """Stopped after iteration 9 (mid-epoch, between checkpoints) and resumed: the same weights,
    Adam state, best.pt and log as the uninterrupted run; every step drew its own crops."""
    args = [*TRAIN, f'--data_dir={kept.data}']
    draws = []
    whole = run_train(*args, f'--out_dir={tmp_path / "whole"}', draws=draws)
    assert whole.returncode == 0, whole.stderr
    assert draws == list(range(26))
    stopped = run_train(*args, f'--out_dir={tmp_path / "stopped"}', stop_at=9)
    assert stopped.returncode == 130 and 'stopped at iteration 9' in stopped.stdout, stopped
    resumed = run_train(*args, f'--out_dir={tmp_path / "stopped"}', '--resume=True')
    assert resumed.returncode == 0 and 'resuming from' in resumed.stdout and 'at iteration 9' in resumed.stdout, resumed
    assert_same_run(tmp_path / 'stopped', tmp_path / 'whole')
