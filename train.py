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
from types import SimpleNamespace

import torch
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
    # fused: one kernel for all parameters; 6 times faster than the default on a 2-core CPU
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True)


def train_step(model, optimizer, feats, tokens, lengths, idx, cfg):
    """One step on the captions idx (a CPU LongTensor): gather the batch from the tensors on
    the device, encode, loss, backward, clip, Adam. Returns the loss as a device tensor, so
    that the loop never waits for the device."""
    lens = lengths[idx]                   # lengths stay on the CPU: packing wants them there
    idx = idx.to(feats.device, non_blocking=True)
    images = model.encode_images(feats[idx // 5])
    captions = model.encode_captions(tokens[idx, :int(lens.max())], lens)
    loss = contrastive_loss(model.scores(images, captions), cfg.margin, cfg.max_violation)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return loss.detach()


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
    dev = pick_device(cfg.device)
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
    iters_per_epoch = math.ceil(n_caps / cfg.batch_size)

    model = JointEmbedding(feats.shape[1], len(vocab), cfg.word_dim, cfg.embed_dim, cfg.measure, cfg.compile).to(dev)
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
    log = open(os.path.join(cfg.out_dir, 'log.jsonl'), 'a')
    print(f"training on {dev}: {n_caps} captions, {len(feats)} images, {iters_per_epoch} iterations per epoch; "
          f"validating on {n_val} val images; writing to {cfg.out_dir}")

    def checkpoint(val=None):
        nonlocal best_rsum
        state = dict(iteration=it, best_rsum=max(best_rsum, val['rsum']) if val else best_rsum)
        if val is not None and val['rsum'] > best_rsum:
            best_rsum = val['rsum']
            save_checkpoint(best_path, cfg, vocab, model, feats.shape[1], val=val, **state)
        save_checkpoint(last_path, cfg, vocab, model, feats.shape[1], optimizer=optimizer.state_dict(), **state)

    # A preempted or Ctrl-C'd run stops at the next iteration boundary and saves last.pt.
    stop = []
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
                       initial=start, total=iters_per_epoch, disable=None)
            for b in bar:
                idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                losses[it % cfg.log_interval] = train_step(model, optimizer, feats, tokens, lengths, idx, cfg)
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
                if stop:
                    break
                if cfg.eval_interval and it % cfg.eval_interval == 0 and b != iters_per_epoch - 1:
                    report(validate(model, val_feats, val_caps, vocab, dev), it, iters_per_epoch, log, checkpoint)
            bar.close()
            if stop:
                checkpoint()
                print(f"stopped at iteration {it}; {last_path} saved: continue with --resume=True")
                return
            print(f"epoch {epoch + 1}: {(iters_per_epoch - start) * cfg.batch_size / (time.time() - t0):.0f} captions/s")
            report(validate(model, val_feats, val_caps, vocab, dev), it, iters_per_epoch, log, checkpoint)
    finally:
        log.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    print(f"done: best validation rsum {best_rsum:.1f}; evaluate with: python eval.py --out_dir={cfg.out_dir}")


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
