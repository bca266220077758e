"""Train the image and sentence encoders on a prepared dataset.

    python train.py --dataset=flickr8k
    python train.py --dataset=coco --measure=cosine --margin=0.2 --max_violation=True   # VSE++

Every constant below can be overridden as --name=value. Writes into out_dir: best.pt (best
validation rsum), last.pt (where training stands; --resume=True continues from it) and
log.jsonl (loss and validation metrics).
"""
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
from utils import (UserError, atomic_open, embed_split, encode_captions, load_meta, load_split,
                   parse_config, pick_device, read_json, retrieval_metrics, run_main, write_json)

# ----------------------------------------------------------------------------- config
dataset = 'flickr8k'      # a prepared dataset in data/<dataset> (see prep.py)
data_dir = ''             # default: data/<dataset>
out_dir = ''              # default: checkpoints/<dataset>
measure = 'order'         # 'order' (order-embeddings) or 'cosine' (VSE, VSE++)
margin = 0.05             # hinge margin: 0.05 for order-embeddings, 0.2 for VSE++
max_violation = False     # True: only the hardest negative per query (VSE++)
embed_dim = 1024          # joint space
word_dim = 300            # word embeddings
batch_size = 128
learning_rate = 1e-3      # Adam
lr_decay_epoch = 0        # multiply the learning rate by 0.1 from this epoch on (VSE++: 15 of 30); 0 = never
grad_clip = 2.0           # clip the gradient's global norm
epochs = 15
val_images = 0            # validate on this many val images; 0 = all, except COCO's first 1,000 (as VSE++)
eval_interval = 0         # validate and save every this many iterations; 0 = at the end of each epoch
log_interval = 50         # iterations between loss lines in log.jsonl
resume = False            # continue from out_dir/last.pt
seed = 1234
device = 'auto'           # auto = cuda, then mps, then cpu
compile = True            # order scores through torch.compile'd kernels (needs a C++ compiler on a CPU); False: plain PyTorch
CONFIG_KEYS = [k for k, v in globals().items() if k.islower() and not k.startswith('_') and isinstance(v, (int, float, bool, str))]
# -----------------------------------------------------------------------------


def save_checkpoint(path, cfg, vocab, model, feature_dim, **state):
    """A checkpoint holds everything eval.py needs: config, vocabulary, feature size, weights."""
    with atomic_open(path) as f:
        torch.save({'config': vars(cfg), 'vocab': vocab, 'feature_dim': feature_dim,
                    'model': model.state_dict(), **state}, f)


def epoch_order(n, epoch):
    """The caption order of one epoch: a function of (seed, epoch) alone, so that a resumed
    run visits exactly the batches an uninterrupted one would."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))


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


def batch_loss(model, feats, tokens, lengths, idx, cfg):
    """The contrastive loss of the captions `idx` (a CPU index) and their images."""
    dev = feats.device
    lens = lengths[idx]
    images = model.encode_images(feats[(idx // 5).to(dev)])
    captions = model.encode_captions(tokens[idx.to(dev), :int(lens.max())], lens)
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
    over ranks, clip, Adam. Returns the loss as a device tensor, so that the loop never waits
    for the device."""
    loss = batch_loss(model, feats, tokens, lengths, idx, cfg)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if dist.is_initialized():
        average_gradients(model)
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return loss.detach()


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
    master = rank == 0  # rank 0 validates, logs and checkpoints
    torch.manual_seed(cfg.seed)

    meta = load_meta(cfg.data_dir)
    vocab = read_json(os.path.join(cfg.data_dir, 'vocab.json'), 'vocabulary')
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
    it, best_rsum = 0, -1.0
    if cfg.resume:
        it, best_rsum = resume_from(last_path, cfg, vocab, feats.shape[1], model, optimizer, dev)
        if it >= cfg.epochs * iters_per_epoch:
            print(f"{last_path}: this run already finished ({cfg.epochs} epochs); nothing to do")
            return
        print(f"resuming from {last_path} at iteration {it} (epoch {it // iters_per_epoch})")
    elif os.path.exists(last_path):
        raise UserError(f"{last_path} exists: pass --resume=True to continue that run, or choose another --out_dir")
    log = open(os.path.join(cfg.out_dir, 'log.jsonl') if master else os.devnull, 'a')
    if master:
        print(f"training on {dev}{f' x {world} processes' if world > 1 else ''}: {n_caps} captions, {len(feats)} images, "
              f"{iters_per_epoch} iterations of {global_batch} per epoch; validating on {n_val} val images; writing to {cfg.out_dir}")

    def checkpoint(val=None):
        nonlocal best_rsum
        if not master:
            return
        state = dict(iteration=it, best_rsum=max(best_rsum, val['rsum']) if val else best_rsum)
        if val is not None and val['rsum'] > best_rsum:
            best_rsum = val['rsum']
            save_checkpoint(best_path, cfg, vocab, model, feats.shape[1], val=val, **state)
        save_checkpoint(last_path, cfg, vocab, model, feats.shape[1], optimizer=optimizer.state_dict(), **state)

    # A preempted or Ctrl-C'd run stops at the next iteration boundary and saves last.pt.
    stop, stopping = [], False
    handler = lambda signum, frame: stop.append(signum)
    old_handlers = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    losses = torch.zeros(cfg.log_interval, device=dev)
    try:
        while it < cfg.epochs * iters_per_epoch:
            epoch, start = divmod(it, iters_per_epoch)
            lr = cfg.learning_rate * (0.1 if cfg.lr_decay_epoch and epoch >= cfg.lr_decay_epoch else 1.0)
            for group in optimizer.param_groups:
                group['lr'] = lr
            order = epoch_order(n_caps, epoch)
            t0 = time.time()
            bar = tqdm(range(start, iters_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                       initial=start, total=iters_per_epoch, disable=None if master else True)
            for b in bar:
                # Each rank takes its share of the global batch (the last one is cut to a multiple of world).
                idx = order[b * global_batch:(b + 1) * global_batch]
                share = len(idx) // world
                losses[it % cfg.log_interval] = train_step(model, optimizer, feats, tokens, lengths,
                                                           idx[rank * share:(rank + 1) * share], cfg)
                it += 1
                if it % cfg.log_interval == 0 or b == iters_per_epoch - 1:
                    window = losses[:(it - 1) % cfg.log_interval + 1].cpu()
                    if not torch.isfinite(window).all():
                        bad = it - len(window) + int((~torch.isfinite(window)).nonzero()[0])
                        raise UserError(f"loss became {window[bad - it + len(window)].item()} at iteration {bad}; "
                                        f"training stopped, {last_path} keeps the last good state "
                                        "(try a lower --learning_rate or check the features)")
                    bar.set_postfix(loss=f"{window.mean().item():.3f}")
                    log.write(f'{{"iteration": {it}, "epoch": {it / iters_per_epoch:.4f}, "loss": {window.mean().item():.6g}, "lr": {lr:g}}}\n')
                    log.flush()
                if (world == 1 or it % cfg.log_interval == 0) and any_rank(stop, dev):
                    stopping = True
                    break
                if cfg.eval_interval and it % cfg.eval_interval == 0 and b != iters_per_epoch - 1:
                    validate_and_save(model, val_feats, val_caps, vocab, dev, it, iters_per_epoch, log, checkpoint, master)
            bar.close()
            if stopping:
                checkpoint()
                if master:
                    print(f"stopped at iteration {it}; {last_path} saved: continue with --resume=True")
                return
            if master:
                print(f"epoch {epoch + 1}: {(iters_per_epoch - start) * global_batch / (time.time() - t0):.0f} captions/s")
            validate_and_save(model, val_feats, val_caps, vocab, dev, it, iters_per_epoch, log, checkpoint, master)
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
    log.write(f'{{"iteration": {it}, "epoch": {it / iters_per_epoch:.4f}, "val": {json.dumps(val)}}}\n')
    log.flush()
    checkpoint(val)


def resume_from(path, cfg, vocab, feature_dim, model, optimizer, dev):
    if not os.path.exists(path):
        raise UserError(f"{path}: no checkpoint to resume from; drop --resume=True to start a new run")
    ckpt = torch.load(path, map_location=dev, weights_only=True)
    saved = ckpt['config']
    changed = [k for k in ('dataset', 'measure', 'embed_dim', 'word_dim', 'batch_size', 'seed')
               if saved.get(k) != getattr(cfg, k)]
    if changed or ckpt['vocab'] != vocab or ckpt['feature_dim'] != feature_dim:
        what = ', '.join(f"{k} {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in changed) or 'the vocabulary or features differ'
        raise UserError(f"{path}: cannot resume with a different setup ({what}); use the same options or a new --out_dir")
    model.load_state_dict(ckpt['model'])
    optimizer.load_state_dict(ckpt['optimizer'])
    return ckpt['iteration'], ckpt['best_rsum']


if __name__ == '__main__':
    run_main(main)
