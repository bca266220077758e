"""The fast paths against the straightforward computation: kernels.py against model.py's
plain order_scores (in float64), kernels.Dropout against nn.Dropout's definition,
train.train_step against the plain step; bench.py end to end (tiny)."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import kernels
import train
from conftest import ROOT, assert_user_error, caption_batch, naive_step, run_script
from kernels import compiled_order_scores, order_backward_of_few, score_matrix, tiled_order_scores
from conftest import loss_of, make_model, train_on
from model import order_scores, similarity
from utils import UserError


def assert_equals_the_plain_form(fast_order_scores, n_images, n_captions, dim, nonzero_weights=1.0):
    """fast_order_scores in float32, scores and gradients, against model.order_scores and its
    autograd gradients in float64: equal to float32 rounding of sums of up to dim terms. The
    gradient comes from weights on the scores, of which about a share nonzero_weights is nonzero."""
    g = torch.Generator().manual_seed(n_images * dim)
    images, captions = torch.rand(n_images, dim, generator=g), torch.rand(n_captions, dim, generator=g)
    weights = torch.randn(n_images, n_captions, generator=g)
    weights *= torch.rand(n_images, n_captions, generator=g) < nonzero_weights
    results = []
    for fn, dtype in ((order_scores, torch.float64), (fast_order_scores, torch.float32)):
        i, c = images.to(dtype).requires_grad_(), captions.to(dtype).requires_grad_()
        scores = fn(i, c)
        assert scores.dtype == dtype
        results.append((scores.detach(), *torch.autograd.grad((scores * weights.to(dtype)).sum(), (i, c))))
    (ref, *ref_grads), (fast, *fast_grads) = results
    torch.testing.assert_close(fast, ref.float(), rtol=1e-5, atol=1e-5)
    for a, b in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('p', [0.5, 0.2])
def test_cpu_dropout_zeroes_with_probability_p_and_scales_the_rest_as_nn_dropout(p):
    """kernels.Dropout's CPU mask: each element zeroed with probability p, independently (the 4
    elements that share a 64-bit draw too), the rest scaled by 1 / (1 - p) as nn.Dropout does,
    gradients through the same mask, repeatable from a seed; off in eval mode."""
    x = torch.rand(1000, 1001) + 0.5   # an odd count: the last draw is only partly used
    drop, reference = kernels.Dropout(p), torch.nn.Dropout(p)
    torch.manual_seed(7)
    out = drop(x.requires_grad_())
    kept = out != 0
    n = x.numel()
    assert abs(1 - kept.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    torch.manual_seed(7)
    expected_scale = reference(torch.ones(10 ** 5)).max().item()   # 1 / (1 - p) as nn.Dropout computes it
    torch.testing.assert_close(out[kept], x[kept] * expected_scale, rtol=1e-6, atol=0)
    lanes = kept.flatten()[:n // 4 * 4].view(-1, 4).float()   # elements drawn from one 64-bit number
    for a, b in ((0, 1), (0, 3), (1, 2), (2, 3)):
        together = (lanes[:, a] * lanes[:, b]).mean().item()
        assert abs(together - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 / (n // 4))
    weights = torch.randn(x.shape)
    grad, = torch.autograd.grad((out * weights).sum(), x)
    torch.testing.assert_close(grad, weights * kept * expected_scale, rtol=1e-6, atol=0)
    torch.manual_seed(7)
    assert torch.equal(drop(x.detach()), out.detach())
    assert not torch.equal(drop(x.detach()), out.detach())   # the next draw differs
    assert drop(x.bfloat16()).dtype == torch.bfloat16
    assert drop.eval()(x) is x and kernels.Dropout(0.0)(x).equal(x)


@pytest.mark.parametrize('n_images,n_captions,dim', [(128, 128, 1024), (7, 33, 5), (3, 300, 1024), (130, 2, 64)])
def test_tiled_order_scores_equal_the_plain_form_with_gradients(n_images, n_captions, dim):
    # at dim 1,024 a CPU tile is one image by 128 captions: several tiles, the last one partial at 300
    assert_equals_the_plain_form(tiled_order_scores, n_images, n_captions, dim)


@pytest.mark.parametrize('n_images,n_captions,dim', [(32, 32, 48), (7, 19, 5)])
def test_compiled_order_scores_equal_the_plain_form_with_gradients(n_images, n_captions, dim):
    assert_equals_the_plain_form(compiled_order_scores, n_images, n_captions, dim)


@pytest.mark.parametrize('fast_order_scores', [tiled_order_scores, compiled_order_scores])
@pytest.mark.parametrize('nonzero_weights', [0.0, 0.02])
def test_a_sparse_gradient_takes_the_pairs_path_and_equals_the_plain_form(fast_order_scores, nonzero_weights,
                                                                           monkeypatch):
    """A gradient as sparse as the hardest-negative loss's goes through order_backward_of_few
    (and none at all gives zeros), with the dense path's results."""
    pairs_path = []
    monkeypatch.setattr(kernels, 'order_backward_of_few',
                        lambda *args: pairs_path.append(1) or order_backward_of_few(*args))
    assert_equals_the_plain_form(fast_order_scores, 128, 96, 40, nonzero_weights)
    assert pairs_path == [1]


def test_hardest_negative_steps_use_the_pairs_path_and_equal_the_plain_step(monkeypatch):
    """With max_violation the step's score gradient has at most 3 nonzeros per row (the
    diagonal and the two hardest negatives): at a batch of 128, train_step takes the pairs path
    and still follows the plain step."""
    pairs_path = []
    monkeypatch.setattr(kernels, 'order_backward_of_few',
                        lambda *args: pairs_path.append(1) or order_backward_of_few(*args))
    torch.manual_seed(0)
    feats, tokens, lengths = caption_batch(32, 160)
    cfg = SimpleNamespace(margin=0.05, max_violation=True, grad_clip=2.0, dtype='float32')
    fast = make_model(24, 30, 8, 32, 'order', compiled=True)
    plain = make_model(24, 30, 8, 32, 'order')
    plain.load_state_dict(fast.state_dict())
    fast_opt = train.make_optimizer(fast, 1e-2)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-2, foreach=False)
    for step in range(3):
        idx = torch.randperm(160)[:128]
        a, norm = train_on(fast, fast_opt, feats, tokens, lengths, idx, cfg)
        b = naive_step(plain, plain_opt, feats[idx // 5], [tokens[i, :lengths[i]] for i in idx.tolist()], cfg)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert pairs_path == [1, 1, 1]
    for (name, p), q in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_score_matrix_pads_blocks_and_matches_the_plain_form():
    # more than one (1,024 x 512) block in each direction, neither a multiple of it
    g = torch.Generator().manual_seed(1)
    images, captions = torch.rand(1030, 6, generator=g), torch.rand(515, 6, generator=g)
    ref = order_scores(images.double(), captions.double()).float()
    for compiled, chunk_elements in ((True, 2 ** 26), (False, 1000)):
        got = score_matrix(images, captions, 'order', compiled=compiled, chunk_elements=chunk_elements)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # the same matrix product as cosine_scores (bit-identical by construction; checked with tolerance all the same)
    torch.testing.assert_close(score_matrix(images, captions, 'cosine', compiled=True), images @ captions.t())


def test_a_kernel_that_cannot_be_built_is_one_clear_error(monkeypatch):
    def no_compiler(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("InductorError: CppCompileError: no C++ compiler 'g++' found\nmore lines")
        return fail
    monkeypatch.setattr(torch, 'compile', no_compiler)
    monkeypatch.setattr(kernels, 'compiled_kernels', {})
    with pytest.raises(UserError) as e:
        similarity(torch.rand(3, 4), torch.rand(5, 4), 'order', compiled=True)
    assert str(e.value) == ("torch.compile could not build the order-score kernel (RuntimeError: InductorError: "
                            "CppCompileError: no C++ compiler 'g++' found); pass --compile=False to use the plain PyTorch path")


def test_triton_order_kernel_equals_the_plain_form_in_the_interpreter():
    """The CUDA ranking kernel, run by Triton's CPU interpreter: partial tiles in both
    directions, a single pair, one dimension, inputs that are not contiguous."""
    pytest.importorskip('triton')
    code = """
import torch
from kernels import triton_order_scores
from model import order_scores
g = torch.Generator().manual_seed(0)
for n_images, n_captions, dim in ((70, 150, 33), (1, 1, 1), (130, 3, 7), (64, 128, 16)):
    images, captions = torch.rand(n_images, dim, generator=g), torch.rand(dim, n_captions, generator=g).t()
    got = triton_order_scores(images, captions)
    torch.testing.assert_close(got, order_scores(images.double(), captions.double()).float(), rtol=1e-5, atol=1e-5)
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
    fast = make_model(24, 30, 8, 16, 'order', compiled=compiled)
    plain = make_model(24, 30, 8, 16, 'order')
    plain.load_state_dict(fast.state_dict())
    start = {k: v.clone() for k, v in fast.state_dict().items()}
    fast_opt = train.make_optimizer(fast, 1e-2)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-2, foreach=False)
    for step in range(3):
        idx = torch.randperm(n_caps)[:16]
        a, norm = train_on(fast, fast_opt, feats, tokens, lengths, idx, cfg)
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
    model = make_model(24, 30, 8, 32, 'order', compiled=True)
    # the image encoder's output is bfloat16; on a CPU the GRU's matrix products are too, but it
    # keeps its state in float32, so its output type shows nothing (on CUDA cuDNN's GRU is all bfloat16)
    seen = []
    model.image_fc.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    idx = torch.arange(32)
    losses = {}
    for dtype in ('float32', 'bfloat16'):
        cfg = SimpleNamespace(margin=0.05, max_violation=False, dtype=dtype)
        losses[dtype] = loss_of(model, feats, tokens, lengths, idx, cfg)
    assert seen == [torch.float32, torch.bfloat16]
    assert losses['bfloat16'].dtype == torch.float32
    # bfloat16 keeps 8 bits of mantissa: the loss moves by well under a percent, not more
    assert losses['bfloat16'].item() == pytest.approx(losses['float32'].item(), rel=0.02)


def test_bfloat16_train_step_follows_the_plain_float32_step():
    """The default CPU step (bfloat16 autocast, compiled order kernels, clipping folded into
    fused Adam) against the plain float32 step from the same start: losses and weights agree to
    bfloat16's precision, step after step, with the clip active at each of them."""
    torch.manual_seed(0)
    feats, tokens, lengths = caption_batch(16, 80)
    cfg = SimpleNamespace(margin=0.05, max_violation=False, grad_clip=0.5, dtype='bfloat16')
    fast = make_model(24, 30, 8, 32, 'order', compiled=True)
    plain = make_model(24, 30, 8, 32, 'order')
    plain.load_state_dict(fast.state_dict())
    fast_opt = train.make_optimizer(fast, 1e-3)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3, foreach=False)
    for step in range(3):
        idx = torch.randperm(80)[:32]
        loss, norm = train_on(fast, fast_opt, feats, tokens, lengths, idx, cfg)
        assert norm > cfg.grad_clip
        expected = naive_step(plain, plain_opt, feats[idx // 5], [tokens[i, :lengths[i]] for i in idx.tolist()], cfg)
        assert loss.item() == pytest.approx(expected.item(), rel=0.02)
    for (name, p), q in zip(fast.named_parameters(), plain.parameters()):
        # Adam moves each weight by about lr per step whatever the gradient's size: a weight
        # may differ by a step or so where bfloat16 flipped a small gradient's sign, not more
        assert (p - q).abs().max() < 3 * 3e-3, name


def test_clipping_in_the_step_equals_clip_grad_norm():
    """clip_in_step's norm is clip_grad_norm_'s, and fused Adam's steps with it are Adam's steps
    on gradients clipped by clip_grad_norm_: a clipped step, then one under the limit (Adam is
    blind to a constant scale, not to one step's scale against the next)."""
    torch.manual_seed(0)
    ours, plain, unclipped = (torch.nn.Linear(6, 5) for _ in range(3))
    plain.load_state_dict(ours.state_dict())
    unclipped.load_state_dict(ours.state_dict())
    ours_opt = torch.optim.Adam(ours.parameters(), lr=1e-2, fused=True)   # as train.make_optimizer's
    plain_opt, unclipped_opt = (torch.optim.Adam(m.parameters(), lr=1e-2, foreach=False) for m in (plain, unclipped))
    for scale in (10.0, 0.01):
        grads = [torch.randn_like(p) * scale for p in ours.parameters()]
        for model in (ours, plain, unclipped):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
        norm = train.clip_in_step(ours, ours_opt, 0.5)
        assert norm.item() == pytest.approx(torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.5).item(), rel=1e-6)
        for opt in (ours_opt, plain_opt, unclipped_opt):
            opt.step()
    for p, q, r in zip(ours.parameters(), plain.parameters(), unclipped.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(p, r, rtol=1e-3, atol=1e-4)


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


def test_bench_dtype_sets_extraction_too(tmp_path):
    out = tmp_path / 'bench.json'
    run_script('bench.py', '--scale=tiny', '--stages=extract', '--dtype=float32', f'--out={out}', timeout=300)
    report = json.loads(out.read_text())
    assert report['extract']['dtype'] == 'float32'
    assert report['extract']['ours_float32'] == report['extract']['ours']  # one float32 path, timed once


def test_bench_bad_options():
    assert_user_error(run_script('bench.py', '--scale=huge', check=False), '--scale=huge')
    assert_user_error(run_script('bench.py', '--stages=train,fly', check=False), '--stages=train,fly')


MALLOC_PROBE = '''
import ctypes, sys, torch
sys.path.insert(0, {root!r})
import options
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ('arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks '
                                               'fordblks keepcost').split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
if {keep}:
    assert options.keep_freed_memory()
mapped = libc.mallinfo2().hblkhd
x = torch.ones(5_000_000)    # 20 MB, as a GRU gradient buffer at Flickr8k's sizes
print(libc.mallinfo2().hblkhd > mapped)
del x
print(libc.mallinfo2().fordblks >= 20_000_000)
'''


def test_kept_memory_serves_a_training_sized_buffer_from_the_heap_and_keeps_it():
    """options.keep_freed_memory (run_main calls it): a 20 MB buffer comes from the process's heap
    and stays there when freed, where glibc's default maps it from the OS and unmaps it."""
    if not hasattr(__import__('ctypes').CDLL(None), 'mallinfo2'):
        pytest.skip('glibc 2.33 or later is needed to read the allocator state')
    for keep, mapped_and_returned in ((False, 'True\nFalse'), (True, 'False\nTrue')):
        out = subprocess.run([sys.executable, '-c', MALLOC_PROBE.format(root=str(ROOT), keep=keep)],
                             capture_output=True, text=True, check=True).stdout
        assert out.strip() == mapped_and_returned, (keep, out)
