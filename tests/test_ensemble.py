"""eval.py --ensemble: the mean of several runs' score matrices. One run's ensemble is that run's
own evaluation; two runs' is recomputed here from the two models' embeddings with the plain
order_scores and the plain ranking (conftest.reference_ranks). The refusals are rows of
test_bad_input.py's tables."""
import importlib
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import reference_ranks, run_here
from model import order_scores
from utils import encode_images, encode_text, load_split

TRAIN = ['--dataset=synthetic', '--epochs=2', '--embed_dim=16', '--word_dim=8', '--batch_size=16', '--compile=False']


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """A tiny synthetic dataset (50 test images) and two runs on it, trained from seeds 1 and 2."""
    root = tmp_path_factory.mktemp('ensemble')
    data = root / 'data'
    assert run_here('prep', '--dataset=synthetic', '--synthetic_sizes=200,50,50', '--synthetic_dim=32',
                    f'--data_dir={data}').returncode == 0
    folders = []
    for seed in (1, 2):
        folders.append(root / f'seed{seed}')
        proc = run_here('train', *TRAIN, f'--seed={seed}', f'--data_dir={data}', f'--out_dir={folders[-1]}')
        assert proc.returncode == 0, proc.stderr
    return SimpleNamespace(data=data, folders=folders)


def metrics_of(path):
    result = json.load(open(path))
    return {key: result[key] for key in ('i2t', 't2i', 'rsum', 'folds_1k', 'mean_1k') if key in result}


def eval_here(monkeypatch, capsys, *args, coco_folds=False):
    """eval.main in this process; coco_folds: report the split as COCO's test is reported (1K folds
    and their mean, here folds of 10 images), which a tiny split is not otherwise."""
    ev = importlib.reload(importlib.import_module('eval'))
    if coco_folds:
        monkeypatch.setattr(ev, 'is_coco_test', lambda meta, feats, split: True)
    ev.main(['--compile=False', *args])
    return capsys.readouterr().out


@pytest.mark.parametrize('coco_folds', [False, True], ids=['plain', 'coco_1k_folds'])
def test_ensemble_of_one_run_is_that_runs_evaluation(runs, monkeypatch, capsys, coco_folds):
    run = runs.folders[0]
    alone = eval_here(monkeypatch, capsys, f'--out_dir={run}', '--save_ranks=True', coco_folds=coco_folds)
    together = eval_here(monkeypatch, capsys, f'--ensemble={run}', '--save_ranks=True', coco_folds=coco_folds)
    # the same scores through the same code: the same numbers, not merely close ones
    assert metrics_of(run / 'results_test_ensemble.json') == metrics_of(run / 'results_test.json')
    assert json.load(open(run / 'ranks_test_ensemble.json')) == json.load(open(run / 'ranks_test.json'))
    tables = [[line for line in out.splitlines() if not line.startswith(('synthetic', 'wrote'))] for out in (alone, together)]
    assert tables[0] == tables[1] and len(tables[0]) == (2 * 4 + 1 if coco_folds else 4)
    assert 'ensemble of 1 run' in together and ('1K (mean of 5 folds)' in together) == coco_folds
    result = json.load(open(run / 'results_test_ensemble.json'))
    assert result['ensemble'] == [str(run)] and result['checkpoint'] == [str(run / 'best.pt')]


def test_ensemble_of_two_runs_scores_the_mean_of_their_score_matrices(runs, monkeypatch, capsys):
    first, second = runs.folders
    eval_here(monkeypatch, capsys, f'--ensemble={first},{second}', '--save_ranks=True')
    assert not (second / 'results_test_ensemble.json').exists()
    result = json.load(open(first / 'results_test_ensemble.json'))
    ranks = json.load(open(first / 'ranks_test_ensemble.json'))
    # the straightforward computation: each model's embeddings, the plain order scores, their mean
    import eval as ev
    feats, captions = load_split(runs.data, 'test')
    members = []
    with torch.no_grad():
        for run in runs.folders:
            model, ckpt = ev.load_model(os.path.join(run, 'best.pt'), torch.device('cpu'))
            members.append(order_scores(encode_images(model, feats), encode_text(model, ckpt['vocab'], captions, tokenized=True)))
    i2t, t2i = reference_ranks(((members[0] + members[1]) / 2).double())
    # two float paths (eval's tiled kernel, the broadcast here): a near-tie may fall either way
    got_i2t, got_t2i = np.array([r['rank'] for r in ranks['i2t']]), np.array([r['rank'] for r in ranks['t2i']])
    assert (got_i2t != i2t).sum() <= 1 and (got_t2i != t2i).sum() <= 2, (got_i2t - i2t, got_t2i - t2i)
    for direction, expected, per_query in (('i2t', i2t, 100 / 50), ('t2i', t2i, 100 / 250)):
        for k in (1, 5, 10):
            assert abs(result[direction][f'r{k}'] - 100 * np.mean(expected < k)) <= per_query * 2 + 1e-9, (direction, k)
        assert abs(result[direction]['meanr'] - (expected.mean() + 1)) < 0.1
    # ... and it is not either member alone: the mean moves many ranks
    for scores in members:
        alone_i2t, alone_t2i = reference_ranks(scores.double())
        assert (alone_i2t != i2t).sum() >= 5 and (alone_t2i != t2i).sum() >= 20
