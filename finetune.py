"""Fine-tuning's images (train.py --finetune=True, as VSE++ does). The CNN that made a dataset's
features (meta.json's cnn and weights) is part of the model (model.Backbone); after
warmup_epochs the training images are decoded again at each step, augmented, and go through it;
eval.py then recomputes a split's features with it.

    TrainingImages                  a prepared split's image files, checked; from meta.json
    train_transform, augment_seeds  random crop and flip, drawn from a seed per caption and epoch
    AugmentedImages, epoch_batches  DataLoader workers decoding one epoch's batches, from any iteration on
    split_features                  a split's (or any files') features through the fine-tuned CNN, center crop
"""
import os

import numpy as np
import torch

import features
from utils import UserError, load_meta

AUGMENT_SEED_OFFSET = 2 ** 50   # keeps the augmentation generators apart from train.epoch_order's


# ----------------------------------------------------------------------------- the images

class TrainingImages:
    """The image files of a prepared split, all checked to be there, and how the CNN reads them
    (meta.json's cnn, weights, decode and dtype). Only for datasets prepared from their images by
    prep.py: features from elsewhere (--features=, vgg_feats.mat) came from a network we cannot
    rebuild, and the warm-up's image map would not fit another one's features."""

    def __init__(self, data_dir, split):
        meta = load_meta(data_dir)
        if 'cnn' not in meta:
            raise UserError(f"{data_dir}: its features were not extracted from images by prep.py (source "
                            f"{meta.get('source', '?')}), so there is no CNN to fine-tune; --finetune=True needs a "
                            "dataset prepared from its images (prep.py --images_dir=... --cnn=...)")
        self.cnn, self.weights = meta['cnn'], meta['weights']
        self.decode, self.dtype = meta.get('decode', 'pil'), meta.get('dtype', 'float32')
        files_path = os.path.join(data_dir, f'{split}_files.txt')
        if not os.path.exists(files_path):
            raise UserError(f"{files_path}: missing, so the {split} images are unknown; run prep.py again with --force=True")
        with open(files_path, encoding='utf-8') as f:
            self.files = f.read().splitlines()
        folder = meta.get('images_dir', '')
        folders = [d for d in (folder, os.path.join(data_dir, folder)) if folder and os.path.isdir(d)]
        if not folders:
            raise UserError(f"{data_dir}: the images folder prep.py read ({folder or 'none recorded'}) is not there; "
                            "--finetune=True trains from the images: put them back there")
        self.folder = folders[0]
        self.paths = [os.path.join(self.folder, f) for f in self.files]
        missing = [p for p in self.paths if not os.path.isfile(p)]
        if missing:
            raise UserError(f"{missing[0]}: missing image file ({len(missing)} of the {len(self.paths)} {split} images "
                            "are missing); --finetune=True trains from the images: put them back")


def train_transform(cnn):
    """VSE++'s training crop: a random crop of 8 % to 100 % of the area and 3/4 to 4/3 aspect
    ratio, resized to 224, flipped left-right half of the time; normalized as the CNN expects."""
    import torchvision.transforms as T
    interpolation, mean, std = features.preprocessing(cnn)
    return T.Compose([T.RandomResizedCrop(224, interpolation=interpolation), T.RandomHorizontalFlip(),
                      T.ToTensor(), T.Normalize(mean, std)])


def augment_seeds(n_captions, seed, epoch):
    """One augmentation seed per caption and epoch: a function of (seed, epoch) alone, like
    train.epoch_order, so a resumed run and any number of workers draw the same crops."""
    generator = torch.Generator().manual_seed(AUGMENT_SEED_OFFSET + seed * 1000 + epoch)
    return torch.randint(2 ** 62, (n_captions,), generator=generator)


class AugmentedImages(torch.utils.data.Dataset):
    """Items (caption, image, seed) -> (normalized crop, image, reason): the crop drawn from its
    own seed (the process's RNG is left as it was). A file that cannot be read gives zeros and
    the reason, and the main process stops with its name."""

    def __init__(self, paths, cnn):
        self.paths, self.transform = paths, train_transform(cnn)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, item):
        _, image, seed = item
        from PIL import Image
        try:
            with Image.open(self.paths[image]) as im, torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self.transform(im.convert('RGB')), image, ''
        except Exception as e:  # a file removed or damaged since the start: named, not a traceback
            return torch.zeros(3, 224, 224), image, features.error_summary(e)


def epoch_batches(images, order, seeds, start, global_batch, rank, world, workers, pin_memory):
    """This rank's (pixels, image ids) of each batch of one epoch from batch `start` on, shared out
    as train.py's loop shares the captions; decoded ahead in `workers` processes."""
    batches = []
    for b in range(start, -(-len(order) // global_batch)):
        idx = order[b * global_batch:(b + 1) * global_batch]
        share = len(idx) // world
        batches.append([(int(c), int(c) // 5, int(seeds[c])) for c in idx[rank * share:(rank + 1) * share]])
    loader = torch.utils.data.DataLoader(AugmentedImages(images.paths, images.cnn), batch_sampler=batches,
                                         num_workers=workers, pin_memory=pin_memory,
                                         generator=torch.Generator())  # the workers' seeds: not from the global RNG
    for pixels, ids, reasons in loader:
        bad = [k for k, reason in enumerate(reasons) if reason]
        if bad:
            raise UserError(f"{images.paths[int(ids[bad[0]])]}: cannot read the image ({reasons[bad[0]]}); "
                            "replace it, then continue with --resume=True")
        yield pixels, ids


# ----------------------------------------------------------------------------- features for evaluation

def split_features(backbone, paths, device, decode='pil', dtype='float32', workers=0):
    """(N, D) float32 features of image files through `backbone` (a model.Backbone) in eval mode: the
    center crop prep.py takes (shorter side 256, 224 crop; one crop, whatever meta.json's crops),
    with the dataset's decoder and dtype; rows L2-normalized."""
    was_training = backbone.training
    backbone.eval()
    try:
        feats = features.extract_features(backbone, paths, backbone.cnn, 1, device,
                                          batch_size=features.default_batch_size(device), workers=workers,
                                          progress=False, decode=decode, dtype=dtype)
    finally:
        backbone.train(was_training)
    feats = np.asarray(feats, dtype=np.float32)
    return feats / np.linalg.norm(feats, axis=1, keepdims=True)
