"""The CUDA paths against the CPU ones: the Triton order kernel, a training step, bfloat16
training, and the scripts end to end. Skipped without a CUDA GPU; `bash .ci/gpu` runs them
together with bench.py."""
import json
from types import SimpleNamespace

import pytest
import torch

import train
from conftest import caption_batch, naive_step, run_script
from kernels import score_matrix, triton_order_scores
from conftest import loss_of, make_model, train_on
from model import order_scores
from utils import retrieval_ranks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
SMALL = ['--embed_dim=128', '--word_dim=32', '--batch_size=64']


def embeddings(n, dim, seed, device):
    """Order embeddings with planted matches: caption 5i + j belongs to image i."""
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1).abs()
    captions = torch.nn.functional.normalize(torch.randn(5 * n, dim, generator=g), dim=1).abs()
    captions = torch.nn.functional.normalize(captions + images.repeat_interleave(5, 0), dim=1)
    return images.to(device), captions.to(device)


@pytest.mark.parametrize('n_images,n_captions,dim', [(70, 150, 33), (1, 1, 1), (129, 3, 1024), (64, 128, 16)])
def test_triton_kernel_equals_the_plain_form(n_images, n_captions, dim):
    g = torch.Generator().manual_seed(dim)
    images, captions = torch.rand(n_images, dim, generator=g), torch.rand(n_captions, dim, generator=g)
    expected = order_scores(images.double(), captions.double()).float()
    got = triton_order_scores(images.cuda(), captions.cuda()).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_coco_5k_ranking_on_cuda_equals_the_cpu():
    """score_matrix on CUDA (the Triton kernel) against the tiled PyTorch path on the GPU, and
    the ranks against the CPU's compiled path, at the size of the COCO 5K test."""
    images, captions = embeddings(5000, 1024, 0, 'cuda')
    fast = score_matrix(images, captions, 'order', compiled=True)
    torch.testing.assert_close(fast, score_matrix(images, captions, 'order', compiled=False), rtol=1e-4, atol=1e-5)
    i2t, t2i = retrieval_ranks(fast)
    cpu_i2t, cpu_t2i = retrieval_ranks(score_matrix(images.cpu()[:1000], captions.cpu()[:5000], 'order', compiled=True))
    sub_i2t, sub_t2i = retrieval_ranks(fast[:1000, :5000])
    # float32 sums in another order may swap near-ties: a rank moves by one, rarely
    assert (sub_i2t.cpu() == cpu_i2t).float().mean() > 0.999 and (sub_t2i.cpu() == cpu_t2i).float().mean() > 0.999
    assert i2t.shape == (5000,) and t2i.shape == (25000,) and (i2t == 0).float().mean() > 0.5


@pytest.mark.parametrize('measure', ['order', 'cosine'])
def test_train_step_on_cuda_equals_the_plain_step_on_cpu(measure):
    # true float32 on the GPU, as on the CPU: no TF32 in cuDNN's GRU or in the matmuls
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            compare_training_steps(measure)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def compare_training_steps(measure):
    torch.manual_seed(0)
    n_caps = 40
    feats, tokens, lengths = caption_batch(8, n_caps)
    cfg = SimpleNamespace(margin=0.05, max_violation=False, grad_clip=0.5, dtype='float32')
    fast = make_model(24, 30, 8, 16, measure, compiled=True).cuda()
    plain = make_model(24, 30, 8, 16, measure)
    plain.load_state_dict({k: v.cpu() for k, v in fast.state_dict().items()})
    fast_opt = train.make_optimizer(fast, 1e-2)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-2, foreach=False)
    if measure == 'cosine':   # naive_step scores by order; the plain cosine step is the same code on the CPU
        plain_opt = train.make_optimizer(plain, 1e-2)
    for step in range(3):
        idx = torch.randperm(n_caps)[:16]
        a, _ = train_on(fast, fast_opt, feats.cuda(), tokens.cuda(), lengths, idx, cfg)
        if measure == 'order':
            b = naive_step(plain, plain_opt, feats[idx // 5], [tokens[i, :lengths[i]] for i in idx.tolist()], cfg)
        else:
            b, _ = train_on(plain, plain_opt, feats, tokens, lengths, idx, cfg)
        torch.testing.assert_close(a.cpu(), b, rtol=1e-3, atol=1e-4)
    for p, q in zip(fast.parameters(), plain.parameters()):
        torch.testing.assert_close(p.cpu(), q, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_a_training_step_never_waits_for_the_gpu(dtype):
    """No copy or read in train_step makes the host wait for the GPU, so that the host queues
    step n+1 while the GPU still runs step n (CUDA's sync debug mode raises on any wait)."""
    torch.manual_seed(0)
    feats, tokens, lengths = caption_batch(200, 1000, length=15, vocab=500, feature_dim=256)
    feats, tokens = feats.cuda(), tokens.cuda()
    model = make_model(256, 500, 32, 128, 'order', compiled=True).cuda()
    optimizer = train.make_optimizer(model, 1e-3)
    cfg = SimpleNamespace(margin=0.05, max_violation=False, grad_clip=2.0, dtype=dtype)
    batches = torch.randperm(1000).split(128)
    train_on(model, optimizer, feats, tokens, lengths, batches[0], cfg)   # compile, allocate
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        for idx in batches[1:4]:
            train_on(model, optimizer, feats, tokens, lengths, idx, cfg)
    finally:
        torch.cuda.set_sync_debug_mode('default')


def test_bfloat16_training_matches_float32_within_noise(synthetic_dir, tmp_path):
    """The same run in float32 and in bfloat16 autocast (the CUDA default), and float32 with
    another seed for the size of the noise: bfloat16 moves the test rsum no more than a seed does
    (plus a little), and both learn. Each run's result is printed for the record."""
    model = make_model(24, 30, 8, 32, 'order', compiled=True).cuda()
    seen = []   # cuDNN's GRU runs wholly in bfloat16 under autocast, state included
    model.gru.register_forward_hook(lambda module, inputs, output: seen.append(output[1].dtype))
    feats, tokens, lengths = caption_batch(4, 20)
    cfg = SimpleNamespace(margin=0.05, max_violation=False, dtype='bfloat16')
    loss = loss_of(model, feats.cuda(), tokens.cuda(), lengths, torch.arange(20), cfg)
    assert seen == [torch.bfloat16] and loss.dtype == torch.float32

    rsum = {}
    for name, args in (('float32', ['--dtype=float32']), ('bfloat16', ['--dtype=bfloat16']),
                       ('float32_seed2', ['--dtype=float32', '--seed=2'])):
        out = tmp_path / name
        proc = run_script('train.py', '--dataset=synthetic', f'--data_dir={synthetic_dir}', f'--out_dir={out}',
                          '--epochs=3', *SMALL, *args)
        assert f'in {name.split("_")[0]}' in proc.stdout
        run_script('eval.py', f'--out_dir={out}')
        rsum[name] = json.load(open(out / 'results_test.json'))['rsum']
    print('test rsum', rsum)
    noise = abs(rsum['float32'] - rsum['float32_seed2'])
    assert min(rsum.values()) > 250
    assert abs(rsum['bfloat16'] - rsum['float32']) <= max(2 * noise, 20), rsum


def test_scripts_on_cuda_agree_with_the_cpu(synthetic_dir, tmp_path):
    """eval.py of one checkpoint on the GPU (Triton kernel, cuDNN GRU) and on the CPU."""
    out = tmp_path / 'run'
    proc = run_script('train.py', '--dataset=synthetic', f'--data_dir={synthetic_dir}', f'--out_dir={out}',
                      '--epochs=1', *SMALL)
    assert 'training on cuda' in proc.stdout
    results = {}
    for dev in ('cuda', 'cpu'):
        run_script('eval.py', f'--out_dir={out}', f'--device={dev}')
        results[dev] = json.load(open(out / 'results_test.json'))
    for d in ('i2t', 't2i'):
        for k in ('r1', 'r5', 'r10'):
            assert abs(results['cuda'][d][k] - results['cpu'][d][k]) <= 1.0, (d, k, results)
