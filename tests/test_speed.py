"""The fast paths against the straightforward computation, and bench.py end to end (tiny)."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

import train
from bench import broadcast_order_scores, naive_step
from conftest import assert_user_error, run_script
from model import JointEmbedding, order_scores, score_matrix


@pytest.mark.parametrize('n_images,n_captions,dim', [(32, 32, 48), (7, 19, 5)])
def test_compiled_equals_tiled_equals_broadcast_with_gradients(n_images, n_captions, dim):
    g = torch.Generator().manual_seed(dim)
    images = torch.rand(n_images, dim, generator=g)
    captions = torch.rand(n_captions, dim, generator=g)
    weights = torch.randn(n_images, n_captions, generator=g)
    results = []
    for fn in (broadcast_order_scores, lambda i, c: order_scores(i, c), lambda i, c: order_scores(i, c, compiled=True)):
        i, c = images.clone().requires_grad_(), captions.clone().requires_grad_()
        s = fn(i, c)
        results.append((s.detach(), *torch.autograd.grad((s * weights).sum(), (i, c))))
    for fast in results[1:]:
        for a, b in zip(fast, results[0]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compiled_score_matrix_pads_blocks_and_matches_broadcast():
    # more than one (1,024 x 512) block in each direction, neither a multiple of it
    g = torch.Generator().manual_seed(1)
    images, captions = torch.rand(1030, 6, generator=g), torch.rand(515, 6, generator=g)
    ref = broadcast_order_scores(images, captions)
    torch.testing.assert_close(score_matrix(images, captions, 'order', compiled=True), ref)
    torch.testing.assert_close(score_matrix(images, captions, 'order', compiled=False, chunk_elements=1000), ref)
    torch.testing.assert_close(score_matrix(images, captions, 'cosine', compiled=True), images @ captions.t())


@pytest.mark.parametrize('compiled', [False, True])
def test_train_step_equals_the_plain_step(compiled):
    """Three steps of train.train_step (packed GRU, order kernels, fused Adam) and of the plain
    code (one caption at a time, broadcast, Adam's for-loop implementation) from the same start
    give the same losses and weights."""
    torch.manual_seed(0)
    n_caps, length = 40, 9
    feats = torch.randn(8, 24)
    lengths = torch.randint(1, length + 1, (n_caps,))
    tokens = torch.randint(2, 30, (n_caps, length)) * (torch.arange(length)[None] < lengths[:, None])
    # a large gradient clip would hide a wrong norm: 0.5 clips at every step here
    cfg = SimpleNamespace(margin=0.05, max_violation=False, grad_clip=0.5)
    fast = JointEmbedding(24, 30, 8, 16, 'order', compiled=compiled)
    plain = JointEmbedding(24, 30, 8, 16, 'order')
    plain.load_state_dict(fast.state_dict())
    start = {k: v.clone() for k, v in fast.state_dict().items()}
    fast_opt = train.make_optimizer(fast, 1e-2)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-2, foreach=False)
    for step in range(3):
        idx = torch.randperm(n_caps)[:16]
        a, norm = train.train_step(fast, fast_opt, feats, tokens, lengths, idx, cfg)
        assert norm > cfg.grad_clip
        b = naive_step(plain, plain_opt, feats[idx // 5], [tokens[i, :lengths[i]] for i in idx.tolist()], cfg)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert fast_opt.param_groups[0]['fused']
    for (name, p), q in zip(fast.named_parameters(), plain.parameters()):
        assert not torch.equal(p, start[name]), name
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_bench_tiny_writes_a_complete_report(tmp_path):
    out = tmp_path / 'bench.json'
    proc = run_script('bench.py', '--scale=tiny', f'--out={out}', timeout=300)
    report = json.loads(out.read_text())
    assert report['scale'] == 'tiny' and report['device'] == 'cpu'
    for stage in ('train', 'eval', 'extract'):
        assert stage in proc.stdout
        r = report[stage]
        assert set(r) >= {'ours', 'ceiling', 'ratio', 'naive', 'unit'}
        numbers = [r[k] for k in ('ours', 'ceiling', 'ratio', 'naive')]
        assert all(isinstance(x, float) and math.isfinite(x) and x > 0 for x in numbers), (stage, r)
    assert report['train']['unit'] == 'captions/s' and report['eval']['unit'] == 's'
    assert report['train']['ratio'] == pytest.approx(report['train']['ours'] / report['train']['ceiling'])
    assert report['eval']['ratio'] == pytest.approx(report['eval']['ceiling'] / report['eval']['ours'])
    assert report['eval']['ours_cosine'] > 0 and report['eval']['extra_memory_bytes'] > 0
    ex = report['extract']
    assert ex['ours_10crop'] > 0 and ex['ratio_10crop'] == pytest.approx(ex['ours_10crop'] / ex['ceiling_10crop'])
    assert 0 < ex['ceiling'] <= ex['vgg16_forward'] and ex['ceiling_10crop'] <= ex['vgg16_forward'] / 10


def test_bench_bad_options():
    assert_user_error(run_script('bench.py', '--scale=huge', check=False), '--scale=huge')
    assert_user_error(run_script('bench.py', '--stages=train,fly', check=False), '--stages=train,fly')
