"""torchrun: two gloo processes on the CPU compute the same loss and gradients as one process on
the same global batch, train.py trains and resumes under torchrun, fine-tunes the CNN as one
process does, and prep.py's sharded feature extraction equals a single process's."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import features
from conftest import ROOT, image_dataset, run_script

CASES = [SimpleNamespace(measure='order', margin=0.05, max_violation=False, dtype='float32'),
         SimpleNamespace(measure='order', margin=0.05, max_violation=True, dtype='float32'),
         SimpleNamespace(measure='cosine', margin=0.2, max_violation=True, dtype='float32')]


def make_inputs(measure):
    from conftest import make_model
    torch.manual_seed(0)
    model = make_model(feature_dim=24, vocab_size=40, word_dim=8, embed_dim=16, measure=measure)
    feats = torch.randn(10, 24)
    lengths = torch.randint(1, 9, (50,))
    tokens = torch.zeros(50, 8, dtype=torch.long)
    for row, n in enumerate(lengths):
        tokens[row, :n] = torch.randint(2, 40, (int(n),))
    idx = torch.randperm(50, generator=torch.Generator().manual_seed(1))[:16]  # the global batch
    return model, feats, tokens, lengths, idx


def one_step(model, feats, tokens, lengths, idx, cfg, world):
    import distributed
    from conftest import loss_of
    loss = loss_of(model, feats, tokens, lengths, idx, cfg)
    loss.backward()
    if world > 1:
        distributed.average_gradients(model)
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def worker(rank, world, out):
    # a file rendezvous: a free port looked up in advance can be taken by another process meanwhile
    dist.init_process_group('gloo', init_method=f'file://{os.path.join(out, "rendezvous")}', rank=rank, world_size=world)
    results = []
    for cfg in CASES:
        model, feats, tokens, lengths, idx = make_inputs(cfg.measure)
        share = len(idx) // world
        results.append(one_step(model, feats, tokens, lengths, idx[rank * share:(rank + 1) * share], cfg, world))
    torch.save(results, os.path.join(out, f'rank{rank}.pt'))
    # Both ranks leave together: a rank that tears its group down while the other still talks
    # to it can abort the other (gloo's "terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


def test_two_processes_equal_one_on_the_global_batch(tmp_path):
    mp.spawn(worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for cfg, *ranks in zip(CASES, *[torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2)]):
        loss, grads = one_step(*make_inputs(cfg.measure), cfg, world=1)
        for r_loss, r_grads in ranks:
            torch.testing.assert_close(r_loss, loss, rtol=1e-5, atol=1e-6)
            for name, g in grads.items():
                torch.testing.assert_close(r_grads[name], g, rtol=1e-4, atol=1e-6, msg=f"{cfg} {name}")
        assert loss > 0


def torchrun(*args, script='train.py'):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(ROOT, script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_torchrun_trains_resumes_and_evaluates(synthetic_dir, tmp_path):
    out = tmp_path / 'run'
    common = ['--dataset=synthetic', f'--data_dir={synthetic_dir}', f'--out_dir={out}',
              '--embed_dim=64', '--word_dim=16', '--batch_size=32']
    first = torchrun(*common, '--epochs=1')
    assert 'x 2 processes' in first.stdout and first.stdout.count('val:') == 1  # rank 0 alone reports
    second = torchrun(*common, '--epochs=2', '--resume=True')
    assert 'resuming' in second.stdout
    log = [json.loads(line) for line in open(out / 'log.jsonl')]
    assert [r['iteration'] for r in log if 'val' in r] == [47, 94]  # 3000 captions / 64 per step; one log writer
    run_script('eval.py', f'--out_dir={out}')
    result = json.load(open(out / 'results_test.json'))
    assert result['rsum'] > 100  # chance is about 30 on 100 test images (two epochs, with the default dropout)


def test_torchrun_extraction_equals_one_process(tmp_path):
    splits = ['train'] * 4 + ['val'] * 2 + ['test']      # 7 images: shards of whole batches, 4 + 3
    args = ['--dataset=x', '--weights=random', '--batch_size=2', '--workers=0']
    for name in ('one', 'two'):
        image_dataset(tmp_path / name, splits)
    # Bit-identical by construction: the same batches through the same kernels with the same
    # thread count (torchrun gives each process OMP_NUM_THREADS=1; a convolution's result can
    # depend on how many threads split it).
    run_script('prep.py', *args, f'--data_dir={tmp_path / "one"}', env={'OMP_NUM_THREADS': '1'})
    torchrun(*args, f'--data_dir={tmp_path / "two"}', script='prep.py')
    for name in ('features_vgg16_1crop.npy', 'train_ims.npy', 'val_ims.npy', 'test_ims.npy'):
        one, two = np.load(tmp_path / 'one' / name), np.load(tmp_path / 'two' / name)
        assert one.shape[1] == 4096 and np.abs(one).sum() > 0
        np.testing.assert_array_equal(one, two)
    assert (tmp_path / 'two' / 'features_vgg16_1crop.npy.progress-1-of-2.json').exists()  # rank 1 did its shard
    meta = json.load(open(tmp_path / 'two' / 'meta.json'))
    assert meta['splits']['train'] == {'images': 4, 'captions': 20}


def test_torchrun_fine_tunes_the_cnn_as_one_process_on_the_global_batch(tmp_path):
    """--finetune=True under torchrun: each rank decodes its share of the global batch, and the
    CNN's gradients are averaged with the rest, so the CNN moves as one process's does on the
    whole batch (to float rounding, far below the size of the move itself); the frozen stages
    stay as they were on every rank."""
    pytest.importorskip('timm')
    image_dataset(tmp_path, ['train'] * 8 + ['val'] * 2 + ['test'] * 2)
    data = tmp_path / 'data'
    run_script('prep.py', '--dataset=x', f'--data_dir={data}', f'--dataset_json={tmp_path / "dataset.json"}',
               f'--images_dir={tmp_path / "images"}', '--cnn=efficientnet_lite0', '--weights=random', '--workers=0',
               '--dtype=float32')
    # 40 captions, a global batch of 8: 5 steps of the CNN in epoch 2. No dropout: each rank
    # would draw its own masks.
    common = ['--dataset=x', f'--data_dir={data}', '--finetune=True', '--warmup_epochs=1', '--epochs=2',
              '--embed_dim=16', '--word_dim=8', '--workers=0', '--compile=False', '--dtype=float32', '--image_dropout=0']
    two = torchrun(*common, f'--out_dir={tmp_path / "two"}', '--batch_size=4')
    assert 'x 2 processes' in two.stdout
    run_script('train.py', *common, f'--out_dir={tmp_path / "one"}', '--batch_size=8', env={'OMP_NUM_THREADS': '1'})
    start, _ = features.build_backbone('efficientnet_lite0', 'random', torch.device('cpu'))
    start = start.state_dict()
    tuned = {name: {k[len('backbone.net.'):]: v for k, v in
                    torch.load(tmp_path / name / 'last.pt', weights_only=True)['model'].items()
                    if k.startswith('backbone.net.')} for name in ('one', 'two')}
    for key in ('blocks.3.0.conv_pw.weight', 'blocks.6.0.conv_pwl.weight', 'conv_head.weight'):
        moved = (tuned['one'][key] - start[key]).abs().mean()
        assert moved > 0, key
        assert (tuned['two'][key] - tuned['one'][key]).abs().mean() < 0.1 * moved, key
    for name in ('one', 'two'):   # the default cnn_frozen_stages=4: the stem and block stages 0-2 as they were
        assert torch.equal(tuned[name]['conv_stem.weight'], start['conv_stem.weight'])
        assert torch.equal(tuned[name]['blocks.2.0.conv_pw.weight'], start['blocks.2.0.conv_pw.weight'])
    assert torch.equal(tuned['two']['bn1.running_mean'], start['bn1.running_mean'])  # batch norm's statistics frozen
    run_script('eval.py', f'--out_dir={tmp_path / "two"}', '--compile=False')
    assert json.load(open(tmp_path / 'two' / 'results_test.json'))['n_images'] == 2
