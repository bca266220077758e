"""Train the image and sentence encoders on a prepared dataset.

    python train.py --dataset=flickr8k
    python train.py recipes/vsepp.py --dataset=coco --seed=2   # a recipe file first, then options over it
    python train.py --dataset=flickr8k --finetune=True         # the CNN trains too after warmup_epochs

The constants below are the defaults (--help lists them with their comments). Writes into
out_dir: best.pt (best validation rsum), last.pt (--resume=True continues from it), log.jsonl
and curves.png. Read main(): the setup, then one loop: the schedule, the step, the log, the
validation and the checkpoints. The run folder's machinery is run_folder.py's, torchrun's
distributed.py's, a step's random draws (crops, size augmentation) draws.py's, fine-tuning's
images finetune.py's.
"""
import math
import os
import time
from types import SimpleNamespace

import torch

from distributed import any_rank, average_gradients, broadcast_weights, gather, setup_distributed
from draws import drop_for_size, step_features
from finetune import TrainingImages, augment_seeds, epoch_batches, split_features
from model import ModelConfig, build_model, contrastive_loss, score_matrix
from options import (DEVICE, DTYPES, FOLDER, SEED, at_least, at_most, non_negative, one_of, parse_config, pick_dtype,
                     probability, run_main)
from run_folder import Run, StopRequests, progress
from utils import (PAD, UNK, UserError, encode_captions, encode_images, encode_text, load_meta, load_split, read_json,
                   retrieval_metrics)

# ----------------------------------------------------------------------------- config
dataset = 'flickr8k'      # a prepared dataset in data/<dataset> (see prep.py)
data_dir = ''             # default: data/<dataset>
out_dir = ''              # default: checkpoints/<dataset>
measure = 'order'         # 'order' (order-embeddings) or 'cosine' (VSE, VSE++)
margin = 0.05             # hinge margin: 0.05 for order-embeddings, 0.2 for VSE++
max_violation = True      # True: only the hardest negative per query (VSE++), after warmup_epochs; False: sum over all
warmup_epochs = 7         # with max_violation: sum over all negatives for this many epochs first (from scratch it collapses)
embed_dim = 1024          # joint space
word_dim = 300            # word embeddings
batch_size = 128          # captions (with their images) per step; each one's negatives are the rest of its batch
learning_rate = 1e-3      # Adam; 0 = the weights stay as initialized (a chance-level baseline)
lr_decay_epoch = 7        # multiply the learning rate by 0.1 from this epoch on (VSE++: 15 of 30); 0 = never
word_dropout = 0.0        # dropout on the word vectors while training (against overfitting; docs/recipe.md)
image_dropout = 0.5       # dropout on the image features while training (the default's main defence against overfitting)
pooling = 'mean'          # a dataset of grid vectors (prep.py --grid=True): each vector mapped, then 'mean' or 'gpo' (VSE∞) pools them
caption_pooling = 'last'  # 'last': the GRU's state at the last word; 'gpo': GPO over a bidirectional GRU's word states
size_augment = 0.0        # while training, drop this fraction of each image's grid vectors and of each caption's words (VSE∞: 0.2); at least one kept
weight_decay = 0.0        # decoupled (AdamW): each step also multiplies the weights by 1 - lr * weight_decay; 0 = off
grad_clip = 2.0           # clip the gradient's global norm to this; 0 = no clipping
epochs = 13               # passes over the train captions (docs/recipe.md: the defaults were chosen on Flickr8k val)
patience = 0              # stop when val rsum has not improved for this many validations (best.pt kept); 0 = never
val_images = 0            # validate on this many val images; 0 = all, except COCO's first 1,000 (as VSE++)
eval_interval = 0         # validate and save every this many iterations; 0 = at the end of each epoch
log_interval = 50         # iterations between loss lines in log.jsonl (and on the screen when it is no terminal)
resume = False            # continue from out_dir/last.pt
seed = 1234               # the initial weights and each epoch's caption order
device = 'auto'           # auto = cuda, then mps, then cpu
dtype = 'auto'            # auto: bfloat16 autocast for the encoders on CUDA and on CPUs with AMX or AVX512-BF16, float32 elsewhere; or float32 | bfloat16
finetune = False          # True: after warmup_epochs the image CNN trains too, from the images (a dataset prep.py extracted)
cnn_learning_rate = 2e-4  # with finetune: Adam's rate for the CNN (VSE++'s), also x 0.1 from lr_decay_epoch
cnn_frozen_stages = 4     # with finetune: the CNN's first stages keep their weights (Lite0: stem and 3 of 7 block stages); 0 = all train, as VSE++
workers = min(4, os.cpu_count() or 1)  # with finetune: processes decoding and augmenting the training images
compile = True            # order scores through torch.compile'd kernels (needs a C++ compiler on a CPU); False: plain PyTorch
CONFIG_KEYS = [k for k, v in globals().items() if k.islower() and not k.startswith('_') and isinstance(v, (int, float, bool, str))]
# What each option must be, checked before any work (options.check_options). Sizes are bounded
# so that a typo cannot ask for more memory than any machine has.
OPTION_RULES = {
    'data_dir': FOLDER, 'out_dir': FOLDER,
    'measure': one_of('order', 'cosine'),
    'margin': non_negative(),
    'warmup_epochs': at_least(0),
    'embed_dim': at_most(16384, at_least(1)),
    'word_dim': at_most(16384, at_least(1)),
    'batch_size': at_most(65536, at_least(2, ': a caption alone in its batch has no negative to be contrasted with')),
    'learning_rate': non_negative('the weights stay as initialized'),
    'lr_decay_epoch': at_least(0),
    'word_dropout': probability(), 'image_dropout': probability(),
    'pooling': one_of('mean', 'gpo'), 'caption_pooling': one_of('last', 'gpo'), 'size_augment': probability(),
    'weight_decay': non_negative('off'),
    'grad_clip': non_negative('no clipping'),
    'epochs': at_most(100000, at_least(1)),
    'patience': at_least(0), 'val_images': at_least(0), 'eval_interval': at_least(0),
    'log_interval': at_most(1000000, at_least(1)),
    'seed': SEED, 'device': DEVICE, 'dtype': one_of(*DTYPES),
    'cnn_learning_rate': non_negative('the CNN stays as it is'),
    'cnn_frozen_stages': at_least(0),
    'workers': at_most(256, at_least(0)),
}
# -----------------------------------------------------------------------------


def main(argv):
    cfg = make_config(argv)
    rank, world, dev = setup_distributed(cfg.device)
    cfg.dtype = pick_dtype(cfg.dtype, dev)
    torch.manual_seed(cfg.seed)
    data = load_data(cfg, dev)
    model = build_model(model_config(cfg, data), dev, cfg.dtype, data.cnn_weights, cfg.compile)
    broadcast_weights(model)
    optimizer = make_optimizer(model, cfg.learning_rate, cfg.weight_decay, cfg.cnn_learning_rate)
    n_caps, global_batch = len(data.tokens), cfg.batch_size * world
    iters_per_epoch = math.ceil(n_caps / global_batch)
    run = Run(cfg, data.vocab, model, optimizer, master=rank == 0, dev=dev)
    with run, StopRequests() as stop:  # the run folder's lock and log are let go however the run ends
        if cfg.resume and run.resume(iters_per_epoch):
            return
        run.start_log()
        if run.master:
            print(start_line(cfg, data, dev, world, iters_per_epoch, run.out_dir))
        while run.iteration < cfg.epochs * iters_per_epoch and not any_rank(run.patience_exhausted(), dev):
            epoch, start = divmod(run.iteration, iters_per_epoch)
            lr_scale, hardest = schedule(epoch, cfg)
            for group, rate in zip(optimizer.param_groups, (cfg.learning_rate, cfg.cnn_learning_rate)):
                group['lr'] = rate * lr_scale
            order = epoch_order(n_caps, epoch, cfg.seed)
            pixels = epoch_pixels(data, cfg, order, epoch, start, global_batch, rank, world, dev)
            t0 = time.time()
            with progress(f"epoch {epoch + 1}/{cfg.epochs}", start, iters_per_epoch, run.master) as bar:
                for b in range(start, iters_per_epoch):
                    idx = order[b * global_batch:(b + 1) * global_batch]
                    share = len(idx) // world   # each rank's part of the global batch (cut to a multiple of world)
                    batch = get_batch(data, idx[rank * share:(rank + 1) * share], pixels, run.iteration, cfg.seed,
                                      cfg.size_augment)
                    run.record(*train_step(model, optimizer, *batch, cfg, hardest))
                    bar.update(1)
                    if run.iteration % cfg.log_interval == 0 or b == iters_per_epoch - 1:
                        bar.show(run.iteration, run.log_loss(cfg.learning_rate * lr_scale, iters_per_epoch))
                    if stop.agreed(run.iteration, world, dev, cfg.log_interval):
                        bar.close()
                        run.stop(stop.signum)
                    if cfg.eval_interval and run.iteration % cfg.eval_interval == 0 and b != iters_per_epoch - 1:
                        run.after_validation(validate(model, data, cfg, run.iteration / iters_per_epoch) if run.master else None, iters_per_epoch)
                        if any_rank(run.patience_exhausted(), dev):
                            break
            if any_rank(run.patience_exhausted(), dev):  # it stopped in the middle of the epoch
                break
            if run.master:
                print(f"epoch {epoch + 1}: {(iters_per_epoch - start) * global_batch / (time.time() - t0):.0f} captions/s")
            run.after_validation(validate(model, data, cfg, run.iteration / iters_per_epoch) if run.master else None, iters_per_epoch)
    if run.master:
        split = 'test' if 'test' in data.splits else 'val'
        print(f"done: best validation rsum {run.best_rsum:.1f}; evaluate with: python eval.py --out_dir={run.out_dir}"
              + ('' if split == 'test' else ' --split=val   (this dataset has no test split)'))


def make_config(argv):
    """The constants above, overridden by a recipe file and --name=value; the folders' defaults
    filled in (data_dir absolute, so that eval.py finds it from anywhere)."""
    cfg = parse_config({k: globals()[k] for k in CONFIG_KEYS}, argv, OPTION_RULES)
    cfg.data_dir = os.path.abspath(cfg.data_dir or os.path.join('data', cfg.dataset))
    cfg.out_dir = cfg.out_dir or os.path.join('checkpoints', cfg.dataset)
    return cfg


def model_config(cfg, data):
    return ModelConfig(feature_dim=data.feats.shape[-1], vocab_size=len(data.vocab), word_dim=cfg.word_dim,
                       embed_dim=cfg.embed_dim, measure=cfg.measure, word_dropout=cfg.word_dropout,
                       image_dropout=cfg.image_dropout, cnn=data.train_images.cnn if cfg.finetune else '',
                       cnn_frozen_stages=cfg.cnn_frozen_stages if cfg.finetune else 0, pooling=cfg.pooling,
                       caption_pooling=cfg.caption_pooling)


def load_data(cfg, dev):
    """The training split on the device (a batch is an index into it; kept crops stay (N, C, D),
    step_features draws from them; grid vectors stay (N, K, D), the model pools them all) and the
    val split (kept crops as their mean, grids as they are, load_split); with --finetune=True,
    the image files of both, checked, and the CNN's starting weights."""
    meta = load_meta(cfg.data_dir)
    if cfg.finetune and meta.get('grid'):
        raise UserError(f"--finetune=True: {cfg.data_dir} holds grid vectors, and fine-tuning trains the CNN's pooled "
                        "vector, not its map, for now; fine-tune on a dataset prepared without --grid=True")
    vocab = load_vocab(cfg.data_dir)
    train_feats, train_caps = load_split(cfg.data_dir, 'train', all_crops=True)
    val_feats, val_caps = load_split(cfg.data_dir, 'val')
    if cfg.val_images > len(val_feats):
        raise UserError(f"--val_images={cfg.val_images}: the val split of {cfg.data_dir} has {len(val_feats)} images; "
                        "give at most that many, or 0 for all")
    n_val = cfg.val_images or (1000 if meta['dataset'] == 'coco' else len(val_feats))
    tokens, lengths = encode_captions(train_caps, vocab)
    data = SimpleNamespace(vocab=vocab, splits=meta['splits'], feats=torch.from_numpy(train_feats).to(dev),
                           tokens=tokens.to(dev), lengths=lengths, val_feats=val_feats[:n_val],
                           val_caps=val_caps[:5 * n_val], train_images=None, val_images=None, cnn_weights=None,
                           grid=bool(meta.get('grid')))
    if cfg.finetune:
        data.train_images = TrainingImages(cfg.data_dir, 'train')
        data.val_images = TrainingImages(cfg.data_dir, 'val')
        data.cnn_weights = data.train_images.weights
    return data


def load_vocab(data_dir):
    """vocab.json: word -> id, with <pad> 0 and <unk> 1, ids 0 .. n-1."""
    path = os.path.join(data_dir, 'vocab.json')
    vocab = read_json(path, 'vocabulary')
    if (not isinstance(vocab, dict) or vocab.get(PAD) != 0 or vocab.get(UNK) != 1
            or sorted(vocab.values()) != list(range(len(vocab)))):
        raise UserError(f"{path}: not a vocabulary prep.py writes (word -> id, <pad> 0, <unk> 1, ids 0 to n-1); "
                        "run prep.py again with --force=True")
    return vocab


def start_line(cfg, data, dev, world, iters_per_epoch, out_dir):
    crops = f" ({data.feats.shape[1]} crops each, one drawn per step)" if data.feats.dim() == 3 else ''
    crops = f" ({data.feats.shape[1]} grid vectors each, pooled by {cfg.pooling})" if data.grid else crops
    line = (f"training on {dev}{f' x {world} processes' if world > 1 else ''} in {cfg.dtype}: {len(data.tokens)} "
            f"captions, {len(data.feats)} images{crops}, {iters_per_epoch} iterations of {cfg.batch_size * world} per "
            f"epoch; validating on {len(data.val_feats)} val images; writing to {out_dir}")
    skipped = [f"--{name}={getattr(cfg, name)}" for name, used in
               (('warmup_epochs', cfg.max_violation or cfg.finetune), ('lr_decay_epoch', True))
               if used and 0 < getattr(cfg, name) >= cfg.epochs]
    if cfg.pooling != 'mean' and not data.grid:
        line += (f"\nnote: --pooling={cfg.pooling}: {cfg.data_dir} has one feature vector per image, nothing to pool, "
                 "so it is ignored; prepare the dataset with prep.py --grid=True to pool a grid")
    if skipped:
        line += (f"\nnote: --epochs={cfg.epochs} ends before {' and '.join(skipped)}, so the schedule's second phase "
                 "never comes; give more --epochs, or a smaller value")
    return line


# ----------------------------------------------------------------------------- the schedule and the step

def schedule(epoch, cfg):
    """(the learning rates' factor, whether the loss takes only the hardest negative) in `epoch`:
    the rates x 0.1 from lr_decay_epoch on; the sum over all negatives for warmup_epochs, then the
    hardest (with max_violation). With --finetune the CNN joins after warmup_epochs (epoch_pixels)."""
    lr_scale = 0.1 if cfg.lr_decay_epoch and epoch >= cfg.lr_decay_epoch else 1.0
    return lr_scale, cfg.max_violation and epoch >= cfg.warmup_epochs


def make_optimizer(model, lr, weight_decay=0.0, cnn_lr=0.0):
    """Adam over the encoders at lr and, when the model has a CNN, the CNN at cnn_lr. Decoupled
    decay (AdamW): Adam divides a coupled L2 gradient by each weight's gradient scale, so a word
    rarely in a batch would be pulled to zero by about lr a step, whatever the rate."""
    encoders, cnn = model.parameter_groups()
    groups = [{'params': encoders, 'lr': lr, 'name': 'encoders'}] + ([{'params': cnn, 'lr': cnn_lr, 'name': 'backbone'}]
                                                                     if cnn else [])
    return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay, decoupled_weight_decay=True,
                            fused=True)  # fused: one kernel for all parameters


def epoch_order(n, epoch, seed):
    """The caption order of one epoch: a function of (seed, epoch) alone, so that a resumed
    run visits exactly the batches an uninterrupted one would."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))


def epoch_pixels(data, cfg, order, epoch, start, global_batch, rank, world, dev):
    """With --finetune=True after warmup_epochs: this epoch's augmented image batches from batch
    `start` on (finetune.epoch_batches); else None, and steps take the prepared features."""
    if not cfg.finetune or epoch < cfg.warmup_epochs:
        return None
    return epoch_batches(data.train_images, order, augment_seeds(len(order), cfg.seed, epoch), start, global_batch,
                         rank, world, cfg.workers, pin_memory=dev.type == 'cuda')


def get_batch(data, idx, pixels, iteration, seed, size_augment=0.0):
    """(images, image_lengths, tokens, lengths) of the captions idx (a CPU index) on the device,
    longest caption first (the GRU's packing then needs no sort on the device; the loss is a sum
    over all pairs, so the order of a batch does not change it). images: the prepared features of
    each caption's image (of a grid dataset all its vectors, (B, K, D)), or, from `pixels` (the CNN
    trains), the next batch of augmented images. image_lengths: None (every vector), or with
    size_augment how many of each image's grid vectors were kept (drop_for_size)."""
    dev = data.tokens.device
    order = data.lengths[idx].argsort(descending=True, stable=True)
    idx = idx[order]
    # A plain copy to a GPU waits for everything queued before it; from pinned memory it does not.
    idx_dev = idx.pin_memory().to(dev, non_blocking=True) if dev.type == 'cuda' else idx.to(dev)
    lengths = data.lengths[idx]
    if pixels is None:
        # grid vectors are all the model's (it pools them); of kept crops a step draws one.
        # getattr: the data of tests and bench.py, made by hand, hold no grids
        feats = data.feats if getattr(data, 'grid', False) else step_features(data.feats, iteration, seed)
        images = feats[idx_dev // 5]
    else:
        x, image_ids = next(pixels)
        if not torch.equal(image_ids[order], idx // 5):
            raise RuntimeError("the image batches are out of step with the captions")
        images = x.to(dev, non_blocking=True)[order.to(dev)]  # from the loader's pinned memory, then reordered
    tokens = data.tokens[idx_dev, :int(lengths.max())]
    if size_augment:
        return drop_for_size(images, tokens, lengths, size_augment, iteration, seed)
    return images, None, tokens, lengths


def batch_loss(model, images, image_lengths, tokens, lengths, cfg, hardest):
    """The contrastive loss of a batch (images and their captions, get_batch), over the whole
    global batch under torchrun. Under bfloat16 only the encoders' matrix products and the GRU run
    in bfloat16: the embeddings come out normalized in float32, and scores and loss are float32
    (the order penalty is a sum of squares of small differences that bfloat16 would round away)."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=cfg.dtype == 'bfloat16'):
        image_emb = model.encode_images(images, image_lengths)
        caption_emb = model.encode_captions(tokens, lengths)
    return contrastive_loss(model.scores(gather(image_emb), gather(caption_emb)), cfg.margin, hardest)


def train_step(model, optimizer, images, image_lengths, tokens, lengths, cfg, hardest):
    """One step: batch_loss, backward, gradients averaged over ranks, clip, Adam. Returns the
    loss and the gradient norm before clipping as device tensors, so that the loop never waits
    for the device."""
    loss = batch_loss(model, images, image_lengths, tokens, lengths, cfg, hardest)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(model)
    grad_norm = clip_in_step(model, optimizer, cfg.grad_clip or math.inf)
    optimizer.step()
    return loss.detach(), grad_norm


def clip_in_step(model, optimizer, max_norm):
    """clip_grad_norm_'s clipping, folded into fused Adam: the step divides each gradient by
    optimizer.grad_scale as it reads it (the hook torch.amp.GradScaler uses), so the gradients
    are not rewritten in a pass of their own. Returns the global norm before clipping."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    optimizer.grad_scale = ((norm + 1e-6) / max_norm).clamp(min=1.0)   # 1 / clip_grad_norm_'s coefficient
    return norm


# ----------------------------------------------------------------------------- validation

@torch.no_grad()
def validate(model, data, cfg, epochs_done):
    """The val split's metrics. Once a fine-tuned CNN has trained, its images go through it
    (center crop) instead of prep.py's features."""
    model.eval()
    feats = data.val_feats
    if cfg.finetune and epochs_done > cfg.warmup_epochs:
        images = data.val_images
        feats = split_features(model.backbone, images.paths[:len(feats)], data.tokens.device, images.decode,
                               images.dtype, cfg.workers)
    images, caps = encode_images(model, feats), encode_text(model, data.vocab, data.val_caps, tokenized=True)
    if not (torch.isfinite(images).all() and torch.isfinite(caps).all()):
        raise FloatingPointError("the validation embeddings became NaN or inf")  # weights too large, if finite
    result = retrieval_metrics(score_matrix(images, caps, model.measure, model.compiled))
    model.train()
    return result


if __name__ == '__main__':
    run_main(main)
