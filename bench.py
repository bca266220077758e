"""How fast each stage runs, against what the hardware allows, measured in one run.

    python bench.py                                  # all stages at COCO's sizes
    python bench.py --scale=tiny --stages=train,eval # seconds; what CI runs

On synthetic data of the chosen scale, on the current device. For each stage: `ours` (what this
repository's code does), `ceiling` (the part the stage cannot beat, measured in the same run),
`ratio` (how close ours comes to it: 1.0 = at the ceiling), `naive` (the straightforward way).
- train: captions/s of training steps through train.py's own train_step (its default recipe,
  word and image dropout included), against the caption GRU trained alone on the same batches
  (forward, backward, its Adam step; interleaved blocks, each path meeting half of the blocks'
  batches first, so both see the same load and the same new shapes);
  naive: captions one at a time through the GRU as the seed code did, batches collated in Python
  by a DataLoader, the full broadcast for order scores, Adam's per-parameter loop.
- eval: seconds to score and rank every (image, caption) pair of a test set (COCO 5K: 5,000 x
  25,000, embed 1,024) for the order measure (`ours`) and cosine (`ours_cosine`), against the
  arithmetic floor: 3 vector operations per element of the (images x captions x dims) difference
  (subtract, clamp, multiply-add) at the device's fused multiply-add rate, measured by a matmul;
  naive: the broadcast in chunks of 2^26 elements.
- extract: images/s from JPEG files to saved features through prep.py's extraction
  (features.extract_features with prep.py's decoder: --decode, default prep.py's 'auto', which is
  decode_jpeg on the device (nvjpeg) on CUDA and PIL in the workers elsewhere; and prep.py's
  default dtype, bfloat16 with channels_last on CUDA and on CPUs with AMX or AVX512-BF16), 1 and
  10 crops, against the lower of VGG16's forward rate alone in that dtype (random weights; the
  rate does not depend on them) and the decode rate alone of the decoder used: PIL's (decode
  only, one process) times the decoding processes, or decode_jpeg's on batches of file bytes plus
  resize and crops on the device (timed with synchronization); both decode rates are reported,
  and for decode='torch' the rate at which the workers hand the files' bytes over (read_torch).
  ours_float32: the same batched extraction in float32. naive: one image at a time through PIL
  and fp32.
- finetune (not in the default stages): images/s through the CNN inside train.py's fine-tuning step
  (train.train_step on pixels: EfficientNet-Lite0 with random weights, batch norm frozen, train.py's
  cnn_frozen_stages frozen in both, on random 224 crops already decoded; the GRU, the loss and
  Adam over everything), against the bare CNN's
  forward and backward on the same batches (interleaved blocks, as train's GRU); no naive.
Prints one table and writes every figure to --out (JSON).
"""
import contextlib
import functools
import io
import os
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import prep
import train
from model import Backbone, ModelConfig, build_model, contrastive_loss, score_matrix
from features import (DECODERS, IMAGENET_MEAN, IMAGENET_STD, ImageFiles, batch_features, build_backbone,
                      default_batch_size, extract_features, read_for_torch, resolve_decode, resolve_dtype, tensor_crops)
from model import order_scores as broadcast_order_scores   # the plain form: the naive baselines' order scores
from options import (DEVICE, DTYPES, SEED, at_least, cpu_runs_bfloat16, one_of, parse_config, pick_device, pick_dtype,
                     run_main)
from utils import retrieval_ranks, write_json

# ----------------------------------------------------------------------------- config
scale = 'coco'                     # tiny | flickr8k | flickr30k | coco: sizes of the synthetic data
stages = 'train,eval,extract'      # which stages to run, comma-separated
out = 'bench.json'                 # every figure, as JSON
device = 'auto'                    # auto = cuda, then mps, then cpu
compile = True                     # as in train.py and eval.py: the torch.compile'd order kernels
dtype = 'auto'                     # as in train.py and prep.py: bfloat16 on CUDA and on CPUs with AMX or AVX512-BF16, float32 elsewhere
train_iters = 0                    # training steps timed (and as many GRU-alone steps); 0 = the scale's default
extract_images = 0                 # JPEG files drawn for the extract stage; 0 = the scale's default
decode = prep.decode               # extract stage's decoder, as prep.py's --decode: auto | pil | torch
seed = 0                           # the synthetic data
CONFIG_KEYS = [k for k, v in globals().items() if k.islower() and not k.startswith('_') and isinstance(v, (int, float, bool, str))]
# -----------------------------------------------------------------------------

# Sizes as in the real datasets (captions and images of the train split; vocabulary of VSE++'s
# vocab files at threshold 4; caption lengths 8-15 tokens, around COCO's mean of 10.5 plus the
# end). The eval sizes are those of the test split; extraction is timed on a few files.
SCALES = {
    'tiny': dict(train_images=128, vocab=100, feature_dim=64, word_dim=16, embed_dim=32, batch_size=32, iters=10,
                 test_images=100, extract_images=2, image_size=(320, 240)),
    'flickr8k': dict(train_images=6000, vocab=2500, test_images=1000),
    'flickr30k': dict(train_images=29000, vocab=7000, test_images=1000),
    'coco': dict(train_images=113287, vocab=10000, test_images=5000),
}
DEFAULTS = dict(feature_dim=4096, word_dim=300, embed_dim=1024, batch_size=128, iters=30,
                extract_images=0, image_size=(640, 480))
LENGTHS = (8, 15)
STAGES = ('train', 'eval', 'extract', 'finetune')
# What each option must be, checked before any work (options.check_options).
OPTION_RULES = {
    'scale': one_of(*SCALES),
    'stages': (lambda v: v.split(',') != [''] and set(v.split(',')) <= set(STAGES),
               f"a comma-separated subset of {','.join(STAGES)}"),
    'out': (lambda v: v != '', 'a file name for the JSON report'),
    'device': DEVICE,
    'train_iters': at_least(0),
    'extract_images': at_least(0),
    'decode': one_of(*DECODERS),
    'dtype': one_of(*DTYPES),
    'seed': SEED,
}


def sync(dev):
    if dev.type == 'cuda':
        torch.cuda.synchronize()
    elif dev.type == 'mps':
        torch.mps.synchronize()


def timed(fn, dev):
    """Seconds that fn() takes, the device's queue drained before and after."""
    sync(dev)
    t0 = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- train

def synthetic_training_set(s, dev, gen):
    n_caps = 5 * s['train_images']
    feats = torch.nn.functional.normalize(torch.randn(s['train_images'], s['feature_dim'], generator=gen), dim=1)
    lengths = torch.randint(LENGTHS[0], LENGTHS[1] + 1, (n_caps,), generator=gen)
    tokens = torch.randint(2, s['vocab'], (n_caps, LENGTHS[1]), generator=gen)
    tokens[torch.arange(LENGTHS[1])[None, :] >= lengths[:, None]] = 0
    return feats.to(dev), tokens.to(dev), lengths


def bench_train(opts, s, dev, gen):
    feats, tokens, lengths = synthetic_training_set(s, dev, gen)
    cfg = train.make_config([])   # train.py's default recipe
    cfg.batch_size, cfg.compile, cfg.dtype = s['batch_size'], opts.compile, pick_dtype(opts.dtype, dev)
    model = build_model(ModelConfig(s['feature_dim'], s['vocab'], s['word_dim'], s['embed_dim'], cfg.measure,
                                    cfg.word_dropout, cfg.image_dropout), dev, compiled=opts.compile)
    optimizer = train.make_optimizer(model, cfg.learning_rate)
    data = SimpleNamespace(feats=feats, tokens=tokens, lengths=lengths)
    gru = GruAlone(s, model, tokens, lengths, cfg.dtype, dev)
    order = torch.randperm(len(tokens), generator=gen)
    batches = [order[b:b + cfg.batch_size] for b in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size)]
    iters = min(opts.train_iters or s['iters'], len(batches) - 3)
    ours = lambda chunk: [train.train_step(model, optimizer, *train.get_batch(data, idx, None, 0, cfg.seed), cfg,  # noqa: E731
                                           cfg.max_violation) for idx in chunk]
    for idx in batches[:3]:   # warm-up: compilation, allocator, first-touch
        ours([idx])
        gru.steps([gru.inputs(idx)])
    # Alternate blocks of steps, so that the two rates see the same load on a shared machine, and
    # alternate which of the two meets a block's batches first: a CPU builds a matmul kernel for
    # each new shape (a packed GRU meets many), and whichever runs second would get it for free.
    t_ours = t_gru = 0.0
    block = 5
    for b in range(3, 3 + iters, block):
        chunk = batches[b:min(b + block, 3 + iters)]
        inputs = [gru.inputs(idx) for idx in chunk]
        if (b - 3) // block % 2:
            t_gru += timed(lambda: gru.steps(inputs), dev)
            t_ours += timed(lambda: ours(chunk), dev)
        else:
            t_ours += timed(lambda: ours(chunk), dev)
            t_gru += timed(lambda: gru.steps(inputs), dev)
    n = iters * cfg.batch_size
    result = {'ours': n / t_ours, 'ceiling': n / t_gru, 'unit': 'captions/s', 'iterations': iters,
              'batch_size': cfg.batch_size, 'captions': len(tokens), 'dtype': cfg.dtype}
    result['ratio'] = result['ours'] / result['ceiling']

    # The straightforward way, on a couple of batches: it is slow.
    naive_iters = 2
    naive_batches = batches[3 + iters:3 + iters + naive_iters] or batches[:naive_iters]
    result['naive'] = naive_iters * cfg.batch_size / naive_train(s, cfg, feats, tokens, lengths, naive_batches, dev)
    result['naive_note'] = ('one caption at a time through the GRU, batches collated in Python by a DataLoader, '
                            'the full broadcast for order scores, Adam without foreach/fused')
    return result


class GruAlone:
    """The ceiling of a training step: the caption encoder's GRU trained alone on the same
    batches, in the same dtype: forward, backward into its weights and into the word vectors,
    and Adam's step on its weights (train.make_optimizer's). What a step does beyond this
    (image encoder, scores, loss, word vectors, clipping, bookkeeping) is what `ratio` charges."""

    def __init__(self, s, model, tokens, lengths, dtype, dev):
        self.model, self.tokens, self.lengths, self.dtype, self.dev = model, tokens, lengths, dtype, dev
        self.gru = torch.nn.GRU(s['word_dim'], s['embed_dim'], batch_first=True).to(dev)
        self.optimizer = torch.optim.Adam(self.gru.parameters(), lr=1e-4, fused=True)   # as train.make_optimizer's

    def inputs(self, idx):
        idx = idx[self.lengths[idx].argsort(descending=True)]   # sorted, as train_step packs them
        lens = self.lengths[idx]
        words = self.model.word_embed(self.tokens[idx.to(self.dev), :int(lens.max())]).detach().requires_grad_()
        return words, lens

    def steps(self, inputs):
        for words, lens in inputs:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.dtype == 'bfloat16'):
                _, last = self.gru(pack_padded_sequence(words, lens, batch_first=True))
            last.sum().backward()
            self.optimizer.step()


def naive_train(s, cfg, feats, tokens, lengths, batches, dev):
    """Seconds for len(batches) steps the way the seed code and the reference code did them."""
    feats_np, tokens_np, lengths_np = feats.cpu().numpy(), tokens.cpu().numpy(), lengths.numpy()

    class Captions(torch.utils.data.Dataset):
        def __len__(self):
            return len(tokens_np)

        def __getitem__(self, i):
            return feats_np[i // 5], list(tokens_np[i, :lengths_np[i]])

    def collate(items):
        images = torch.tensor(np.stack([im for im, _ in items]))
        caps = [torch.tensor(c) for _, c in items]
        return images, caps

    sampler = [int(i) for idx in batches for i in idx]
    loader = torch.utils.data.DataLoader(Captions(), batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate)
    model = build_model(ModelConfig(s['feature_dim'], s['vocab'], s['word_dim'], s['embed_dim'], cfg.measure), dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, foreach=False)

    def run():
        for images, caps in loader:
            naive_step(model, optimizer, images.to(dev), [c.to(dev) for c in caps], cfg).item()  # logged every step
    return timed(run, dev)


def naive_step(model, optimizer, features, captions, cfg):
    """One training step the plain way: each caption (a 1-d tensor of token ids) through the GRU
    on its own, the broadcast for order scores."""
    images = model.encode_images(features)
    hidden = [model.gru(model.word_embed(c)[None])[1][0] for c in captions]
    captions = model.normalize_embedding(torch.cat(hidden))
    loss = contrastive_loss(broadcast_order_scores(images, captions), cfg.margin, cfg.max_violation)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=False)
    optimizer.step()
    return loss.detach()


def bench_finetune(opts, s, dev, gen):
    """train.train_step on pixels against the same CNN's forward and backward alone (see the docstring)."""
    cfg = train.make_config([])   # train.py's default recipe
    cfg.dtype = pick_dtype(opts.dtype, dev)
    batch, iters = s['batch_size'] if dev.type == 'cuda' else 16, opts.train_iters or (s['iters'] if dev.type == 'cuda' else 6)
    _, tokens, lengths = synthetic_training_set({**s, 'train_images': batch * (iters + 2)}, dev, gen)
    lite0 = dict(cnn='efficientnet_lite0', cnn_frozen_stages=cfg.cnn_frozen_stages)   # the same stages train in both
    model = build_model(ModelConfig(1280, s['vocab'], s['word_dim'], s['embed_dim'], cfg.measure, cfg.word_dropout,
                                    cfg.image_dropout, **lite0), dev, cfg.dtype, compiled=opts.compile)
    optimizer = train.make_optimizer(model, cfg.learning_rate, 0.0, cfg.cnn_learning_rate)
    bare = Backbone(ModelConfig(1280, s['vocab'], **lite0), None, dev, cfg.dtype)
    data = SimpleNamespace(tokens=tokens, lengths=lengths)
    pixels = torch.randn(batch, 3, 224, 224, generator=gen)
    batches = [torch.randperm(len(tokens), generator=gen)[:batch] for _ in range(iters + 2)]

    def ours(idx):
        batch = train.get_batch(data, idx, iter([(pixels, idx // 5)]), 0, cfg.seed)
        train.train_step(model, optimizer, *batch, cfg, cfg.max_violation)

    def alone(idx):   # the CNN's part of a step: forward and backward into its weights
        bare.zero_grad(set_to_none=True)
        x = pixels.to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.dtype == 'bfloat16'):
            f = bare(x)
        f.sum().backward()

    for idx in batches[:2]:   # warm-up
        ours(idx)
        alone(idx)
    t_ours = t_alone = 0.0
    block = 2
    for b in range(2, 2 + iters, block):
        chunk = batches[b:b + block]
        t_ours += timed(lambda: [ours(idx) for idx in chunk], dev)
        t_alone += timed(lambda: [alone(idx) for idx in chunk], dev)
    result = {'ours': iters * batch / t_ours, 'ceiling': iters * batch / t_alone, 'unit': 'images/s', 'cnn':
              'efficientnet_lite0', 'iterations': iters, 'batch_size': batch, 'dtype': cfg.dtype, 'naive': None}
    result['ratio'] = result['ours'] / result['ceiling']
    return result


# ----------------------------------------------------------------------------- eval

def memory_mark(dev):
    """Resident or allocated bytes now; the peak since this call is read by memory_peak."""
    if dev.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    if dev.type == 'cpu' and os.path.exists('/proc/self/clear_refs'):
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')          # Linux: reset the peak resident size (VmHWM) to the current one
        return proc_status_bytes('VmRSS')
    return None


def memory_peak(dev):
    if dev.type == 'cuda':
        return torch.cuda.max_memory_allocated()
    if dev.type == 'cpu' and os.path.exists('/proc/self/clear_refs'):
        return proc_status_bytes('VmHWM')
    return None


def proc_status_bytes(field):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f'/proc/self/status has no {field}')


def matmul_flops(dev):
    """The device's fp32 multiply-add rate as a large matmul achieves it (flops/s, 2 per FMA)."""
    n = 4096 if dev.type == 'cuda' else 1024
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False       # plain fp32, as the order kernel computes
    try:
        a @ b
        reps = 20 if dev.type == 'cuda' else 5
        seconds = min(timed(lambda: a @ b, dev) for _ in range(reps))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return 2 * n ** 3 / seconds


def bench_eval(opts, s, dev, gen):
    n, dim = s['test_images'], s['embed_dim']
    images = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1).abs().to(dev)
    captions = torch.nn.functional.normalize(torch.randn(5 * n, dim, generator=gen), dim=1).abs().to(dev)
    # give each image's own captions a higher score, so that the ranks are not all ties
    captions = torch.nn.functional.normalize(captions + images.repeat_interleave(5, 0), dim=1)
    elements = n * 5 * n * dim

    def rank(measure):
        i2t, t2i = retrieval_ranks(score_matrix(images, captions, measure, opts.compile))
        return i2t, t2i

    # compile the kernel: on a CPU the one shape of its blocks; on CUDA Triton times its tile
    # shapes for this problem size at the first call
    if dev.type == 'cuda':
        score_matrix(images, captions, 'order', opts.compile)
    else:
        score_matrix(images[:1024], captions[:512], 'order', opts.compile)
    base = memory_mark(dev)
    t_order = timed(lambda: rank('order'), dev)
    peak = memory_peak(dev)
    t_cosine = timed(lambda: rank('cosine'), dev)
    flops = matmul_flops(dev)
    result = {'ours': t_order, 'ours_cosine': t_cosine, 'unit': 's', 'images': n, 'captions': 5 * n, 'dim': dim,
              'ceiling': 3 * elements / (flops / 2), 'ceiling_cosine': elements / (flops / 2),
              'matmul_flops': flops, 'score_matrix_bytes': 4 * n * 5 * n,
              'extra_memory_bytes': None if base is None else peak - base}
    result['ratio'] = result['ceiling'] / t_order

    # The chunked broadcast, on a slice of the images when the whole would take long; scaled.
    rows = max(1, 2 ** 26 // captions.numel())
    take = n if n <= 1000 or dev.type == 'cuda' else min(n, max(rows, n // 50))

    def naive():
        with torch.no_grad():
            for r in range(0, take, rows):
                broadcast_order_scores(images[r:min(r + rows, take)], captions)
    result['naive'] = timed(naive, dev) * n / take
    result['naive_note'] = (f'order scores by broadcast in chunks of {rows} images'
                            + ('' if take == n else f'; timed on {take} of the {n} images and scaled'))
    return result


# ----------------------------------------------------------------------------- extract

def draw_jpegs(folder, count, size, gen, unique=256):
    """JPEG files of smooth random colour fields (they compress like photographs, not like
    noise): `unique` pictures drawn, the rest copies of them (decoding costs the same; drawing
    a Flickr8k-sized set would take minutes)."""
    import shutil
    from PIL import Image
    paths = []
    w, h = size
    for i in range(count):
        path = os.path.join(folder, f'{i:05d}.jpg')
        if i >= unique:
            shutil.copyfile(paths[i % unique], path)
            paths.append(path)
            continue
        small = torch.rand(h // 16 + 1, w // 16 + 1, 3, generator=gen).permute(2, 0, 1)[None]
        big = torch.nn.functional.interpolate(small, size=(h, w), mode='bicubic', align_corners=False)
        big = big + 0.05 * torch.randn(big.shape, generator=gen)
        pixels = (big[0].permute(1, 2, 0).clamp(0, 1) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def pil_to_tensor(image, crop):
    from torchvision.transforms import functional as TF
    image = TF.center_crop(TF.resize(image, crop * 256 // 224), crop)
    return TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)


def bench_extract(opts, s, dev, gen):
    """prep.py's extraction (features.extract_features with prep.py's batch size, workers and
    decoder, in this script's --dtype) on JPEG files drawn here, 224 crops, VGG16 with random
    weights (the rate does not depend on them), the features saved as .npy as prep.py does; and
    the same in float32."""
    # Enough images that the decoding workers' start-up weighs about what it weighs in prep.py:
    # Flickr8k's number on a GPU; on a CPU, 64 (each batch takes seconds there)
    count = opts.extract_images or s['extract_images'] or (8192 if dev.type == 'cuda' else 64)
    batch = prep.batch_size or default_batch_size(dev)
    decoder, net_dtype = resolve_decode(opts.decode, dev), resolve_dtype(opts.dtype, dev, 'vgg16')
    result = {'unit': 'images/s', 'images': count, 'image_size': list(s['image_size']), 'batch_size': batch,
              'workers': prep.workers, 'decoder': decoder, 'dtype': net_dtype, **cpu_bfloat16_support()}
    with tempfile.TemporaryDirectory() as folder:
        paths = draw_jpegs(folder, count, s['image_size'], gen)
        saved = os.path.join(folder, 'features.npy')
        net = random_vgg16(dev, net_dtype)
        for crops, suffix in ((1, ''), (10, '_10crop')):
            result['ours' + suffix] = extraction_rate(net, paths, crops, dev, batch, decoder, net_dtype, saved)
        result['ours_float32'] = result['ours'] if net_dtype == 'float32' else extraction_rate(
            random_vgg16(dev, 'float32'), paths, 1, dev, batch, decoder, 'float32', saved)
        result.update(decode_rates(paths, dev, batch))
        result['vgg16_forward'] = forward_rate(net, count, batch, dev, net_dtype)
        naive_net, naive_paths = fc7_network(dev), paths[:min(count, 8)]
        naive_extract(paths[:1], naive_net, dev)  # warm-up, as ours gets: 8 images would not amortize it
        result['naive'] = len(naive_paths) / timed(functools.partial(naive_extract, naive_paths, naive_net, dev), dev)
    result.update(extract_ceilings(result, decoder, batch, dev))
    result['speedup_over_naive'] = result['ours'] / result['naive']
    result['speedup_over_float32'] = result['ours'] / result['ours_float32']
    print(f"extract: {net_dtype} ({'CPU ' + describe_cpu_bfloat16(result) if dev.type == 'cpu' else dev.type}): 1-crop "
          f"{result['ours']:.3g} images/s; float32 batched {result['ours_float32']:.3g}; naive {result['naive']:.3g}")
    return result


def random_vgg16(dev, dtype):
    with contextlib.redirect_stdout(io.StringIO()):   # the random-weights warning
        return build_backbone('vgg16', 'random', dev, dtype)[0]


def cpu_bfloat16_support():
    """What the CPU offers for bfloat16, as torch sees it."""
    capabilities = torch.cpu.get_capabilities()
    return {'cpu_bfloat16_native': cpu_runs_bfloat16(), 'cpu_amx_bf16': bool(capabilities.get('amx_bf16', False)),
            'cpu_avx512_bf16': bool(capabilities.get('avx512_bf16', False))}


def describe_cpu_bfloat16(result):
    if result['cpu_amx_bf16']:
        return 'with AMX'
    return 'with AVX512-BF16, no AMX' if result['cpu_avx512_bf16'] else 'without native bfloat16'


def extraction_rate(net, paths, crops, dev, batch, decoder, dtype, saved):
    """images/s of extract_features as prep.py runs it, after a warm-up on one batch of the same
    shape (oneDNN builds its kernels per shape once; prep.py pays that once per dataset)."""
    extract_features(net, paths[:batch], 'vgg16', crops, dev, batch_size=batch, workers=0, progress=False,
                     decode=decoder, dtype=dtype)
    run = functools.partial(extract_and_save, net, paths, crops, dev, batch, decoder, dtype, saved)
    return len(paths) / timed(run, dev)


def extract_and_save(net, paths, crops, dev, batch, decoder, dtype, path):
    feats = extract_features(net, paths, 'vgg16', crops, dev, batch_size=batch, workers=prep.workers,
                             progress=False, decode=decoder, dtype=dtype)
    np.save(path, feats)


def decode_with_pil(paths):
    from PIL import Image
    for p in paths:
        with Image.open(p) as im:
            im.convert('RGB').load()


def crops_with_torch(files, batch, crops, dev):
    for b in range(0, len(files), batch):
        tensor_crops(files[b:b + batch], [''] * len(files[b:b + batch]), 'vgg16', crops, dev)


def decode_rates(paths, dev, batch):
    """images/s of each decoder alone: PIL in one process (decode_pil); for decode='torch' the
    workers' part (reading the files' bytes and handing them to the main process: read_torch),
    then the main process's (bytes to normalized crops on the device: decode_torch)."""
    count = len(paths)
    rates = {'decode_pil': min(count, 256) / timed(functools.partial(decode_with_pil, paths[:256]), dev)}
    loader = torch.utils.data.DataLoader(ImageFiles(paths, read_for_torch, None), batch_size=batch,
                                         num_workers=prep.workers, collate_fn=list)
    rates['read_torch'] = count / timed(lambda: [None for _ in loader], dev)
    files = [read_for_torch(p) for p in paths]
    for crops, suffix in ((1, ''), (10, '_10crop')):
        crops_with_torch(files, batch, crops, dev)   # warm-up: the decoder's start-up on the device
        rates['decode_torch' + suffix] = count / timed(functools.partial(crops_with_torch, files, batch, crops, dev), dev)
    return rates


def forward_rate(net, count, batch, dev, dtype):
    """images/s of the network alone on random batches, run as extract_features runs it."""
    x = torch.randn(min(count, batch), 3, 224, 224, device=dev)
    with torch.no_grad():
        batch_features(net, x, 1, dev, dtype)
        passes = max(1, count // len(x))
        return passes * len(x) / timed(lambda: [batch_features(net, x, 1, dev, dtype) for _ in range(passes)], dev)


def naive_extract(paths, net, dev):
    """One image at a time through PIL and the float32 network."""
    from PIL import Image
    with torch.no_grad():
        for p in paths:
            with Image.open(p) as im:
                net(pil_to_tensor(im.convert('RGB'), 224)[None].to(dev)).cpu()


def extract_ceilings(result, decoder, batch, dev):
    """The lower of the network's rate and the decoder's, for 1 and 10 crops, and how close ours comes."""
    if decoder == 'pil':
        # one process's rate; prep.py decodes in `workers` processes alongside the network
        decoders = max(1, min(prep.workers, os.cpu_count() or 1))
        decode_ceiling = decode_ceiling_10crop = result['decode_pil'] * decoders
        how = f"one process's PIL decode rate times {decoders} (prep.py's {prep.workers} workers, at most one per core)"
    else:
        decode_ceiling, decode_ceiling_10crop = result['decode_torch'], result['decode_torch_10crop']
        how = f"decode_jpeg on {dev.type} of batches of {batch} files' bytes plus resize and crops (decode_torch)"
    ceilings = {'ceiling': min(result['vgg16_forward'], decode_ceiling),
                'ceiling_10crop': min(result['vgg16_forward'] / 10, decode_ceiling_10crop)}
    return {**ceilings, 'ratio': result['ours'] / ceilings['ceiling'],
            'ratio_10crop': result['ours_10crop'] / ceilings['ceiling_10crop'],
            'note': (f"decoder {decoder}, dtype {result['dtype']}; ceiling: the lower of VGG16-to-fc7 alone (in that "
                     f"dtype, as extraction runs it) and {how}")}


def fc7_network(dev):
    """VGG16 up to fc7 in fp32, for the naive way."""
    from torchvision.models import vgg16
    net = vgg16(weights=None)
    net.classifier = net.classifier[:5]
    return net.to(dev).eval()


# ----------------------------------------------------------------------------- main

def main(argv):
    opts = parse_config({k: globals()[k] for k in CONFIG_KEYS}, argv, OPTION_RULES)
    chosen = opts.stages.split(',')
    s = {**DEFAULTS, **SCALES[opts.scale]}
    dev = pick_device(opts.device)
    gen = torch.Generator().manual_seed(opts.seed)
    report = {'scale': opts.scale, 'device': str(dev), 'device_name': device_name(dev), 'torch': torch.__version__,
              'threads': torch.get_num_threads(), 'compile': opts.compile,
              'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}
    for stage in chosen:
        print(f"{stage} ...", flush=True)
        report[stage] = {'train': bench_train, 'eval': bench_eval, 'extract': bench_extract,
                         'finetune': bench_finetune}[stage](opts, s, dev, gen)
    print_table(report, chosen)
    write_json(opts.out, report)
    print(f"wrote {opts.out}")


def device_name(dev):
    if dev.type == 'cuda':
        return torch.cuda.get_device_name(dev)
    name = 'cpu'
    if os.path.exists('/proc/cpuinfo'):
        with open('/proc/cpuinfo') as f:
            name = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), name)
    return f"{name}, {os.cpu_count()} cores" if dev.type == 'cpu' else str(dev)


def print_table(report, chosen):
    def fmt(x):
        return '-' if x is None else f'{x:.3g}' if x < 100 else f'{x:,.0f}'
    print(f"\n{report['device_name']} ({report['device']}), scale {report['scale']}, torch {report['torch']}")
    print(f"{'stage':16s}{'ours':>12s}{'ceiling':>12s}{'ratio':>8s}{'naive':>12s}  unit")
    rows = {'train': [('train', '')], 'eval': [('eval order', ''), ('eval cosine', '_cosine')],
            'extract': [('extract 1-crop', ''), ('extract 10-crop', '_10crop')], 'finetune': [('finetune', '')]}
    for stage in chosen:
        r = report[stage]
        for name, suffix in rows[stage]:
            ours, ceiling = r['ours' + suffix], r['ceiling' + suffix]
            ratio = r.get('ratio' + suffix, None if ours is None else (ceiling / ours if r['unit'] == 's' else ours / ceiling))
            naive = r['naive'] if suffix == '' else None
            print(f"{name:16s}{fmt(ours):>12s}{fmt(ceiling):>12s}{fmt(ratio):>8s}{fmt(naive):>12s}  {r['unit']}")
    print("ratio: ours against the ceiling, 1.0 = at the ceiling")


if __name__ == '__main__':
    run_main(main)
