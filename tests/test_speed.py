"""The fast paths against the straightforward computation, and bench.py end to end (tiny)."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import train
from bench import broadcast_order_scores, naive_step
from conftest import ROOT, assert_user_error, caption_batch, run_script
from model import JointEmbedding, order_scores, score_matrix
from utils import UserError


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


def test_a_kernel_that_cannot_be_built_is_one_clear_error(monkeypatch):
    import model

    def no_compiler(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("InductorError: CppCompileError: no C++ compiler 'g++' found\nmore lines")
        return fail
    monkeypatch.setattr(torch, 'compile', no_compiler)
    monkeypatch.setattr(model, '_compiled', {})
    with pytest.raises(UserError) as e:
        order_scores(torch.rand(3, 4), torch.rand(5, 4), compiled=True)
    assert str(e.value) == ("torch.compile could not build the order-score kernel (RuntimeError: InductorError: "
                            "CppCompileError: no C++ compiler 'g++' found); pass --compile=False to use the plain PyTorch path")


def test_triton_order_kernel_equals_broadcast_in_the_interpreter():
    """The CUDA ranking kernel, run by Triton's CPU interpreter: partial tiles in both
    directions, a single pair, one dimension, inputs that are not contiguous."""
    pytest.importorskip('triton')
    code = """
import torch
from bench import broadcast_order_scores
from model import triton_order_scores
g = torch.Generator().manual_seed(0)
for n_images, n_captions, dim in ((70, 150, 33), (1, 1, 1), (130, 3, 7), (64, 128, 16)):
    images, captions = torch.rand(n_images, dim, generator=g), torch.rand(dim, n_captions, generator=g).t()
    got = triton_order_scores(images, captions)
    torch.testing.assert_close(got, broadcast_order_scores(images, captions), rtol=1e-5, atol=1e-5)
    assert (got <= 0).all() and got.shape == (n_images, n_captions)
print('ok')
"""
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'TRITON_INTERPRET': '1'})
    assert proc.returncode == 0 and proc.stdout.strip() == 'ok', proc.stderr


@pytest.mark.parametrize('compiled', [False, True])
def test_train_step_equals_the_plain_step(compiled):
    """Three steps of train.train_step (packed GRU, order kernels, fused Adam) and of the plain
    code (one caption at a time, broadcast, Adam's for-loop implementation) from the same start
    give the same losses and weights."""
    torch.manual_seed(0)
    n_caps = 40
    feats, tokens, lengths = caption_batch(8, n_caps)
    # a large gradient clip would hide a wrong norm: 0.5 clips at every step here
    cfg = SimpleNamespace(margin=0.05, max_violation=False, grad_clip=0.5, dtype='float32')
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


def test_bfloat16_step_runs_the_encoder_in_bfloat16_and_the_loss_in_float32():
    torch.manual_seed(0)
    feats, tokens, lengths = caption_batch(16, 64)
    model = JointEmbedding(24, 30, 8, 32, 'order', compiled=True)
    # the image encoder's output is bfloat16; on a CPU the GRU's matrix products are too, but it
    # keeps its state in float32, so its output type shows nothing (on CUDA cuDNN's GRU is all bfloat16)
    seen = []
    model.image_fc.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    idx = torch.arange(32)
    losses = {}
    for dtype in ('float32', 'bfloat16'):
        cfg = SimpleNamespace(margin=0.05, max_violation=False, dtype=dtype)
        losses[dtype] = train.batch_loss(model, feats, tokens, lengths, idx, cfg)
    assert seen == [torch.float32, torch.bfloat16]
    assert losses['bfloat16'].dtype == torch.float32
    # bfloat16 keeps 8 bits of mantissa: the loss moves by well under a percent, not more
    assert losses['bfloat16'].item() == pytest.approx(losses['float32'].item(), rel=0.02)
    assert train.autocast_dtype('auto', torch.device('cpu')) == 'float32'
    assert train.autocast_dtype('auto', torch.device('cuda')) == 'bfloat16'
    with pytest.raises(UserError, match='--dtype=half'):
        train.autocast_dtype('half', torch.device('cpu'))


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
