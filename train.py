"""Train the image and sentence encoders on a prepared dataset.

    python train.py --dataset=flickr8k
    python train.py --dataset=coco --measure=cosine --margin=0.2 --warmup_epochs=0   # VSE++ (hardest negatives)
    python train.py --dataset=flickr8k --finetune=True  # the CNN trains too after warmup_epochs (finetune.py)

Every constant below can be overridden as --name=value (--help lists them). Writes into out_dir:
best.pt (best validation rsum), last.pt (where training stands; --resume=True continues from it),
log.jsonl (loss and validation metrics) and curves.png (the log drawn, at each validation).

Read main() first: setup, the loop, validation and saving. Below it: the training step, then the
machinery main() uses (the run folder and its checkpoints, Ctrl-C, torchrun, the curves).
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

from features import uses_channels_last
from finetune import TrainingImages, attach_backbone, augment_seeds, epoch_batches, split_features
from finetune import make_optimizer as make_finetune_optimizer
from model import JointEmbedding, contrastive_loss, score_matrix
from options import (DEVICE, DTYPES, FOLDER, SEED, at_least, non_negative, one_of, parse_config, pick_device, pick_dtype,
                     probability, run_main)
from utils import (FolderLock, UserError, atomic_open, encode_captions, encode_images, encode_text, file_advice,
                   PAD, UNK, load_checkpoint, load_meta, load_split, read_json, retrieval_metrics)

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
weight_decay = 0.0        # decoupled (AdamW): each step also multiplies the weights by 1 - lr * weight_decay; 0 = off
grad_clip = 2.0           # clip the gradient's global norm to this; 0 = no clipping
epochs = 13               # passes over the train captions (docs/recipe.md: the defaults were chosen on Flickr8k val)
patience = 0              # stop when val rsum has not improved for this many validations (best.pt kept); 0 = never
val_images = 0            # validate on this many val images; 0 = all, except COCO's first 1,000 (as VSE++)
eval_interval = 0         # validate and save every this many iterations; 0 = at the end of each epoch
log_interval = 50         # iterations between loss lines in log.jsonl
resume = False            # continue from out_dir/last.pt
seed = 1234               # the initial weights and each epoch's caption order
device = 'auto'           # auto = cuda, then mps, then cpu
dtype = 'auto'            # auto: bfloat16 autocast for the encoders on CUDA and on CPUs with AMX or AVX512-BF16, float32 elsewhere; or float32 | bfloat16
finetune = False          # True: after warmup_epochs the image CNN trains too, from the images (finetune.py; a dataset prep.py extracted)
cnn_learning_rate = 2e-4  # with finetune: Adam's rate for the CNN (VSE++'s), also x 0.1 from lr_decay_epoch
cnn_frozen_stages = 4     # with finetune: the CNN's first stages keep their weights (Lite0: stem and 3 of 7 block stages); 0 = all train, as VSE++
workers = min(4, os.cpu_count() or 1)  # with finetune: processes decoding and augmenting the training images
compile = True            # order scores through torch.compile'd kernels (needs a C++ compiler on a CPU); False: plain PyTorch
CONFIG_KEYS = [k for k, v in globals().items() if k.islower() and not k.startswith('_') and isinstance(v, (int, float, bool, str))]
# What each option must be, checked before any work (options.check_options). val_images is checked
# against the val split once it is loaded.
OPTION_RULES = {
    'data_dir': FOLDER,
    'out_dir': FOLDER,
    'measure': one_of('order', 'cosine'),
    'margin': non_negative(),
    'warmup_epochs': at_least(0),
    'embed_dim': at_least(1),
    'word_dim': at_least(1),
    'batch_size': at_least(2, ': a caption alone in its batch has no negative to be contrasted with, and learns nothing'),
    'learning_rate': non_negative('the weights stay as initialized'),
    'lr_decay_epoch': at_least(0),
    'word_dropout': probability(),
    'image_dropout': probability(),
    'weight_decay': non_negative('off'),
    'grad_clip': non_negative('no clipping'),
    'epochs': at_least(1),
    'patience': at_least(0),
    'val_images': at_least(0),
    'eval_interval': at_least(0),
    'log_interval': at_least(1),
    'seed': SEED,
    'device': DEVICE,
    'dtype': one_of(*DTYPES),
    'cnn_learning_rate': non_negative('the CNN stays as it is'),
    'cnn_frozen_stages': at_least(0),
    'workers': at_least(0),
}
# -----------------------------------------------------------------------------


def main(argv):
    config = read_config(argv)  # the constants above, overridden by argv; main reads them as plain names
    rank, world, dev = setup_distributed(device)
    settings = SimpleNamespace(margin=margin, grad_clip=grad_clip or math.inf, dtype=pick_dtype(dtype, dev))
    torch.manual_seed(seed)
    data = load_data(config['data_dir'], dev)
    n_caps, global_batch = len(data.tokens), batch_size * world
    iters_per_epoch = math.ceil(n_caps / global_batch)
    model = JointEmbedding(data.feats.shape[-1], len(data.vocab), word_dim, embed_dim, measure, compile,
                           word_dropout, image_dropout).to(dev)
    train_images = setup_finetuning(model, config, data, dev, settings.dtype) if finetune else None
    broadcast_weights(model)
    optimizer = (make_finetune_optimizer(model, learning_rate, cnn_learning_rate, weight_decay) if finetune
                 else make_optimizer(model, learning_rate, weight_decay))
    run = Run(config, data.vocab, model, optimizer, master=rank == 0, dev=dev)
    with run, StopRequests() as stop:  # the run folder's lock and log are let go however the run ends
        if resume and run.resume(iters_per_epoch):
            return
        run.start_log()
        if run.master:
            print(f"training on {dev}{f' x {world} processes' if world > 1 else ''} in {settings.dtype}: {n_caps} "
                  f"captions, {len(data.feats)} images{crops_note(data.feats)}, {iters_per_epoch} iterations of {global_batch} per epoch; "
                  f"validating on {len(data.val_feats)} val images; writing to {run.out_dir}")
        while run.iteration < epochs * iters_per_epoch and not any_rank(run.patience_exhausted(), dev):
            epoch, start = divmod(run.iteration, iters_per_epoch)
            decay = 0.1 if lr_decay_epoch and epoch >= lr_decay_epoch else 1.0
            lr = learning_rate * decay
            for group in optimizer.param_groups:  # the fine-tuned CNN has a rate of its own
                group['lr'] = (cnn_learning_rate if group.get('name') == 'backbone' else learning_rate) * decay
            settings.max_violation = max_violation and epoch >= warmup_epochs
            order = epoch_order(n_caps, epoch)
            images = epoch_images(train_images, order, epoch, start, global_batch, rank, world, dev)
            t0 = time.time()
            bar = tqdm(range(start, iters_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                       initial=start, total=iters_per_epoch, disable=None if run.master else True)
            for b in bar:
                # Each rank takes its share of the global batch (the last one is cut to a multiple of world).
                idx = order[b * global_batch:(b + 1) * global_batch]
                share = len(idx) // world
                mine = idx[rank * share:(rank + 1) * share]
                if images is None:
                    run.record(*train_step(model, optimizer, step_features(data.feats, run.iteration), data.tokens,
                                           data.lengths, mine, settings))
                else:  # the CNN trains too, on this batch's images, decoded and augmented (finetune.py)
                    run.record(*finetune_step(model, optimizer, next(images), data.tokens, data.lengths, mine, settings))
                if run.iteration % log_interval == 0 or b == iters_per_epoch - 1:
                    bar.set_postfix(loss=f"{run.log_loss(lr, iters_per_epoch):.3f}")
                if stop.agreed(run.iteration, world, dev):
                    bar.close()
                    run.stop(stop.signum)
                if eval_interval and run.iteration % eval_interval == 0 and b != iters_per_epoch - 1:
                    run.validate(data, iters_per_epoch)
                    if any_rank(run.patience_exhausted(), dev):
                        break
            bar.close()
            if any_rank(run.patience_exhausted(), dev):  # it stopped in the middle of the epoch
                break
            if run.master:
                print(f"epoch {epoch + 1}: {(iters_per_epoch - start) * global_batch / (time.time() - t0):.0f} captions/s")
            run.validate(data, iters_per_epoch)
    if run.master:
        print(f"done: best validation rsum {run.best_rsum:.1f}; evaluate with: python eval.py --out_dir={run.out_dir}")


def read_config(argv):
    """The constants at the top with --name=value applied, made this module's globals (so that
    main reads them as plain names), with the folders' defaults filled in; returns them as the
    dict a checkpoint keeps. data_dir is kept absolute, so that eval.py finds it from anywhere."""
    config = parse_config({k: globals()[k] for k in CONFIG_KEYS}, argv, OPTION_RULES)
    config['data_dir'] = os.path.abspath(config['data_dir'] or os.path.join('data', config['dataset']))
    config['out_dir'] = config['out_dir'] or os.path.join('checkpoints', config['dataset'])
    globals().update(config)
    return config


def load_data(data_folder, dev):
    """The training split on the device (a batch is an index into it; kept crops stay (N, C, D),
    step_features draws from them) and the val split (kept crops as their mean, load_split)."""
    meta = load_meta(data_folder)
    vocab = load_vocab(data_folder)
    train_feats, train_caps = load_split(data_folder, 'train', all_crops=True)
    val_feats, val_caps = load_split(data_folder, 'val')
    if val_images > len(val_feats):
        raise UserError(f"--val_images={val_images}: the val split of {data_folder} has {len(val_feats)} images; "
                        "give at most that many, or 0 for all")
    n_val = val_images or (1000 if meta['dataset'] == 'coco' else len(val_feats))
    tokens, lengths = encode_captions(train_caps, vocab)
    return SimpleNamespace(vocab=vocab, feats=torch.from_numpy(train_feats).to(dev), tokens=tokens.to(dev),
                           lengths=lengths, val_feats=val_feats[:n_val], val_caps=val_caps[:5 * n_val])


def load_vocab(data_dir):
    """vocab.json: word -> id, with <pad> 0 and <unk> 1, ids 0 .. n-1."""
    path = os.path.join(data_dir, 'vocab.json')
    vocab = read_json(path, 'vocabulary')
    if (not isinstance(vocab, dict) or vocab.get(PAD) != 0 or vocab.get(UNK) != 1
            or sorted(vocab.values()) != list(range(len(vocab)))):
        raise UserError(f"{path}: not a vocabulary prep.py writes (word -> id, <pad> 0, <unk> 1, ids 0 to n-1); "
                        "run prep.py again with --force=True")
    return vocab


def epoch_order(n, epoch):
    """The caption order of one epoch: a function of (seed, epoch) alone, so that a resumed
    run visits exactly the batches an uninterrupted one would."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))


def step_features(feats, iteration):
    """What a step takes its image rows from: the (N, D) features themselves, or of kept crops
    (N, C, D) one crop of each image, drawn uniformly on the device as a function of (seed,
    iteration) alone, so that a resumed run draws exactly the crops an uninterrupted one would."""
    if feats.dim() == 2:
        return feats
    generator = torch.Generator(device=feats.device).manual_seed(mix32(iteration ^ mix32(seed)))
    return DrawnCrops(feats, torch.randint(feats.shape[1], (len(feats),), generator=generator, device=feats.device))


def mix32(x):
    """MurmurHash3's finalizer, a bijection of 32-bit integers: the crop draws' generator seeds
    differ for every iteration of a run and look unrelated across seeds. 32 bits, because a CPU
    generator keeps only the low 32 bits of its seed (seed * 2**32 + iteration would ignore the seed)."""
    x &= 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x85EBCA6B) & 0xFFFFFFFF
    x = ((x ^ (x >> 13)) * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def crops_note(feats):
    return f" ({feats.shape[1]} crops each, one drawn per step)" if feats.dim() == 3 else ''


class DrawnCrops:
    """(N, C, D) crops and a crop per image, indexed like the (N, D) rows of those crops: the
    rows a step takes are gathered in one indexing on the device, never all N."""

    def __init__(self, feats, crop):
        self.feats, self.crop, self.device = feats, crop, feats.device

    def __getitem__(self, rows):
        return self.feats[rows, self.crop[rows]]


def make_optimizer(model, lr, weight_decay=0.0):
    # Decoupled decay (AdamW): Adam divides a coupled L2 gradient by each weight's gradient scale,
    # so a word rarely in a batch would be pulled to zero by about lr a step, whatever the rate.
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, decoupled_weight_decay=True,
                            fused=True)  # fused: one kernel for all parameters


def setup_finetuning(model, config, data, dev, dtype):
    """--finetune=True: the dataset's CNN with the weights prep.py used attached to the model
    (model.backbone), the image files of train and val checked; returns the train images."""
    train_images = TrainingImages(config['data_dir'], 'train')
    data.val_images = TrainingImages(config['data_dir'], 'val')
    attach_backbone(model, train_images.cnn, train_images.weights, dev, dtype, cnn_frozen_stages)
    config['cnn'] = train_images.cnn  # for eval.py, which rebuilds it from the checkpoint
    return train_images


def epoch_images(train_images, order, epoch, start, global_batch, rank, world, dev):
    """With --finetune=True after warmup_epochs: this epoch's augmented image batches from batch
    `start` on (finetune.epoch_batches); else None, and steps read the prepared features."""
    if train_images is None or epoch < warmup_epochs:
        return None
    return epoch_batches(train_images, order, augment_seeds(len(order), seed, epoch), start, global_batch, rank, world,
                         workers, pin_memory=dev.type == 'cuda')


# ----------------------------------------------------------------------------- one training step

def batch_loss(model, feats, tokens, lengths, idx, settings):
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
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=settings.dtype == 'bfloat16'):
        images = model.encode_images(feats[idx_dev // 5])
        captions = model.encode_captions(tokens[idx_dev, :int(lens.max())], lens)
    return contrastive_loss(model.scores(gather(images), gather(captions)), settings.margin, settings.max_violation)


def train_step(model, optimizer, feats, tokens, lengths, idx, settings):
    """One step on this rank's captions idx (a CPU index): loss, backward, gradients averaged
    over ranks, clip, Adam. Returns the loss and the gradient norm before clipping as device
    tensors, so that the loop never waits for the device."""
    loss = batch_loss(model, feats, tokens, lengths, idx, settings)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if dist.is_initialized():
        average_gradients(model)
    grad_norm = clip_in_step(model, optimizer, settings.grad_clip)
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


def finetune_step(model, optimizer, batch, tokens, lengths, idx, settings):
    """train_step with the image features computed by model.backbone from this batch's
    augmented images (pixels, image ids) instead of read from the prepared ones."""
    pixels, image_ids = batch
    if not torch.equal(image_ids, idx // 5):
        raise RuntimeError("the image batches are out of step with the captions")
    dev = tokens.device
    order = lengths[idx].argsort(descending=True, stable=True)   # longest first, as batch_loss
    idx, lens = idx[order], lengths[idx[order]]
    x = pixels.to(dev, non_blocking=True)[order.to(dev)]   # from the loader's pinned memory, then reordered
    if uses_channels_last(dev, settings.dtype):
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=settings.dtype == 'bfloat16'):
        images = model.encode_images(model.backbone(x))
        captions = model.encode_captions(tokens[idx.to(dev), :int(lens.max())], lens)
    loss = contrastive_loss(model.scores(gather(images), gather(captions)), settings.margin, settings.max_violation)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if dist.is_initialized():
        average_gradients(model)
    grad_norm = clip_in_step(model, optimizer, settings.grad_clip)
    optimizer.step()
    return loss.detach(), grad_norm


@torch.no_grad()
def validate(model, feats, captions, vocab):
    model.eval()
    images, caps = encode_images(model, feats), encode_text(model, vocab, captions, tokenized=True)
    if not (torch.isfinite(images).all() and torch.isfinite(caps).all()):
        raise FloatingPointError("the validation embeddings became NaN or inf")  # weights too large, if finite
    result = retrieval_metrics(score_matrix(images, caps, model.measure, model.compiled))
    model.train()
    return result


# ----------------------------------------------------------------------------- the run folder

class Run:
    """What outlives a step: the iteration, the best validation rsum, the window of recent losses,
    and out_dir's files (log.jsonl, last.pt, best.pt, curves.png), which rank 0 alone writes.
    last.pt always holds a state without NaN or inf: every save checks first."""

    def __init__(self, config, vocab, model, optimizer, master, dev):
        self.config, self.vocab, self.model, self.optimizer, self.master = config, vocab, model, optimizer, master
        self.out_dir = config['out_dir']
        self.last_path, self.best_path = os.path.join(self.out_dir, 'last.pt'), os.path.join(self.out_dir, 'best.pt')
        self.log_path = os.path.join(self.out_dir, 'log.jsonl')
        # each iteration's loss and gradient norm, checked for NaN/inf (and logged) every log_interval
        self.losses = torch.zeros(config['log_interval'], device=dev)
        self.grad_norms = torch.zeros(config['log_interval'], device=dev)
        self.iteration, self.best_rsum, self.since_best = 0, -1.0, 0
        self.saved_iteration = None  # the iteration last.pt holds
        self.lock = take_run_folder(self.out_dir, config['resume']) if master else None
        self.log = None

    def resume(self, iters_per_epoch):
        """Continue from last.pt; True if that run had already finished."""
        state = resume_from(self.last_path, self.config, self.vocab, self.model, self.optimizer, self.losses.device)
        self.iteration, self.best_rsum = state['iteration'], state['best_rsum']
        self.since_best, self.saved_iteration = state.get('since_best', 0), self.iteration
        if 'loss_window' in state and state['loss_window'].shape == self.losses.shape:  # same --log_interval
            self.losses.copy_(state['loss_window'])
            self.grad_norms.copy_(state['grad_norm_window'])
        if self.iteration >= self.config['epochs'] * iters_per_epoch or self.patience_exhausted():
            print(f"{self.last_path}: this run already finished ({self.config['epochs']} epochs, or no improvement "
                  f"for --patience={self.config['patience']} validations); nothing to do")
            return True
        print(f"resuming from {self.last_path} at iteration {self.iteration} (epoch {self.iteration // iters_per_epoch})")
        if self.master:
            trim_log(self.log_path, self.iteration)
        return False

    def start_log(self):
        if self.master:
            remove_stale_temporaries(self.out_dir)
        try:
            self.log = open(self.log_path if self.master else os.devnull, 'a' if self.config['resume'] else 'w',
                            encoding='utf-8')
        except OSError as e:
            raise UserError(f"{self.log_path}: cannot write it ({e.strerror}); check the folder's permissions") from None

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if self.log is not None:
            self.log.close()
        if self.lock is not None:
            self.lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()
        if isinstance(error, FloatingPointError):
            self.stop_non_finite(str(error), self.iteration)

    def record(self, loss, grad_norm):
        self.losses[self.iteration % len(self.losses)] = loss
        self.grad_norms[self.iteration % len(self.losses)] = grad_norm
        self.iteration += 1

    def window(self):
        """The entries since the last full window of log_interval iterations."""
        return (self.iteration - 1) % len(self.losses) + 1

    def log_loss(self, lr, iters_per_epoch):
        self.check_finite()
        loss = self.losses[:self.window()].mean().item()
        self.write({'iteration': self.iteration, 'epoch': round(self.iteration / iters_per_epoch, 4),
                    'loss': float(f'{loss:.6g}'), 'lr': lr})
        return loss

    def write(self, record):
        try:
            self.log.write(json.dumps(record) + '\n')
            self.log.flush()
        except OSError as e:
            raise UserError(f"{self.log_path}: cannot write it ({e.strerror or e}); {file_advice(e)}, "
                            "then continue with --resume=True") from None

    def check_finite(self):
        """Stop at the first NaN or inf since the last check: in a loss, a gradient norm or, after
        them, the weights."""
        n = self.window()
        window = torch.stack((self.losses[:n], self.grad_norms[:n])).cpu()
        bad = (~torch.isfinite(window)).any(0).nonzero()
        if len(bad):
            k = int(bad[0])
            what, value = ('loss', window[0, k]) if not torch.isfinite(window[0, k]) else ('gradient norm', window[1, k])
            self.stop_non_finite(f"the {what} became {value.item()}", self.iteration - n + 1 + k)
        if not torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all():
            self.stop_non_finite("the weights became NaN or inf", self.iteration)

    def stop_non_finite(self, what, where):
        kept = (f"{self.last_path} keeps the last good state (iteration {self.saved_iteration})"
                if self.saved_iteration is not None else "no checkpoint had been written yet")
        raise UserError(f"{what} at iteration {where}; training stopped, {kept}; "
                        "try a lower --learning_rate or check the features")

    def validate(self, data, iters_per_epoch):
        """Rank 0 validates, logs, redraws the curves and saves; the other ranks wait for it."""
        self.check_finite()
        if self.master:
            val = validate(self.model, self.val_features(data, iters_per_epoch), data.val_caps, self.vocab)
            print(f"iteration {self.iteration} (epoch {self.iteration / iters_per_epoch:.2f}) val: "
                  f"i2t R@1 {val['i2t']['r1']:.1f} R@5 {val['i2t']['r5']:.1f} R@10 {val['i2t']['r10']:.1f} | "
                  f"t2i R@1 {val['t2i']['r1']:.1f} R@5 {val['t2i']['r5']:.1f} R@10 {val['t2i']['r10']:.1f} | "
                  f"rsum {val['rsum']:.1f}")
            self.write({'iteration': self.iteration, 'epoch': round(self.iteration / iters_per_epoch, 4), 'val': val})
            draw_curves(self.log_path, os.path.join(self.out_dir, 'curves.png'))
            self.save(val)
            if self.patience_exhausted():
                print(f"validation rsum has not improved for {self.since_best} validations (--patience="
                      f"{self.config['patience']}); stopping, best.pt keeps the best (rsum {self.best_rsum:.1f})")
        if dist.is_initialized():
            dist.barrier()

    def val_features(self, data, iters_per_epoch):
        """prep.py's val features; once a fine-tuned CNN has been trained, the val images' through it."""
        if not self.config['finetune'] or self.iteration <= self.config['warmup_epochs'] * iters_per_epoch:
            return data.val_feats
        images = data.val_images
        return split_features(self.model.backbone, images.paths[:len(data.val_feats)], self.losses.device,
                              images.decode, images.dtype, self.config['workers'])

    def patience_exhausted(self):
        return 0 < self.config['patience'] <= self.since_best

    def save(self, val=None):
        """last.pt, and best.pt when `val` is the best validation so far."""
        self.check_finite()
        if not self.master:
            return
        if val is not None:
            improved = val['rsum'] > self.best_rsum
            self.best_rsum = max(self.best_rsum, val['rsum'])
            self.since_best = 0 if improved else self.since_best + 1
        state = dict(iteration=self.iteration, best_rsum=self.best_rsum, since_best=self.since_best,
                     loss_window=self.losses.cpu(), grad_norm_window=self.grad_norms.cpu(), rng_state=torch.get_rng_state())
        if self.losses.device.type == 'cuda':  # dropout on a GPU draws from the GPU's own generator
            state['cuda_rng_state'] = torch.cuda.get_rng_state(self.losses.device)
        if val is not None and improved:
            save_checkpoint(self.best_path, self.config, self.vocab, self.model, val=val, **state)
        save_checkpoint(self.last_path, self.config, self.vocab, self.model, optimizer=self.optimizer.state_dict(), **state)
        self.saved_iteration = self.iteration

    def stop(self, signum):
        """Ctrl-C or SIGTERM: save last.pt, then exit with the shell's code for that signal, so
        that `train.py && eval.py` stops here."""
        self.save()
        if self.master:
            print(f"stopped at iteration {self.iteration}; {self.last_path} saved: continue with --resume=True")
        raise SystemExit(128 + signum)


def save_checkpoint(path, config, vocab, model, **state):
    """A checkpoint holds everything eval.py needs: config, vocabulary, feature size, weights."""
    buffer = io.BytesIO()  # serialized first: torch.save into a full disk fails with an obscure RuntimeError
    torch.save({'config': config, 'vocab': vocab, 'feature_dim': model.image_fc.in_features,
                'model': model.state_dict(), **state}, buffer)
    with atomic_open(path) as f:
        f.write(buffer.getbuffer())


def take_run_folder(out_dir, resume):
    """Lock out_dir for this run (one writer per run folder) and check what is in it. A folder
    no train.py is at work in is checked before its lock file is made, so that a refusal leaves
    it as it was; then again under the lock, where a run in progress is named first."""
    lock_path = os.path.join(out_dir, '.train.lock')
    if not os.path.exists(lock_path):
        refuse_used_folder(out_dir, resume)
    lock = FolderLock(out_dir, os.path.basename(lock_path), 'train.py', 'run folder')
    try:
        refuse_used_folder(out_dir, resume)
    except UserError:
        lock.release()
        raise
    return lock


def refuse_used_folder(out_dir, resume):
    """A new run never overwrites another run's results: it needs a folder of its own; a
    resumed one needs the last.pt it continues from."""
    last = os.path.join(out_dir, 'last.pt')
    if resume and not os.path.exists(last):
        raise UserError(f"{last}: no checkpoint to resume from; drop --resume=True to start a new run")
    used = [name for name in ('last.pt', 'best.pt', 'log.jsonl') if os.path.exists(os.path.join(out_dir, name))]
    used += sorted(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(out_dir), 'results_*.json')))
    if used and not resume:
        raise UserError(f"{out_dir} holds another run ({', '.join(used)}): pass --resume=True to continue it, "
                        "or choose another --out_dir")


def resume_from(path, config, vocab, model, optimizer, dev):
    """Load last.pt into the model, the optimizer and the RNG; returns the checkpoint."""
    ckpt = load_checkpoint(path, dev)
    saved = ckpt['config']
    changed = [k for k in ('dataset', 'measure', 'embed_dim', 'word_dim', 'batch_size', 'seed') if saved.get(k) != config[k]]
    if changed or ckpt['vocab'] != vocab or ckpt['feature_dim'] != model.image_fc.in_features:
        what = ', '.join(f"{k} {saved.get(k)!r} -> {config[k]!r}" for k in changed)
        if not what:
            what = ("its vocabulary differs from this dataset's" if ckpt['vocab'] != vocab else
                    f"{ckpt['feature_dim']}-d image features, this dataset has {model.image_fc.in_features}-d")
        raise UserError(f"{path}: cannot resume with a different setup ({what}); use the same options and "
                        "dataset, or a new --out_dir")
    try:
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        for group in optimizer.param_groups:  # the saved groups' decay would override --weight_decay
            group.update(weight_decay=config['weight_decay'], decoupled_weight_decay=True)
        ckpt['iteration'], ckpt['best_rsum'] = int(ckpt['iteration']), float(ckpt['best_rsum'])
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise UserError(f"{path}: does not fit this model ({type(e).__name__}: {str(e).splitlines()[0][:150]}); "
                        "use a new --out_dir") from None
    if 'rng_state' in ckpt:
        torch.set_rng_state(ckpt['rng_state'].cpu())
    if 'cuda_rng_state' in ckpt and dev.type == 'cuda':
        torch.cuda.set_rng_state(ckpt['cuda_rng_state'].cpu(), dev)
    changed = [k for k in saved if k != 'resume' and k in config and saved[k] != config[k]]
    if changed:
        print("note: resuming with " + ', '.join(f"{k} {saved[k]!r} -> {config[k]!r}" for k in changed))
    return ckpt


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


def draw_curves(log_path, png_path):
    """log.jsonl -> a PNG of three panels against iterations: the training loss (log scale: it
    falls by orders of magnitude), then the validation R@1/R@5/R@10 of image->text and of
    text->image. A resumed run's log repeats iterations; the last record of each counts."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    loss, val = {}, {}
    with open(log_path, encoding='utf-8') as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the torn last line of a killed run, before a resume
                continue
            (loss if 'loss' in record else val)[record['iteration']] = record.get('loss', record.get('val'))
    figure, axes = plt.subplots(1, 3, figsize=(11.4, 3), dpi=100, layout='constrained')
    axes[0].plot(sorted(loss), [loss[i] for i in sorted(loss)], color='#282828', label='loss')
    axes[0].set(title='training loss (mean over log_interval)', xlabel='iteration', yscale='log')
    for ax, (key, name) in zip(axes[1:], (('i2t', 'image->text'), ('t2i', 'text->image'))):
        for k, colour in ((1, 'tab:red'), (5, 'tab:blue'), (10, 'tab:green')):
            ax.plot(sorted(val), [val[i][key][f'r{k}'] for i in sorted(val)], 'o-', color=colour, label=f'R@{k}', ms=3)
        ax.set(title=f'validation {name} recall (%)', xlabel='iteration', ylim=(0, 100))
        ax.legend(loc='lower right', fontsize='small')
    with atomic_open(png_path) as f:
        figure.savefig(f, format='png')
    plt.close(figure)


# ----------------------------------------------------------------------------- Ctrl-C

class StopRequests:
    """SIGINT / SIGTERM while training: the loop stops at the next iteration boundary and saves
    last.pt. A second Ctrl-C stops at once (all writes are atomic, so nothing is torn)."""

    def __enter__(self):
        self.signum = None
        self.old = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def agreed(self, iteration, world, dev):
        """Whether to stop here; under torchrun all ranks agree, every log_interval iterations."""
        if world > 1 and iteration % log_interval:
            return False
        return any_rank(self.signum is not None, dev)

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------- torchrun

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


def broadcast_weights(model):
    """Every rank starts from rank 0's initial weights."""
    if dist.is_initialized():
        for p in model.parameters():
            dist.broadcast(p.data, 0)


def gather(x):
    """Every rank's rows in rank order, with gradients flowing back to the rank that owns them,
    so that each query is contrasted with the whole global batch, not only its own shard."""
    if not dist.is_initialized():
        return x
    with warnings.catch_warnings():  # torch 2.14 calls it deprecated; it is still the autograd-aware gather
        warnings.simplefilter('ignore', FutureWarning)
        return torch.cat(torch.distributed.nn.functional.all_gather(x))


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


def any_rank(flag, dev):
    """True on every rank when it is True on any: ranks must agree before leaving the loop."""
    if not dist.is_initialized():
        return bool(flag)
    t = torch.tensor([float(bool(flag))], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


if __name__ == '__main__':
    run_main(main)
