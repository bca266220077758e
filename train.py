"""Train the image and sentence encoders on a prepared dataset.

    python train.py --dataset=flickr8k
    python train.py --dataset=coco --measure=cosine --margin=0.2 --max_violation=True   # VSE++

Every constant below can be overridden as --name=value. Writes into out_dir: best.pt (best
validation rsum), last.pt (where training stands; --resume=True continues from it),
log.jsonl (loss and validation metrics) and curves.png (the log drawn, at each validation).
"""
import glob
import io
import json
import math
import os
import signal
import time
import warnings
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.distributed.nn
from tqdm import tqdm

from model import JointEmbedding, contrastive_loss, score_matrix
from utils import (UserError, atomic_open, embed_split, encode_captions, load_checkpoint, load_meta, load_split,
                   load_vocab, parse_config, pick_device, retrieval_metrics, run_main)

# ----------------------------------------------------------------------------- config
dataset = 'flickr8k'      # a prepared dataset in data/<dataset> (see prep.py)
data_dir = ''             # default: data/<dataset>
out_dir = ''              # default: checkpoints/<dataset>
measure = 'order'         # 'order' (order-embeddings) or 'cosine' (VSE, VSE++)
margin = 0.05             # hinge margin: 0.05 for order-embeddings, 0.2 for VSE++
max_violation = False     # True: only the hardest negative per query (VSE++)
warmup_epochs = 0         # with max_violation: sum over all negatives for this many epochs first (from scratch it collapses)
embed_dim = 1024          # joint space
word_dim = 300            # word embeddings
batch_size = 128
learning_rate = 1e-3      # Adam
lr_decay_epoch = 0        # multiply the learning rate by 0.1 from this epoch on (VSE++: 15 of 30); 0 = never
grad_clip = 2.0           # clip the gradient's global norm
epochs = 15
patience = 0              # stop when val rsum has not improved for this many validations (best.pt kept); 0 = never
val_images = 0            # validate on this many val images; 0 = all, except COCO's first 1,000 (as VSE++)
eval_interval = 0         # validate and save every this many iterations; 0 = at the end of each epoch
log_interval = 50         # iterations between loss lines in log.jsonl
resume = False            # continue from out_dir/last.pt
seed = 1234
device = 'auto'           # auto = cuda, then mps, then cpu
dtype = 'auto'            # auto: bfloat16 autocast for the encoders on CUDA, float32 elsewhere; or float32 | bfloat16
compile = True            # order scores through torch.compile'd kernels (needs a C++ compiler on a CPU); False: plain PyTorch
CONFIG_KEYS = [k for k, v in globals().items() if k.islower() and not k.startswith('_') and isinstance(v, (int, float, bool, str))]
# -----------------------------------------------------------------------------


def save_checkpoint(path, cfg, vocab, model, feature_dim, **state):
    """A checkpoint holds everything eval.py needs: config, vocabulary, feature size, weights."""
    buffer = io.BytesIO()  # serialized first: torch.save into a full disk fails with an obscure RuntimeError
    torch.save({'config': vars(cfg), 'vocab': vocab, 'feature_dim': feature_dim,
                'model': model.state_dict(), **state}, buffer)
    with atomic_open(path) as f:
        f.write(buffer.getbuffer())


def epoch_order(n, epoch):
    """The caption order of one epoch: a function of (seed, epoch) alone, so that a resumed
    run visits exactly the batches an uninterrupted one would."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))


def hardest_negatives(cfg, epoch):
    """VSE++'s hardest negative only after a warm start: from the first step it collapses."""
    return cfg.max_violation and epoch >= cfg.warmup_epochs


def make_optimizer(model, lr):
    # fused: one kernel for all parameters; 4-6 times faster than the default on a 2-core CPU (this model: 15-18 ms, not 77-105 ms)
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True)


def setup_distributed(device_name):
    """Under torchrun (WORLD_SIZE > 1): one process per GPU with NCCL, or per CPU slot with gloo.
    Returns (rank, world_size, device); a plain `python train.py` is rank 0 of 1."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    dev = pick_device(device_name)
    if world == 1:
        return 0, 1, dev
    if dev.type == 'cuda':
        dev = torch.device('cuda', int(os.environ['LOCAL_RANK']))
        torch.cuda.set_device(dev)
    dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
    return dist.get_rank(), world, dev


def gather(x):
    """Every rank's rows in rank order, with gradients flowing back to the rank that owns them,
    so that each query is contrasted with the whole global batch, not only its own shard."""
    if not dist.is_initialized():
        return x
    with warnings.catch_warnings():  # torch 2.14 calls it deprecated; it is still the autograd-aware gather
        warnings.simplefilter('ignore', FutureWarning)
        return torch.cat(torch.distributed.nn.functional.all_gather(x))


def autocast_dtype(name, dev):
    """train.py's --dtype as the name of the dtype the encoders run in: bfloat16 autocast by
    default on CUDA (cuDNN's GRU runs wholly in bfloat16 there), float32 elsewhere. On a CPU with
    native bfloat16 (AVX512-BF16) --dtype=bfloat16 trained 1.8 times faster here; see README."""
    if name not in ('auto', 'float32', 'bfloat16'):
        raise UserError(f"--dtype={name}: expected auto, float32 or bfloat16")
    if name == 'auto':
        return 'bfloat16' if dev.type == 'cuda' else 'float32'
    return name


def batch_loss(model, feats, tokens, lengths, idx, cfg):
    """The contrastive loss of the captions `idx` (a CPU index) and their images. Under
    bfloat16 only the encoders' matrix products and the GRU run in bfloat16: the embeddings
    come out normalized in float32, and the scores and the loss are float32, since the order
    penalty is a sum of squares of small differences that bfloat16 would round away."""
    dev = feats.device
    # Longest caption first: the GRU's packing then needs no sort index on the device. The loss
    # is a sum over all pairs, so the order of a batch's rows does not change it.
    idx = idx[lengths[idx].argsort(descending=True, stable=True)]
    lens = lengths[idx]
    # A plain copy to a GPU waits for everything queued before it; from pinned memory it does not,
    # so the host goes on queueing the step while the GPU finishes the last one.
    idx_dev = idx.pin_memory().to(dev, non_blocking=True) if dev.type == 'cuda' else idx.to(dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.dtype == 'bfloat16'):
        images = model.encode_images(feats[idx_dev // 5])
        captions = model.encode_captions(tokens[idx_dev, :int(lens.max())], lens)
    return contrastive_loss(model.scores(gather(images), gather(captions)), cfg.margin, cfg.max_violation)


def average_gradients(model):
    """Every rank computed the same global loss, and the all_gather backward summed the world's
    identical copies of each embedding gradient: summing the parameter gradients over ranks and
    dividing by the world size gives exactly the single-process gradient of the global batch."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def train_step(model, optimizer, feats, tokens, lengths, idx, cfg):
    """One step on this rank's captions idx (a CPU index): loss, backward, gradients averaged
    over ranks, clip, Adam. Returns the loss and the gradient norm before clipping as device
    tensors, so that the loop never waits for the device."""
    loss = batch_loss(model, feats, tokens, lengths, idx, cfg)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if dist.is_initialized():
        average_gradients(model)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return loss.detach(), grad_norm


def any_rank(flag, dev):
    """True on every rank when it is True on any: ranks must agree before leaving the loop."""
    if not dist.is_initialized():
        return bool(flag)
    t = torch.tensor([float(bool(flag))], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def validate(model, feats, captions, vocab, dev):
    model.eval()
    images, caps = embed_split(model, feats, captions, vocab, dev)
    if not (torch.isfinite(images).all() and torch.isfinite(caps).all()):
        raise FloatingPointError("the validation embeddings became NaN or inf")  # weights too large, if finite
    result = retrieval_metrics(score_matrix(images, caps, model.measure, model.compiled))
    model.train()
    return result


def main(argv):
    cfg = SimpleNamespace(**parse_config({k: globals()[k] for k in CONFIG_KEYS}, argv))
    globals().update(vars(cfg))
    cfg.data_dir = cfg.data_dir or os.path.join('data', cfg.dataset)
    cfg.out_dir = cfg.out_dir or os.path.join('checkpoints', cfg.dataset)
    if cfg.measure not in ('order', 'cosine'):
        raise UserError(f"--measure={cfg.measure}: expected 'order' or 'cosine'")
    rank, world, dev = setup_distributed(cfg.device)
    cfg.dtype = autocast_dtype(cfg.dtype, dev)
    master = rank == 0  # rank 0 validates, logs and checkpoints
    torch.manual_seed(cfg.seed)

    meta = load_meta(cfg.data_dir)
    vocab = load_vocab(cfg.data_dir)
    train_feats, train_caps = load_split(cfg.data_dir, 'train')
    val_feats, val_caps = load_split(cfg.data_dir, 'val')
    n_val = cfg.val_images or (1000 if meta['dataset'] == 'coco' else len(val_feats))
    val_feats, val_caps = val_feats[:n_val], val_caps[:5 * n_val]

    # The whole training set lives on the device; a batch is an index into it.
    feats = torch.from_numpy(train_feats).to(dev)
    tokens, lengths = encode_captions(train_caps, vocab)
    tokens = tokens.to(dev)
    n_caps = len(tokens)
    global_batch = cfg.batch_size * world
    iters_per_epoch = math.ceil(n_caps / global_batch)

    model = JointEmbedding(feats.shape[1], len(vocab), cfg.word_dim, cfg.embed_dim, cfg.measure, cfg.compile).to(dev)
    if world > 1:
        for p in model.parameters():
            dist.broadcast(p.data, 0)
    optimizer = make_optimizer(model, cfg.learning_rate)
    os.makedirs(cfg.out_dir, exist_ok=True)
    last_path, best_path = os.path.join(cfg.out_dir, 'last.pt'), os.path.join(cfg.out_dir, 'best.pt')
    log_path = os.path.join(cfg.out_dir, 'log.jsonl')
    # Each iteration's loss and gradient norm, checked for NaN/inf (and logged) every log_interval.
    losses, grad_norms = torch.zeros(cfg.log_interval, device=dev), torch.zeros(cfg.log_interval, device=dev)
    it, best_rsum = 0, -1.0
    if cfg.resume:
        it, best_rsum = resume_from(last_path, cfg, vocab, feats.shape[1], model, optimizer, dev, losses, grad_norms)
        if it >= cfg.epochs * iters_per_epoch:
            print(f"{last_path}: this run already finished ({cfg.epochs} epochs); nothing to do")
            return
        print(f"resuming from {last_path} at iteration {it} (epoch {it // iters_per_epoch})")
        if master:
            trim_log(log_path, it)
    elif os.path.exists(last_path):
        raise UserError(f"{last_path} exists: pass --resume=True to continue that run, or choose another --out_dir")
    saved_it = it if cfg.resume else None  # the iteration last.pt holds
    if master:
        remove_stale_temporaries(cfg.out_dir)
    try:
        log = open(log_path if master else os.devnull, 'a' if cfg.resume else 'w', encoding='utf-8')
    except OSError as e:
        raise UserError(f"{log_path}: cannot write it ({e.strerror}); check the folder's permissions") from None
    if master:
        print(f"training on {dev}{f' x {world} processes' if world > 1 else ''} in {cfg.dtype}: {n_caps} captions, {len(feats)} images, "
              f"{iters_per_epoch} iterations of {global_batch} per epoch; validating on {n_val} val images; writing to {cfg.out_dir}")

    def check_finite():
        """Stop at the first NaN or inf since the last check: in a loss, a gradient norm or, after
        them, the weights. Called before every log line, validation and checkpoint, so that
        last.pt always holds the last good state."""
        n = (it - 1) % cfg.log_interval + 1  # the entries since the last full window
        window = torch.stack((losses[:n], grad_norms[:n])).cpu()
        bad = (~torch.isfinite(window)).any(0).nonzero()
        if len(bad):
            k = int(bad[0])
            what, value = ('loss', window[0, k]) if not torch.isfinite(window[0, k]) else ('gradient norm', window[1, k])
            what, where = f"the {what} became {value.item()}", it - n + 1 + k
        elif not torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all():
            what, where = "the weights became NaN or inf", it
        else:
            return
        stop_non_finite(what, where)

    def stop_non_finite(what, where):
        kept = (f"{last_path} keeps the last good state (iteration {saved_it})" if saved_it is not None
                else "no checkpoint had been written yet")
        raise UserError(f"{what} at iteration {where}; training stopped, {kept}; "
                        "try a lower --learning_rate or check the features")

    def checkpoint(val=None):
        nonlocal best_rsum, saved_it
        check_finite()
        if not master:
            return
        state = dict(iteration=it, best_rsum=max(best_rsum, val['rsum']) if val else best_rsum,
                     loss_window=losses.cpu(), grad_norm_window=grad_norms.cpu(), rng_state=torch.get_rng_state())
        if val is not None and val['rsum'] > best_rsum:
            best_rsum = val['rsum']
            save_checkpoint(best_path, cfg, vocab, model, feats.shape[1], val=val, **state)
        save_checkpoint(last_path, cfg, vocab, model, feats.shape[1], optimizer=optimizer.state_dict(), **state)
        saved_it = it

    # A preempted or Ctrl-C'd run stops at the next iteration boundary and saves last.pt.
    # A second Ctrl-C stops at once (all writes are atomic, so nothing is torn).
    stop, stopping = [], False

    def handler(signum, frame):
        if stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.append(signum)
    old_handlers = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while it < cfg.epochs * iters_per_epoch:
            epoch, start = divmod(it, iters_per_epoch)
            lr = cfg.learning_rate * (0.1 if cfg.lr_decay_epoch and epoch >= cfg.lr_decay_epoch else 1.0)
            for group in optimizer.param_groups:
                group['lr'] = lr
            order = epoch_order(n_caps, epoch)
            step_cfg = SimpleNamespace(**{**vars(cfg), 'max_violation': hardest_negatives(cfg, epoch)})
            t0 = time.time()
            bar = tqdm(range(start, iters_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                       initial=start, total=iters_per_epoch, disable=None if master else True)
            for b in bar:
                # Each rank takes its share of the global batch (the last one is cut to a multiple of world).
                idx = order[b * global_batch:(b + 1) * global_batch]
                share = len(idx) // world
                losses[it % cfg.log_interval], grad_norms[it % cfg.log_interval] = train_step(
                    model, optimizer, feats, tokens, lengths, idx[rank * share:(rank + 1) * share], step_cfg)
                it += 1
                if it % cfg.log_interval == 0 or b == iters_per_epoch - 1:
                    check_finite()
                    window = losses[:(it - 1) % cfg.log_interval + 1].cpu()
                    bar.set_postfix(loss=f"{window.mean().item():.3f}")
                    write_log(log, f'{{"iteration": {it}, "epoch": {it / iters_per_epoch:.4f}, "loss": {window.mean().item():.6g}, "lr": {lr:g}}}\n')
                if (world == 1 or it % cfg.log_interval == 0) and any_rank(stop, dev):
                    stopping = True
                    break
                if cfg.eval_interval and it % cfg.eval_interval == 0 and b != iters_per_epoch - 1:
                    check_finite()
                    validate_and_save(model, val_feats, val_caps, vocab, dev, it, iters_per_epoch, log, checkpoint, master)
            bar.close()
            if stopping:
                checkpoint()
                if master:
                    print(f"stopped at iteration {it}; {last_path} saved: continue with --resume=True")
                # the shell's code for "killed by this signal", so that `train.py && eval.py` stops here
                raise SystemExit(128 + (stop[0] if stop else signal.SIGTERM))
            if master:
                print(f"epoch {epoch + 1}: {(iters_per_epoch - start) * global_batch / (time.time() - t0):.0f} captions/s")
            validate_and_save(model, val_feats, val_caps, vocab, dev, it, iters_per_epoch, log, checkpoint, master)
    except FloatingPointError as e:
        stop_non_finite(str(e), it)
    finally:
        log.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if dist.is_initialized():
            dist.destroy_process_group()
    if master:
        print(f"done: best validation rsum {best_rsum:.1f}; evaluate with: python eval.py --out_dir={cfg.out_dir}")


def validate_and_save(model, val_feats, val_caps, vocab, dev, it, iters_per_epoch, log, checkpoint, master):
    if master:
        report(validate(model, val_feats, val_caps, vocab, dev), it, iters_per_epoch, log, checkpoint)
    if dist.is_initialized():
        dist.barrier()  # the other ranks wait for rank 0's validation and checkpoint


def report(val, it, iters_per_epoch, log, checkpoint):
    print(f"iteration {it} (epoch {it / iters_per_epoch:.2f}) val: "
          f"i2t R@1 {val['i2t']['r1']:.1f} R@5 {val['i2t']['r5']:.1f} R@10 {val['i2t']['r10']:.1f} | "
          f"t2i R@1 {val['t2i']['r1']:.1f} R@5 {val['t2i']['r5']:.1f} R@10 {val['t2i']['r10']:.1f} | rsum {val['rsum']:.1f}")
    write_log(log, f'{{"iteration": {it}, "epoch": {it / iters_per_epoch:.4f}, "val": {json.dumps(val)}}}\n')
    draw_curves(log.name, os.path.join(os.path.dirname(log.name), 'curves.png'))
    checkpoint(val)


def nice_ticks(high, count=5):
    """Round tick values from 0 to at least `high`: steps of 1, 2 or 5 times a power of ten."""
    raw = max(high, 1e-12) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return [step * i for i in range(math.ceil(high / step - 1e-9) + 1)]


def draw_panel(draw, font, left, top, width, height, title, series, y_max=None):
    """One line chart into the box (left, top, width, height): `series` is a list of
    (label, rgb, xs, ys). Both axes start at 0; points are marked so that one validation shows."""
    x_ticks = nice_ticks(max(max(xs) for _, _, xs, _ in series))
    y_ticks = nice_ticks(y_max or max(max(ys) for _, _, _, ys in series) or 1.0)
    x0, y0, x1, y1 = left + 50, top + 44, left + width - 22, top + height - 36  # the plotting area
    px = lambda x: x0 + (x1 - x0) * x / x_ticks[-1]
    py = lambda y: y1 - (y1 - y0) * y / y_ticks[-1]
    draw.text((left + width / 2, top + 4), title, fill='black', font=font, anchor='ma')
    for t in x_ticks:
        draw.line([px(t), y0, px(t), y1], fill=(225, 225, 225))
        draw.text((px(t), y1 + 4), f'{t:g}', fill='black', font=font, anchor='ma')
    for t in y_ticks:
        draw.line([x0, py(t), x1, py(t)], fill=(225, 225, 225))
        draw.text((x0 - 4, py(t)), f'{t:g}', fill='black', font=font, anchor='rm')
    draw.rectangle([x0, y0, x1, y1], outline='black')
    draw.text(((x0 + x1) / 2, y1 + 20), 'iteration', fill='black', font=font, anchor='ma')
    for n, (label, rgb, xs, ys) in enumerate(series):
        points = [(px(x), py(y)) for x, y in zip(xs, ys)]
        if len(points) > 1:
            draw.line(points, fill=rgb, width=2)
        if len(points) <= 100:
            for x, y in points:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=rgb)
        key = x0 + 70 * n  # the legend: one row between the title and the plot
        draw.line([key, top + 32, key + 18, top + 32], fill=rgb, width=3)
        draw.text((key + 22, top + 32), label, fill='black', font=font, anchor='lm')


def draw_curves(log_path, png_path):
    """log.jsonl -> a PNG of three panels against iterations: the training loss, then the
    validation R@1/R@5/R@10 of image->text and of text->image. A resumed run's log repeats
    iterations; the last record of each counts."""
    from PIL import Image, ImageDraw, ImageFont
    loss, val = {}, {}
    with open(log_path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the torn last line of a killed run, before a resume: not worth a crash
                continue
            (loss if 'loss' in record else val)[record['iteration']] = record.get('loss', record.get('val'))
    if not val:
        return
    picture = Image.new('RGB', (3 * 380, 300), 'white')
    draw, font = ImageDraw.Draw(picture), ImageFont.load_default(size=13)
    steps = sorted(loss)
    if steps:
        draw_panel(draw, font, 0, 0, 380, 300, 'training loss (mean over log_interval)',
                   [('loss', (40, 40, 40), steps, [loss[s] for s in steps])])
    steps = sorted(val)
    for n, (key, name) in enumerate((('i2t', 'image->text'), ('t2i', 'text->image'))):
        series = [(f'R@{k}', rgb, steps, [val[s][key][f'r{k}'] for s in steps])
                  for k, rgb in ((1, (214, 39, 40)), (5, (31, 119, 180)), (10, (44, 160, 44)))]
        draw_panel(draw, font, 380 * (n + 1), 0, 380, 300, f'validation {name} recall (%)', series, y_max=100)
    with atomic_open(png_path) as f:
        picture.save(f, format='PNG')


def write_log(log, line):
    try:
        log.write(line)
        log.flush()
    except OSError as e:
        raise UserError(f"{log.name}: cannot write it ({e.strerror or e}); free some disk space, then continue "
                        "with --resume=True") from None


def trim_log(path, iteration):
    """A resumed run repeats the iterations after its checkpoint: drop their lines (and a line
    torn by a kill) from log.jsonl, so that it reads as if the run had never stopped."""
    if not os.path.exists(path):
        return
    with open(path, encoding='utf-8', errors='replace') as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if line.endswith('\n') and json.loads(line)['iteration'] <= iteration:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    if kept != lines:
        with atomic_open(path, 'w') as f:
            f.writelines(kept)


def remove_stale_temporaries(out_dir):
    """The temporary files (.<name>.<random>.tmp) of atomic writes that a kill interrupted:
    checkpoints can be large, and any file of the run folder may have been mid-write."""
    for path in glob.glob(os.path.join(glob.escape(out_dir), '.*.tmp')):
        os.remove(path)


def resume_from(path, cfg, vocab, feature_dim, model, optimizer, dev, losses, grad_norms):
    """Load last.pt into the model and optimizer (and the RNG and the loss window); returns
    (iteration, best validation rsum)."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no checkpoint to resume from; drop --resume=True to start a new run")
    ckpt = load_checkpoint(path, dev)
    saved = ckpt['config']
    changed = [k for k in ('dataset', 'measure', 'embed_dim', 'word_dim', 'batch_size', 'seed')
               if saved.get(k) != getattr(cfg, k)]
    if changed or ckpt['vocab'] != vocab or ckpt['feature_dim'] != feature_dim:
        what = ', '.join(f"{k} {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in changed)
        if not what:
            what = ("its vocabulary differs from this dataset's" if ckpt['vocab'] != vocab else
                    f"{ckpt['feature_dim']}-d image features, this dataset has {feature_dim}-d")
        raise UserError(f"{path}: cannot resume with a different setup ({what}); use the same options and "
                        "dataset, or a new --out_dir")
    try:
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        iteration, best_rsum = int(ckpt['iteration']), float(ckpt['best_rsum'])
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise UserError(f"{path}: does not fit this model ({type(e).__name__}: {str(e).splitlines()[0][:150]}); "
                        "use a new --out_dir") from None
    if 'rng_state' in ckpt:
        torch.set_rng_state(ckpt['rng_state'].cpu())
    if 'loss_window' in ckpt and ckpt['loss_window'].shape == losses.shape:  # same --log_interval
        losses.copy_(ckpt['loss_window'])
        grad_norms.copy_(ckpt['grad_norm_window'])
    changed = [k for k in saved if k not in ('resume',) and k in vars(cfg) and saved[k] != getattr(cfg, k)]
    if changed:
        print("note: resuming with " + ', '.join(f"{k} {saved[k]!r} -> {getattr(cfg, k)!r}" for k in changed))
    return iteration, best_rsum


if __name__ == '__main__':
    run_main(main)
