"""prep.py -> train.py -> eval.py end to end on the synthetic set, and the checkpoint's errors."""
import json

import numpy as np
import torch

from conftest import assert_user_error, run_script
from utils import retrieval_metrics

SMALL = ['--embed_dim=128', '--word_dim=32', '--batch_size=64']


def test_synthetic_run_learns_and_eval_agrees_with_embeddings(synthetic_dir, tmp_path):
    out = tmp_path / 'run'
    run_script('train.py', '--dataset=synthetic', f'--data_dir={synthetic_dir}', f'--out_dir={out}',
               '--epochs=3', *SMALL)
    assert (out / 'best.pt').exists() and (out / 'last.pt').exists()
    log = [json.loads(line) for line in open(out / 'log.jsonl')]
    losses = [r['loss'] for r in log if 'loss' in r]
    assert losses[-1] < 0.5 * losses[0]
    proc = run_script('eval.py', f'--out_dir={out}', '--save_embeddings=True')
    assert 'image->text' in proc.stdout and 'text->image' in proc.stdout
    result = json.load(open(out / 'results_test.json'))
    assert result['n_images'] == 100 and result['n_captions'] == 500 and result['measure'] == 'order'
    # chance: R@10 about 10% in each direction on 100 images; a trained model is far above
    assert result['t2i']['r10'] > 60 and result['i2t']['r10'] > 60 and result['rsum'] > 250
    # The saved embeddings are exactly what was scored: recompute the metrics from them alone.
    emb = np.load(out / 'embeddings_test.npz')
    assert emb['images'].shape == (100, 128) and emb['captions'].shape == (500, 128)
    assert emb['images'].dtype == np.float32 and (emb['images'] >= 0).all()
    im, cap = emb['images'].astype(np.float64), emb['captions'].astype(np.float64)
    scores = -np.square(np.maximum(0, cap[None] - im[:, None])).sum(-1)
    again = retrieval_metrics(torch.from_numpy(scores))
    for d in ('i2t', 't2i'):
        for k in ('r1', 'r5', 'r10', 'medr'):
            assert abs(again[d][k] - result[d][k]) <= 1.0, (d, k)  # float32 vs float64 near-ties only


def test_untrained_model_is_near_chance(synthetic_dir, tmp_path):
    """A model evaluated after one tiny step at a zero learning rate scores at chance level."""
    out = tmp_path / 'untrained'
    run_script('train.py', '--dataset=synthetic', f'--data_dir={synthetic_dir}', f'--out_dir={out}',
               '--epochs=1', '--learning_rate=0.0', *SMALL)
    run_script('eval.py', f'--out_dir={out}')
    result = json.load(open(out / 'results_test.json'))
    assert result['t2i']['r10'] < 30 and result['i2t']['r10'] < 30 and result['rsum'] < 120


def test_cosine_max_violation_trains(synthetic_dir, tmp_path):
    out = tmp_path / 'vsepp'
    run_script('train.py', '--dataset=synthetic', f'--data_dir={synthetic_dir}', f'--out_dir={out}', '--epochs=3',
               '--measure=cosine', '--margin=0.2', '--max_violation=True', '--warmup_epochs=0', '--learning_rate=2e-3', *SMALL)
    run_script('eval.py', f'--out_dir={out}')
    result = json.load(open(out / 'results_test.json'))
    assert result['measure'] == 'cosine' and result['rsum'] > 200


def test_patience_stops_when_validation_stops_improving(synthetic_dir, tmp_path):
    """At learning rate 0 the validation rsum never improves on the first one: with --patience=2
    training stops at the third validation, in the middle of the epoch, keeping best.pt, and a
    resume says the run has finished."""
    out = tmp_path / 'patient'
    args = ['--dataset=synthetic', f'--data_dir={synthetic_dir}', f'--out_dir={out}', '--epochs=3', '--learning_rate=0',
            '--patience=2', '--eval_interval=5', '--compile=False', *SMALL]
    proc = run_script('train.py', *args)
    assert proc.stdout.count('has not improved for 2 validations') == 1 and 'epoch 1:' not in proc.stdout, proc.stdout
    log = [json.loads(line) for line in open(out / 'log.jsonl')]
    assert [r['iteration'] for r in log if 'val' in r] == [5, 10, 15]
    assert (out / 'best.pt').exists()
    assert 'already finished' in run_script('train.py', *args, '--resume=True').stdout


def test_checkpoint_errors(synthetic_dir, tmp_path):
    assert_user_error(run_script('eval.py', f'--out_dir={tmp_path / "nothing"}', check=False), 'best.pt', 'no such checkpoint')
    out = tmp_path / 'run'
    run_script('train.py', '--dataset=synthetic', f'--data_dir={synthetic_dir}', f'--out_dir={out}', '--epochs=1', *SMALL)
    other = tmp_path / 'other'
    run_script('prep.py', '--dataset=synthetic', f'--data_dir={other}', '--synthetic_sizes=50,10,10', '--synthetic_dim=100')
    proc = run_script('eval.py', f'--out_dir={out}', f'--data_dir={other}', check=False)
    assert_user_error(proc, '100-d image features', '256-d')
    assert not (out / 'results_test.json').exists()
    # a second train.py into the same folder must not clobber the first run
    assert_user_error(run_script('train.py', '--dataset=synthetic', f'--data_dir={synthetic_dir}', f'--out_dir={out}',
                                 check=False), '--resume=True')
